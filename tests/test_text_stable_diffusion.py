"""A Stable Diffusion folder as the text tier's teacher (issue 17, item 5), on a tiny pipeline built from configs with
random weights, as diffusers' own pipeline tests build theirs, with the offline CLIP tokenizer: it samples as
StableDiffusionPipeline does, every text method and textual inversion run on it through `bench run --teacher`
and `bench attack`, and what it cannot take is refused with what to do."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from bench.errors import BenchError
from bench.registry import METHODS
from bench.text.stable_diffusion import (
    MODEL_INDEX,
    LatentTextDiffusionModel,
    LatentTextOneStepGenerator,
    check_pipeline_teacher,
    pipeline_shapes,
)
from bench.text.tokenizer import clip_tokenizer

# Every text method: text-sfd's one-step generator is trained in the latents and decoded by the VAE.
SD_METHODS = ("original", "text-esd-u", "text-esd-x", "text-uce", "text-salun", "text-finetune", "text-sa",
              "text-sfd")  # fmt: skip


def tiny_pipeline(directory, *, prediction_type="epsilon"):
    """SD 1.x's layout at toy size: a 1-channel VAE that decodes 8x8x4 latents to the 16x16 images of
    fashion-mnist-text (so its judge and tiny CLIP score them), SD 1.x's PNDM scheduler config."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2,
    )  # fmt: skip
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 8), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16)  # fmt: skip
    text = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, vocab_size=len(clip_tokenizer())))  # fmt: skip
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=prediction_type)  # fmt: skip
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)  # fmt: skip
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("sd") / "tiny-sd")


def test_it_samples_as_the_pipeline_does(sd_dir):
    """The same latents through StableDiffusionPipeline (DDIM, guidance 3) give the same images."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    teacher = LatentTextDiffusionModel.load(sd_dir)
    assert teacher.image_shape == (4, 8, 8) and pipeline_shapes(sd_dir)["image"] == (1, 16, 16)
    prompts, seeds = ["a photo of a tee", "a sneaker"], [3, 4]
    ours = teacher.sample(prompts, seeds, steps=5, guidance=3.0)
    assert ours.shape == (2, 1, 16, 16)
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, use_safetensors=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(s)) for s in seeds])
    theirs = pipe(
        prompts, latents=latents, num_inference_steps=5, guidance_scale=3.0, output_type="pt"
    ).images
    assert torch.allclose(ours * 0.5 + 0.5, theirs.clamp(0, 1), atol=1e-4)


def test_a_saved_result_is_a_pipeline_folder_again(sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from bench.sampling import load_sampler

    teacher = LatentTextDiffusionModel.load(sd_dir)
    unet = teacher.unet
    with torch.no_grad():
        unet.conv_out.bias.add_(0.5)
    teacher.with_unet(unet).save(tmp_path / "model")
    again = load_sampler(tmp_path / "model")
    assert isinstance(again, LatentTextDiffusionModel)
    assert torch.equal(again.unet.conv_out.bias, unet.conv_out.bias)
    assert type(again.schedule).__name__ == "PNDMScheduler"
    assert torch.equal(again.schedule.alphas_cumprod, teacher.schedule.alphas_cumprod)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "model", use_safetensors=True)
    assert torch.equal(pipe.unet.conv_out.bias, unet.conv_out.bias)


def test_methods_use_its_own_schedule(sd_dir):
    """SD's scaled-linear betas, not the harness's linear ones: ESD's x_t and the DDIM sampler read them."""
    from bench.models.unet import noise_schedule

    teacher = LatentTextDiffusionModel.load(sd_dir)
    abar = teacher.schedule.alphas_cumprod
    assert (
        abs(float(abar[-1]) - 0.0047) < 1e-3 and abs(float(noise_schedule().alphas_cumprod[-1]) - 4e-5) < 1e-5
    )


def test_bad_folders_are_refused_with_what_to_do(sd_dir, tmp_path):
    broken = shutil.copytree(sd_dir, tmp_path / "no-vae")
    shutil.rmtree(broken / "vae")
    with pytest.raises(BenchError, match="not a Stable Diffusion folder.*missing: vae"):
        LatentTextDiffusionModel.load(broken)
    pickled = shutil.copytree(sd_dir, tmp_path / "bin")
    (pickled / "unet" / "diffusion_pytorch_model.safetensors").rename(
        pickled / "unet" / "diffusion_pytorch_model.bin"
    )
    with pytest.raises(BenchError, match="cannot load the unet.*safetensors only"):
        LatentTextDiffusionModel.load(pickled)
    v_pred = shutil.copytree(sd_dir, tmp_path / "v")
    cfg = v_pred / "scheduler" / "scheduler_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "prediction_type": "v_prediction"}))
    with pytest.raises(BenchError, match="predicts 'v_prediction'"):
        LatentTextDiffusionModel.load(v_pred)
    with pytest.raises(
        BenchError, match="makes 1x16x16 images and fashion-mnist-text's judge scores 1x28x28"
    ):
        check_pipeline_teacher(sd_dir, dataset="fashion-mnist-text", shape=(1, 28, 28))


def test_images_are_trained_on_as_its_vae_latents(sd_dir):
    """What SalUn, fine-tuning and SA train on: one posterior draw of the VAE per image, scaled, seeded."""
    teacher = LatentTextDiffusionModel.load(sd_dir)
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    z = teacher.encode_images(x, torch.Generator().manual_seed(1))
    assert z.shape == (3, *teacher.image_shape)
    assert torch.equal(z, teacher.encode_images(x, torch.Generator().manual_seed(1)))
    with torch.no_grad():
        dist = teacher.vae.encode(x).latent_dist
    assert torch.allclose(
        z, dist.sample(torch.Generator().manual_seed(1)) * teacher.vae.config.scaling_factor
    )


def test_which_methods_run_on_it():
    assert {m for m in METHODS if METHODS.get(m).stable_diffusion} == set(SD_METHODS)


def test_bench_run_refuses_what_cannot_run_on_it(sd_dir, fmnist_dir, tmp_path, capsys, monkeypatch):
    """A method that does not declare `stable_diffusion` (a user's, say) is refused by name and left out of the
    default sweep; a folder that is not a pipeline is named."""
    from bench.cli import main

    monkeypatch.setattr(METHODS.get("text-uce"), "stable_diffusion", False)
    base = ["run", "--datasets", "fashion-mnist-text", "--preset", "smoke", "--data-dir", str(fmnist_dir.parent),
            "--dry-run", "--teacher"]  # fmt: skip
    assert main([*base, str(sd_dir), "--methods", "text-uce,text-esd-u"]) == 2
    assert "text-uce cannot run on a Stable Diffusion teacher in this version" in capsys.readouterr().err
    assert main([*base, str(sd_dir)]) == 0  # the default sweep: the methods that can
    planned = capsys.readouterr().out
    assert "text-esd-u" in planned and "text-uce" not in planned
    assert main([*base, str(fmnist_dir), "--methods", "text-uce"]) == 2
    assert "is not a Stable Diffusion folder" in capsys.readouterr().err


@pytest.mark.slow  # 36 s: in the slow set, still in CI
def test_bench_run_with_a_stable_diffusion_teacher(sd_dir, fmnist_dir, tmp_path):
    """`--teacher DIR` on the text tier: every method that can runs on it end to end, with the dataset's judge
    and tiny CLIP, and its model is a pipeline folder again."""
    from diffusers import StableDiffusionPipeline

    from bench.cli import main
    from bench.sampling import load_sampler
    from bench.store import load_results

    out = tmp_path / "results"
    base = ["run", "--datasets", "fashion-mnist-text", "--forget-sets", "concept-trouser", "--preset", "smoke",
            "--teacher", str(sd_dir), "--data-dir", str(fmnist_dir.parent), "--results", str(out)]  # fmt: skip
    assert main([*base, "--methods", ",".join(SD_METHODS), "--evaluators", "forget_accuracy,clip_score"]) == 0
    df = load_results(out)
    assert set(df.method) == set(SD_METHODS) and {"accuracy", "clip_score"} <= set(df.metric)
    models = {
        d.parent.name.split("-fashion")[0]: d for d in out.rglob("model") if (d / MODEL_INDEX).is_file()
    }
    assert set(models) == set(SD_METHODS)

    def unet(folder):
        return StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True).unet.state_dict()

    def changed(folder):
        theirs = unet(folder)
        return {k for k, v in teacher.items() if not torch.equal(v, theirs[k])}

    teacher = unet(sd_dir)
    assert not changed(models["original"])
    assert changed(models["text-uce"]) and all(".attn2.to_k" in k or ".attn2.to_v" in k
                                               for k in changed(models["text-uce"]))  # fmt: skip
    for m, cross_attention in (("text-esd-u", False), ("text-esd-x", True)):
        assert changed(models[m]) and all((".attn2." in k) == cross_attention for k in changed(models[m]))
    for m in ("text-salun", "text-finetune", "text-sa", "text-sfd"):
        assert changed(models[m])
    # text-sfd's one-step generator: one UNet call in the latents at its t_init, decoded by the VAE.
    gen = load_sampler(models["text-sfd"])
    assert (
        isinstance(gen, LatentTextOneStepGenerator) and gen.t_init == METHODS.get("text-sfd").Config().t_init
    )
    assert gen.sample(["a photo of a trouser"], [0], steps=50, guidance=1.0).shape == (1, 1, 16, 16)
    # Textual inversion attacks each of them: a recovered rate per run, from its own latents and VAE.
    from bench import attack

    cmd = ["attack", "--results", str(out), "--data-dir", str(fmnist_dir.parent), "--attacks",
           "textual-inversion"]  # fmt: skip
    assert main(cmd) == 0
    rows = [r for r in attack.load_rows(out) if r["metric"] == "recovered"]
    assert {r["method"] for r in rows} == set(SD_METHODS) and all(0 <= r["value"] <= 1 for r in rows)


@pytest.mark.parametrize("one_step", [False, True], ids=["multi-step", "one-step"])
def test_textual_inversion_on_it_trains_one_word_on_the_vae_latents(sd_dir, fmnist_dir, tmp_path, one_step):
    """The placeholder is a row appended to the pipeline's own vocabulary-sized table; the attack fits it on the
    forgotten images' latents and samples through the VAE, the folder's weights untouched."""
    from attacks.base import Resume
    from attacks.textual_inversion import PLACEHOLDER, WithPlaceholder, initializer_row
    from bench.config import resolve_config
    from bench.registry import ATTACKS
    from bench.text.captions import FASHION_MNIST
    from tests.test_text_attacks import NAME, _context

    model = LatentTextDiffusionModel.load(sd_dir)
    if one_step:
        model = model.one_step(model.unet, t_init=625)
    word, row = initializer_row(model.encoder, FASHION_MNIST.concepts[0].names)
    assert word == "tee" and row == clip_tokenizer().convert_tokens_to_ids("tee</w>")
    inv = WithPlaceholder(model.encoder, row)
    assert inv.new_row == len(clip_tokenizer())
    with torch.no_grad():
        assert torch.equal(inv([f"a photo of a {PLACEHOLDER}"]), model.encoder(["a photo of a tee"]))
    before = {
        k: v.clone() for k, v in [*model.unet.state_dict().items(), *model.encoder.state_dict().items()]
    }
    cls = ATTACKS.get(NAME)
    ctx = _context(tmp_path, fmnist_dir.parent, image_size=16)
    sampled = []
    sample = ctx.sample
    ctx.sample = lambda m, prompts, seeds: sampled.append(m) or sample(m, prompts, seeds)
    found = cls(resolve_config(cls, "smoke", {})).run(model, ctx, Resume(ctx.run))
    assert found[0].metric.key == "recovered[forget]" and found[0].n == 4
    assert type(sampled[0]) is type(model) and sampled[0].vae is model.vae
    assert isinstance(sampled[0].encoder, WithPlaceholder) and sampled[0].schedule is model.schedule
    after = {**model.unet.state_dict(), **model.encoder.state_dict()}
    assert all(torch.equal(v, after[k]) for k, v in before.items())
