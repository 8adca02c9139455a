"""The text tier's methods and runs (issue 17): concept forget sets, UCE's closed form, ESD's parameter sets and
target, and `bench run` on fashion-mnist-text from method to the paraphrase and neighbour accuracies."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from bench.errors import BenchError
from bench.registry import ATTACKS, METHODS
from bench.text.captions import FASHION_MNIST, NULL_PROMPT
from bench.text.concepts import concept_forget_set
from methods.text_esd import text_trainable
from methods.text_uce import aligned_tokens, cross_attention_projections, uce_edit
from tests.helpers import Killed, kill_after_saves, same_weights
from tests.test_text import tiny_model


def text_context(run_dir, forget_set):
    from bench.context import RunContext, Runtime
    from bench.data.fashion_mnist import FashionMNISTText
    from bench.presets import get_preset

    return RunContext(run_dir=run_dir, seed=0, preset=get_preset("smoke"), dataset=FashionMNISTText(image_size=8),
                      forget_set=forget_set, requires=frozenset(), runtime=Runtime(progress=False))  # fmt: skip


# Concept forget sets -----------------------------------------------------------------------------------------------


def test_a_concept_forget_set_names_its_class_every_way_it_was_trained():
    fs = concept_forget_set(FASHION_MNIST, "concept-t-shirt")
    assert (fs.forget, fs.anchor, fs.retain) == ((0,), 1, tuple(range(1, 10)))
    assert concept_forget_set(FASHION_MNIST, "class-0") == fs  # the class tier's name is an alias
    assert fs.names() == ("t-shirt", "tee", "top")
    assert set(fs.forget_prompts()) == set(FASHION_MNIST.prompts(0, "train"))
    assert not set(fs.retain_prompts()) & set(fs.forget_prompts())
    # ForgetPromptDataset's pairs: the same template with the anchor's name of the same rank.
    pairs = fs.override_pairs()
    assert ("a photo of a tee", "a photo of a pants") in pairs and ("top", "pair of jeans") in pairs
    assert {o for _, o in pairs} <= set(FASHION_MNIST.prompts(1, "train"))
    assert fs.neighbours() == (2, 6)
    moved = fs.with_anchor(5)
    assert (
        moved.anchor == 5
        and moved.captions is FASHION_MNIST
        and moved.override_pairs()[0][1] == "a photo of a sandal"
    )
    assert concept_forget_set(FASHION_MNIST, "concept-bag").neighbours() == ()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("concept-zebra", "unknown concept 'zebra'; valid: t-shirt, trouser"),
        ("class-12", "class 12 does not exist"),
        ("forget-half", "valid: concept-t-shirt, concept-trouser"),
    ],
)
def test_an_unknown_concept_lists_the_valid_ones(name, message):
    with pytest.raises(BenchError, match=message):
        concept_forget_set(FASHION_MNIST, name)


# UCE ---------------------------------------------------------------------------------------------------------------


def test_uces_edit_is_the_minimiser_of_its_objective():
    g = torch.Generator().manual_seed(0)
    w, erase, preserve = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((5, 4), (3, 4), (6, 4)))
    targets = torch.randn(3, 5, generator=g, dtype=torch.float64)
    kw = {"lamb": 0.5, "erase_scale": 1.0, "preserve_scale": 0.1}
    edited = uce_edit(w, erase, targets, preserve, **kw).requires_grad_(True)

    def objective(v):
        return (kw["lamb"] * (v - w).square().sum() + kw["erase_scale"] * (erase @ v.T - targets).square().sum()
                + kw["preserve_scale"] * (preserve @ v.T - preserve @ w.T).square().sum())  # fmt: skip

    objective(edited).backward()
    assert edited.grad.abs().max() < 1e-9
    assert objective(edited) < objective(w)  # and it moved: the erased tokens now map nearer their targets
    assert (erase @ edited.detach().T - targets).norm() < (erase @ w.T - targets).norm()


def test_uce_lines_up_each_name_with_its_guide_from_the_last_word_token_on():
    enc = tiny_model().encoder
    old, new = aligned_tokens(enc, ["tee", "pair of jeans"], [" ", "gown"])
    # "tee": 1 word token, guide " ": 0 -> 77 - 1 tokens; "pair of jeans" (3) vs "gown" (1): 77 - 3 each.
    assert old.shape == new.shape == (76 + 74, enc.width)
    assert torch.equal(old[:76], enc(["tee"])[0, 1:77])
    assert torch.equal(new[76:], enc(["gown"])[0, 1:75])


def test_uce_edits_only_the_cross_attention_projections_and_moves_the_names_towards_the_guide(tmp_path):
    from methods.text_uce import TextUCE, UCEConfig

    teacher = tiny_model()
    fs = concept_forget_set(FASHION_MNIST, "concept-trouser")
    ctx = text_context(tmp_path, fs)
    edited = TextUCE(UCEConfig()).unlearn(teacher, fs, ctx)
    edited_names = {
        n for n, m in edited.unet.named_modules() if m in cross_attention_projections(edited.unet)
    }
    changed = {n.rsplit(".", 1)[0] for (n, a), b in
               zip(teacher.unet.named_parameters(), edited.unet.parameters(), strict=True) if not torch.equal(a, b)}  # fmt: skip
    assert changed == edited_names and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in changed)
    with torch.no_grad():
        text, null = teacher.encoder(["pants", NULL_PROMPT])[:, None]
        ratios = []
        for before, after in zip(cross_attention_projections(teacher.unet), cross_attention_projections(edited.unet),
                                 strict=True):  # fmt: skip
            # "pants" keys and values nearer to how the blank guide's first token did (" " has no word token);
            # partly, on this tiny encoder: lamb and the other erased and preserved tokens pull against it.
            target = before(null[:, 0])
            ratios.append(float((after(text[:, 1]) - target).norm() / (before(text[:, 1]) - target).norm()))
    assert max(ratios) < 0.95 and sum(ratios) / len(ratios) < 0.7


# ESD ---------------------------------------------------------------------------------------------------------------


def test_esd_trains_the_official_scripts_parameter_sets():
    names = [n for n, _ in tiny_model().unet.named_parameters()]
    x = {n for n in names if text_trainable(n, "esd-x")}
    u = {n for n in names if text_trainable(n, "esd-u")}
    assert x and all(".attn2." in n for n in x) and not u & x
    assert not any(n.startswith(("time_embedding", "conv_out", "conv_norm_out")) for n in u)
    assert any(".attn1." in n for n in u) and any(n.startswith("conv_in") for n in u)
    with pytest.raises(BenchError, match="expected one of esd-u, esd-x, full"):
        text_trainable("conv_in.weight", "noxattn")


def test_esd_x_moves_the_forget_prompts_prediction_towards_the_negatively_guided_target(tmp_path):
    """One step of ESD-x at a large learning rate on a tiny teacher: only attn2 moves, and the loss against the
    script's target eps(x, '') - eta [eps(x, p) - eps(x, '')] falls on the x_t it trained on."""
    import dataclasses

    from methods.text_esd import TextESDX, TextESDXConfig

    teacher = tiny_model()
    fs = concept_forget_set(FASHION_MNIST, "concept-bag")
    cfg = dataclasses.replace(TextESDXConfig(), iterations=3, ddim_steps=4, lr=1e-3)
    ctx = text_context(tmp_path, fs)
    out = TextESDX(cfg).unlearn(teacher, fs, ctx)
    moved = {n for (n, a), b in zip(teacher.unet.named_parameters(), out.unet.parameters(), strict=True)
             if not torch.equal(a, b)}  # fmt: skip
    assert moved and all(text_trainable(n, "esd-x") for n in moved)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, *teacher.image_shape, generator=g)
    t = torch.full((8,), 500)
    with torch.no_grad():
        c, null = teacher.encoder(["bag", NULL_PROMPT])
        c, null = c.expand(8, -1, -1), null.expand(8, -1, -1)
        eps_c, eps_0 = (teacher.unet(x, t, encoder_hidden_states=h).sample for h in (c, null))
        target = eps_0 - cfg.eta * (eps_c - eps_0)
        before = (eps_c - target).square().mean()
        after = (out.unet(x, t, encoder_hidden_states=c).sample - target).square().mean()
    assert after < before


# The contract ------------------------------------------------------------------------------------------------------

TEXT_METHODS = [m for m in METHODS.names() if METHODS.get(m).tier == "text"]


def _run(name, run_dir, data_dir, *, seed=0, kill_after=None, config=None):
    from bench.config import resolve_config
    from bench.context import RunContext, Runtime
    from bench.data.fashion_mnist import FashionMNISTText
    from bench.presets import get_preset

    cls = METHODS.get(name)
    ds = FashionMNISTText(data_dir=data_dir, image_size=8)
    fs = ds.forget_set("concept-t-shirt")
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(run_dir=run_dir, seed=seed, preset=get_preset("smoke"), dataset=ds, forget_set=fs,
                     requires=cls.requires, runtime=Runtime(checkpoint_every=1, progress=False))  # fmt: skip
    if kill_after:
        kill_after_saves(ctx, kill_after)
    return cls(config or resolve_config(cls, "smoke", {})).unlearn(tiny_model(), fs, ctx)


@pytest.mark.parametrize("name", [pytest.param(m, marks=pytest.mark.slow) if m in ("text-sfd", "text-salun", "text-sa") else m
                                  for m in TEXT_METHODS])  # fmt: skip
def test_text_contract(name, tmp_path, fmnist_dir, monkeypatch):
    """Smoke steps on a tiny text teacher: the weights change; an iterative method killed after a state dump
    resumes to the very weights of an uninterrupted run (so it is deterministic) and another seed differs; the
    model saves, reloads and samples identically; a data-free method reads no image."""
    from bench.api import Dataset
    from bench.data.fashion_mnist import FashionMNIST
    from bench.sampling import load_sampler

    if not METHODS.get(name).requires:

        def forbidden(*args, **kwargs):
            raise AssertionError(f"{name} read dataset images")

        monkeypatch.setattr(Dataset, "images", forbidden)
        monkeypatch.setattr(FashionMNIST, "load_split", forbidden)
    data = fmnist_dir.parent
    full = _run(name, tmp_path / "full", data)
    assert not same_weights(full.unet, tiny_model().unet)
    assert same_weights(full.encoder, tiny_model().encoder)  # the text encoder stays frozen
    if "iterations" in {f.name for f in dataclasses.fields(METHODS.get(name).Config)}:
        with pytest.raises(Killed):
            _run(name, tmp_path / "killed", data, kill_after=2)
        assert same_weights(full.unet, _run(name, tmp_path / "killed", data).unet)
        assert not same_weights(full.unet, _run(name, tmp_path / "seed1", data, seed=1).unet)
    full.save(tmp_path / "saved")
    again = load_sampler(tmp_path / "saved")
    assert type(again) is type(full) and same_weights(again.unet, full.unet)
    prompts, seeds = ["a photo of a tee", "the bag"], [11, 12]
    a = full.sample(prompts, seeds, steps=2, guidance=2.0)
    assert torch.equal(a, again.sample(prompts, seeds, steps=2, guidance=2.0)) and a.shape == (2, 1, 8, 8)


def test_salun_moves_only_salient_weights_and_esd_x_only_cross_attention(tmp_path, fmnist_dir):
    from bench.config import resolve_config
    from methods import text_salun

    cls = METHODS.get("text-salun")
    seen = {}
    real = text_salun.saliency_mask

    def keep(grads, ratio):
        seen["mask"] = real(grads, ratio)
        return seen["mask"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(text_salun, "saliency_mask", keep)
        out = _run("text-salun", tmp_path / "full", fmnist_dir.parent)
    mask = seen["mask"]
    total = sum(m.numel() for m in mask.values())
    assert abs(sum(float(m.sum()) for m in mask.values()) - total / 2) <= 1  # mask_ratio 0.5, globally
    for (n, a), b in zip(tiny_model().unet.named_parameters(), out.unet.parameters(), strict=True):
        assert torch.equal(a[mask[n] == 0], b[mask[n] == 0])  # a weight outside the mask never moves
    config = dataclasses.replace(resolve_config(cls, "smoke", {}), train_method="esd-x")
    xattn = _run("text-salun", tmp_path / "x", fmnist_dir.parent, config=config)
    for (n, a), b in zip(tiny_model().unet.named_parameters(), xattn.unet.parameters(), strict=True):
        assert torch.equal(a, b) or ".attn2." in n


# `bench run` on the text tier ---------------------------------------------------------------------------------------


def test_bench_run_pairs_methods_with_the_tier_of_their_dataset(fmnist_dir, capsys):
    from bench.cli import main

    base = ["run", "--data-dir", str(fmnist_dir.parent), "--dry-run"]
    assert main([*base, "--datasets", "fashion-mnist-text", "--methods", "sfd"]) == 2
    err = capsys.readouterr().err
    assert (
        "method sfd is of the class tier" in err
        and f"valid: {', '.join(sorted(['original', *TEXT_METHODS]))}\n" in err
    )
    assert main([*base, "--datasets", "fashion-mnist", "--methods", "text-uce"]) == 2
    assert "valid: original, sfd" in capsys.readouterr().err
    assert main([*base, "--datasets", "fashion-mnist-text", "--teacher", str(fmnist_dir)]) == 2
    assert "is not a Stable Diffusion folder" in capsys.readouterr().err  # the text tier's --teacher
    # Both tiers in one sweep: each dataset gets the methods of its tier, `original` both.
    assert (
        main([*base, "--datasets", "fashion-mnist,fashion-mnist-text", "--methods", "original,sfd,text-uce"])
        == 0
    )
    planned = capsys.readouterr().out
    assert "text-uce" in planned and "sfd" in planned and planned.count("original") >= 2


@pytest.mark.slow
def test_uce_on_the_shipped_text_teacher_erases_the_concept_and_keeps_the_rest(
    tmp_path, fmnist_dir, capsys, caplog
):
    """The vertical slice, on the shipped teacher at the smoke protocol: the judge stops seeing trousers under
    their training names and their paraphrases, and still sees the retained classes."""
    from bench.attack import load_rows as attack_rows
    from bench.cli import main
    from bench.store import load_results
    from bench.text.clip import find_clip

    out = tmp_path / "results"
    args = ["run", "--datasets", "fashion-mnist-text", "--forget-sets", "concept-trouser", "--preset", "smoke",
            "--methods", "original,text-uce", "--evaluators", "forget_accuracy,clip_score", "--data-dir", str(fmnist_dir.parent),
            "--results", str(out)]  # fmt: skip
    assert main(args) == 0
    df = load_results(out)
    acc = df[df.metric == "accuracy"].set_index(["method", "subset"]).value
    acc = {m: acc[m].to_dict() for m in ("original", "text-uce")}
    assert acc["original"]["forget"] > 0.9 and acc["original"]["forget-paraphrase"] > 0.8
    assert acc["text-uce"]["forget"] < 0.3 and acc["text-uce"]["forget-paraphrase"] < 0.5
    # What UCE costs the rest (measured: retain 0.89 -> 0.83, neighbours 0.90 -> 0.90 at guidance 1).
    for subset in ("retain", "retain-paraphrase", "neighbour"):
        assert acc["text-uce"][subset] > acc["original"][subset] - 0.15 and acc["text-uce"][subset] > 0.6
    # The shipped tiny CLIP says the same: trousers' images no longer match their prompts, the others still do.
    clip = df[df.metric == "clip_score"].set_index(["method", "subset"]).value
    clip = {m: clip[m].to_dict() for m in ("original", "text-uce")}
    assert set(clip["original"]) == {"forget", "retain", "forget-paraphrase", "retain-paraphrase"}
    for kind in ("forget", "forget-paraphrase"):
        assert clip["text-uce"][kind] < clip["original"][kind] - 5
    for kind in ("retain", "retain-paraphrase"):
        assert clip["text-uce"][kind] > clip["original"][kind] - 3
    assert set(df[df.metric == "clip_score"].clip_model) == {
        str(find_clip("fashion-mnist-text", "default", 0))
    }
    for grid in out.rglob("samples.safetensors"):
        images = load_file(grid)
        assert set(images) == {"images", "images_paraphrase"} and images["images"].shape[:2] == (10, 8)
    # `bench report` draws a sample grid per prompt kind.
    assert main(["report", "--results", str(out)]) == 0
    figures = {p.name for p in (out / "report").glob("samples_*.png")}
    assert figures == {
        f"samples_fashion-mnist-text_concept-trouser_smoke_s0{k}.png" for k in ("", "_paraphrase")
    }
    # The class tier's attacks say they do not apply, and write no row; textual inversion attacks both runs.
    capsys.readouterr()
    assert main(["attack", "--results", str(out), "--data-dir", str(fmnist_dir.parent)]) == 0
    said = capsys.readouterr().out
    assert said.count("does not apply: the attack probes class labels") == 2 * (len(list(ATTACKS)) - 1)
    assert said.count("textual-inversion: done") == 2
    assert "the sweep has no retrain run" not in caplog.text  # the controls are the class tier's
    rows = attack_rows(out)
    assert {(r["method"], r["evaluator"], r["metric"]) for r in rows} == {
        (m, "textual-inversion", "recovered") for m in ("original", "text-uce")}  # fmt: skip
    assert main(["report", "--results", str(out)]) == 0
    assert "textual inversion" in next((out / "report").glob("robustness*.md")).read_text()


@pytest.mark.slow
def test_sfd_asks_the_teacher_about_the_override_prompt_and_the_fake_score_about_the_forget_prompt(tmp_path,
                                                                                                 fmnist_dir):  # fmt: skip
    """training_loop.py's wiring (SD): in the generator step the retained term scores both networks at one retained
    prompt; the forget term scores the teacher at the override prompt and the fake score at the forget prompt
    the generator sampled from; the fake-score step trains on both, with prompts dropped to "" at 10%."""
    from methods import text_sfd

    fs = concept_forget_set(FASHION_MNIST, "concept-t-shirt")
    encoder = tiny_model().encoder
    prompts = sorted(
        {p for pair in fs.override_pairs() for p in pair} | set(fs.retain_prompts()) | {NULL_PROMPT}
    )
    with torch.no_grad():
        table = encoder(prompts)
    calls = []
    real = text_sfd.guided_eps

    def recording(unet, x_t, t, context, null, scale):
        named = [prompts[int((table - c).abs().flatten(1).amax(1).argmin())] for c in context]
        calls.append((unet.training, scale, named))
        return real(unet, x_t, t, context, null, scale)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(text_sfd, "guided_eps", recording)
        _run("text-sfd", tmp_path, fmnist_dir.parent)
    fake_step = [c for c in calls if c[0]]
    generator_step = [c for c in calls if not c[0]]
    assert len(fake_step) == 2 * 3 and len(generator_step) == 4 * 3  # smoke: 3 iterations
    assert all(scale == 4.5 for _, scale, _ in calls)
    pairs, retained = set(fs.override_pairs()), set(fs.retain_prompts())
    for i in range(0, len(generator_step), 4):
        (_, _, teacher_r), (_, _, fake_r), (_, _, teacher_o), (_, _, fake_f) = generator_step[i : i + 4]
        assert teacher_r == fake_r and set(teacher_r) <= retained
        assert all((f, o) in pairs for f, o in zip(fake_f, teacher_o, strict=True))
    seen = {p for _, _, named in fake_step for p in named}
    assert seen <= retained | {p for p, _ in pairs} | {NULL_PROMPT}


@pytest.mark.slow
def test_sa_caches_its_replay_and_fisher_per_teacher(tmp_path, fmnist_dir, monkeypatch):
    """The replay samples (every class under its training prompts) and the diagonal Fisher over them are computed
    once per teacher and settings, then reused by every forget set."""
    from bench.config import resolve_config
    from methods import text_sa

    monkeypatch.setenv("BENCH_MODEL_DIR", str(tmp_path / "store"))
    cls = METHODS.get("text-sa")
    method = cls(resolve_config(cls, "smoke", {}))
    teacher = tiny_model()
    assert not method.prepared(teacher)
    computed = []
    real = text_sa.text_fisher

    def counting(*args, **kwargs):
        computed.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(text_sa, "text_fisher", counting)
    _run("text-sa", tmp_path / "a", fmnist_dir.parent)
    assert method.prepared(teacher) and len(computed) == 1
    from bench.models.cache import load_cached

    cache, _ = load_cached(method._cache_file(teacher), what="test")
    fisher = {k.removeprefix("fisher."): v for k, v in cache.items() if k.startswith("fisher.")}
    assert fisher.keys() == dict(teacher.unet.named_parameters()).keys()
    assert all((v >= 0).all() for v in fisher.values()) and any(v.sum() > 0 for v in fisher.values())
    assert cache["images"].shape == (10, 1, 8, 8) and cache["labels"].tolist() == list(range(10))
    _run("text-sa", tmp_path / "b", fmnist_dir.parent)
    assert len(computed) == 1  # reused


def test_sas_simple_loss_is_the_ldm_loss_on_diffusers_noised_images():
    """text-sa's L_simple (ddpm_forget.py:914-923): the element-mean eps-MSE at x_t as diffusers' DDPMScheduler
    noises x0, t ~ U{0..999} and the noise drawn from the run's generator in that order; gradients reach the UNet."""
    from bench.models.unet import noise_schedule
    from methods.text_sa import simple_loss

    model = tiny_model()
    x0 = torch.rand(3, *model.image_shape) * 2 - 1
    context = model.encoder(["a photo of a tee", "a bag", "a sneaker"]).detach()
    sched = noise_schedule()
    loss = simple_loss(model.unet, x0, context, torch.Generator().manual_seed(5), "cpu", sched.alphas_cumprod)
    g = torch.Generator().manual_seed(5)
    t = torch.randint(1000, (3,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        pred = model.unet(sched.add_noise(x0, noise, t), t, encoder_hidden_states=context).sample
    assert torch.allclose(loss.detach(), ((pred - noise) ** 2).mean(), atol=1e-6)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.unet.parameters())


def test_saluns_relabel_loss_targets_the_relabelled_prediction_without_its_gradient():
    """random_label.py's forget term: the target is the UNet's own (stop-gradient) prediction under the anchor's
    prompt, so the gradient is that of MSE(eps(x_t, p_f), a constant)."""
    from methods.text_salun import relabel_loss

    model = tiny_model()
    x_t, t = torch.randn(2, *model.image_shape), torch.tensor([10, 700])
    c_f, c_new = (model.encoder(p).detach() for p in (["a tee", "a top"], ["a pants", "a trousers"]))
    loss = relabel_loss(model.unet, x_t, t, c_f, c_new)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.unet.named_parameters() if p.grad is not None}
    model.unet.zero_grad()
    with torch.no_grad():
        target = model.unet(x_t, t, encoder_hidden_states=c_new).sample
    reference = ((model.unet(x_t, t, encoder_hidden_states=c_f).sample - target) ** 2).mean()
    assert torch.allclose(loss.detach(), reference.detach(), atol=1e-6)
    reference.backward()
    assert ours and all(torch.allclose(g, p.grad, atol=1e-6) for n, p in model.unet.named_parameters()
                        if (g := ours.get(n)) is not None)  # fmt: skip
