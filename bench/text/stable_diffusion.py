"""A local diffusers Stable Diffusion folder as the text tier's teacher (`bench run --teacher DIR` on a text dataset):
its UNet, VAE, CLIP text encoder and tokenizer, and its own noise schedule, read from the folder layout that
`StableDiffusionPipeline.save_pretrained` writes. The methods see what the tiny teacher shows them (`unet`,
`encoder(prompts)`, `eps`, `schedule`, `image_shape`, `with_unet`): the UNet denoises the VAE's latents, and
sampling decodes them as the pipeline does (`vae.decode(latents / scaling_factor)`). A run's unlearned model is
saved as such a folder again, so `StableDiffusionPipeline.from_pretrained` loads it.

Weights load with safetensors only: a folder of `.bin` files is refused with what to do, never unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from bench.errors import BenchError
from bench.text.model import TextDiffusionModel, TextOneStepGenerator, quiet_transformers

MODEL_INDEX = "model_index.json"
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def is_pipeline_folder(path: Path) -> bool:
    return (Path(path) / MODEL_INDEX).is_file()


def _config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BenchError(f"cannot read {path} ({e}): a Stable Diffusion folder as save_pretrained writes it "
                         f"holds {', '.join(COMPONENTS)}") from e  # fmt: skip


def pipeline_shapes(path: Path) -> dict:
    """What a pipeline folder makes, from its configs alone (no weights read): the latent and the decoded image
    shapes, and the checks every method here relies on (epsilon prediction, the UNet cross-attending to the
    text encoder's width)."""
    path = Path(path)
    missing = [c for c in COMPONENTS if not (path / c).is_dir()]
    if not is_pipeline_folder(path) or missing:
        raise BenchError(f"{path} is not a Stable Diffusion folder: it needs {MODEL_INDEX} and the folders "
                         f"{', '.join(COMPONENTS)} (missing: {', '.join(missing) or MODEL_INDEX}), as "
                         "StableDiffusionPipeline.save_pretrained writes them")  # fmt: skip
    unet, vae = _config(path / "unet" / "config.json"), _config(path / "vae" / "config.json")
    text = _config(path / "text_encoder" / "config.json")
    scheduler = _config(path / "scheduler" / "scheduler_config.json")
    if scheduler.get("prediction_type", "epsilon") != "epsilon":
        raise BenchError(f"{path}: its scheduler predicts {scheduler['prediction_type']!r}; the methods here are "
                         "those of the epsilon-prediction SD 1.x (ESD, UCE and SFD's official code)")  # fmt: skip
    if unet.get("cross_attention_dim") != text.get("hidden_size"):
        raise BenchError(f"{path}: the UNet cross-attends to width {unet.get('cross_attention_dim')} and the "
                         f"text encoder gives {text.get('hidden_size')}")  # fmt: skip
    size = unet["sample_size"]
    factor = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    return {"latent": (unet["in_channels"], size, size),
            "image": (vae.get("out_channels", 3), size * factor, size * factor)}  # fmt: skip


def check_pipeline_teacher(path: Path, *, dataset: str, shape: tuple[int, int, int]) -> None:
    """`--teacher DIR` on a text dataset, before any run starts: a Stable Diffusion folder whose images the
    dataset's judge (and tiny CLIP) can score, as they are the evaluators' only models of the concepts."""
    made = pipeline_shapes(path)["image"]
    if made != tuple(shape):
        raise BenchError(f"--teacher {path} makes {'x'.join(map(str, made))} images and {dataset}'s judge scores "
                         f"{'x'.join(map(str, shape))}: the evaluators score a Stable Diffusion teacher with the "
                         "dataset's own judge, so its VAE must decode to the dataset's image shape (a judge "
                         "of your own concepts is not an option yet)")  # fmt: skip


class PipelinePromptEncoder(nn.Module):
    """Prompts -> hidden states with the pipeline's own tokenizer and text encoder, as the pipeline's
    `encode_prompt` does: padded to the tokenizer's maximum length, the last hidden state."""

    def __init__(self, text_model, tokenizer):
        super().__init__()
        self.text_model, self.tokenizer = text_model, tokenizer

    @property
    def width(self) -> int:
        return self.text_model.config.hidden_size

    def table_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The text encoder's embedding rows of token ids: the ids themselves (its table is the vocabulary's)."""
        return ids

    def rows(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids  # fmt: skip

    def forward(self, prompts: list[str]) -> torch.Tensor:
        return self.text_model(input_ids=self.rows(prompts).to(self.text_model.device)).last_hidden_state

    def save(self, directory: Path) -> None:
        quiet_transformers()
        self.text_model.save_pretrained(directory / "text_encoder", safe_serialization=True)
        self.tokenizer.save_pretrained(directory / "tokenizer")


class LatentTextDiffusionModel(TextDiffusionModel):
    """A Stable Diffusion teacher (or a method's result on it): the UNet on the VAE's latents, so `image_shape`
    (what the methods draw noise in) is the latents' shape, and `sample` returns decoded images."""

    kind = "text-latent-diffusion"

    def __init__(self, unet, encoder: PipelinePromptEncoder, vae, schedule):
        super().__init__(unet, encoder, schedule=schedule)
        self.vae = vae

    def one_step(self, unet, t_init: int) -> LatentTextOneStepGenerator:
        return LatentTextOneStepGenerator(unet, self.encoder, self.vae, self.schedule, t_init=t_init)

    def settings(self) -> dict:
        """What sampler.json records besides the pipeline folder (load passes it back)."""
        return {"kind": self.kind}

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample

    @torch.no_grad()
    def encode_images(
        self, x: torch.Tensor, g: torch.Generator | None = None, batch_size: int = 256
    ) -> torch.Tensor:
        """The VAE's latents of images in [-1, 1], scaled as the UNet was trained on them: one draw from the
        posterior per image (with CPU generator `g`), as the SD training scripts draw it (`latent_dist.sample()
        * scaling_factor`), once per method run rather than per step. Returned on the CPU."""
        device = next(self.vae.parameters()).device
        out = []
        for i in range(0, len(x), batch_size):
            dist = self.vae.encode(x[i : i + batch_size].to(device)).latent_dist
            out.append((dist.sample(generator=g) * self.vae.config.scaling_factor).cpu())
        return torch.cat(out)

    def sample(self, prompts, seeds, *, device="cpu", **kwargs) -> torch.Tensor:
        self.vae.to(device).eval()
        return super().sample(prompts, seeds, device=device, **kwargs)

    def _sample_batch(self, noise, gens, prompts, *, steps, guidance, eta):
        return self.decode(
            super()._sample_batch(noise, gens, prompts, steps=steps, guidance=guidance, eta=eta)
        )

    def save(self, directory: Path) -> None:
        """A folder StableDiffusionPipeline.from_pretrained loads (without a safety checker), plus sampler.json."""
        from diffusers import __version__

        directory.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(directory / "unet", safe_serialization=True)
        self.vae.save_pretrained(directory / "vae", safe_serialization=True)
        self.encoder.save(directory)
        self.schedule.save_pretrained(directory / "scheduler")
        index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": __version__,
                 "unet": ["diffusers", type(self.unet).__name__], "vae": ["diffusers", type(self.vae).__name__],
                 "text_encoder": ["transformers", type(self.encoder.text_model).__name__],
                 "tokenizer": ["transformers", type(self.encoder.tokenizer).__name__],
                 "scheduler": ["diffusers", type(self.schedule).__name__],
                 "safety_checker": [None, None], "feature_extractor": [None, None],
                 "requires_safety_checker": False}  # fmt: skip
        (directory / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        (directory / "sampler.json").write_text(json.dumps(self.settings(), indent=2))

    @classmethod
    def load(cls, directory: Path) -> LatentTextDiffusionModel:
        import diffusers
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        directory = Path(directory)
        pipeline_shapes(directory)  # the layout and the configs, with their clear errors
        quiet_transformers()
        part = "unet"
        try:
            unet = UNet2DConditionModel.from_pretrained(directory / "unet", use_safetensors=True)
            part = "vae"
            vae = AutoencoderKL.from_pretrained(directory / "vae", use_safetensors=True)
            part = "text_encoder"
            text_model = CLIPTextModel.from_pretrained(directory / "text_encoder", use_safetensors=True)
            part = "tokenizer"
            tokenizer = CLIPTokenizer.from_pretrained(directory / "tokenizer")
            part = "scheduler"
            name = _config(directory / "scheduler" / "scheduler_config.json").get("_class_name", "")
            scheduler_cls = getattr(diffusers, name, None)
            if scheduler_cls is None or not hasattr(scheduler_cls, "from_pretrained"):
                raise ValueError(f"unknown scheduler class {name!r}")
            schedule = scheduler_cls.from_pretrained(directory / "scheduler")
        except Exception as e:
            raise BenchError(f"cannot load the {part} of the Stable Diffusion folder {directory}: {e} (weights "
                             "load from .safetensors only; convert .bin weights with save_pretrained("
                             "safe_serialization=True) in a trusted environment)") from e  # fmt: skip
        extra = {}  # a run's saved model: its settings (a teacher folder has no sampler.json)
        if (directory / "sampler.json").is_file():
            extra = {k: v for k, v in _config(directory / "sampler.json").items() if k != "kind"}
        return cls(
            unet.eval(), PipelinePromptEncoder(text_model.eval(), tokenizer), vae.eval(), schedule, **extra
        )


class LatentTextOneStepGenerator(LatentTextDiffusionModel, TextOneStepGenerator):
    """text-sfd's one-step generator on a Stable Diffusion teacher: TextOneStepGenerator's x_g = (b* z - b*
    eps(b* z, t*, p)) / a* in the latents (a*, b* of the teacher's schedule), decoded by the VAE, as SFD's SD
    code samples (`sd_util.py::sid_sd_sampler`, then `vae.decode`)."""

    kind = "text-latent-one-step"

    def __init__(self, unet, encoder: PipelinePromptEncoder, vae, schedule, t_init: int = 625):
        TextOneStepGenerator.__init__(self, unet, encoder, t_init=t_init, schedule=schedule)
        self.vae = vae

    def settings(self) -> dict:
        return {"kind": self.kind, "t_init": self.t_init}
