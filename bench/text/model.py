"""The tiny text-to-image teacher: a pixel-space diffusers `UNet2DConditionModel` cross-attending to a small
transformers `CLIPTextModel`, laid out as Stable Diffusion's (down/up `CrossAttn*` blocks whose `attn2` is the
cross-attention ESD-x trains and UCE edits), so the SD code paths of the methods apply to it unchanged.

The text encoder is trained from scratch on the captions, so only the tokens they contain can mean anything to it.
Its embedding table therefore holds a row per CLIP BPE token of the captions (bench/text/captions.py) and one
shared row for every other token, instead of 49,408 rows: the same ids from the real tokenizer, a model of a few
MB. Prompts are tokenised and padded to CLIP's 77 tokens, as Stable Diffusion's pipelines do.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from bench.errors import BenchError
from bench.files import share
from bench.models.unet import noise_schedule
from bench.sampling import autocast, ddim, image_noise
from bench.text.captions import NULL_PROMPT
from bench.text.tokenizer import MAX_LENGTH, clip_tokenizer

TOKENS_FILE = "tokens.json"


def quiet_transformers() -> None:
    """No progress bar per load and save of a 52-tensor encoder: a run's own bars say what it is doing."""
    from transformers.utils import logging

    logging.disable_progress_bar()


@dataclass(frozen=True)
class TextTeacherRecipe:
    """The text teacher's networks and training at the default preset. No paper trains this model: the UNet's
    widths and the training (steps, batch, lr, warm-up, EMA, 10% condition dropout) are the shipped class-conditional
    teacher's (bench/presets.py _DEFAULT_TEACHER), with Stable Diffusion's cross-attention where that one has
    self-attention; the text encoder's size (width 64, 3 layers, 4 heads) is our choice, not tuned."""

    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    cross_attention: tuple[bool, ...] = (False, True, True)  # per level, highest resolution first
    norm_num_groups: int = 8
    attention_heads: int = 4
    text_width: int = 64  # the text encoder's hidden size = the UNet's cross_attention_dim
    text_layers: int = 3
    text_heads: int = 4
    steps: int = 6000
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999
    prompt_dropout: float = 0.1  # the null prompt for classifier-free guidance
    grad_clip: float = 1.0


# The text teacher's recipe per preset: the default one ships; smoke's trains in seconds where it does not (tests).
TEXT_RECIPES = {
    "default": TextTeacherRecipe(),
    "smoke": TextTeacherRecipe(block_out_channels=(8, 16), cross_attention=(False, True), norm_num_groups=4,
                               attention_heads=2, text_width=16, text_layers=1, text_heads=2, steps=20,
                               batch_size=16, lr=2e-3, warmup_steps=0, ema_decay=0.9),
}  # fmt: skip


def text_recipe(preset: str) -> TextTeacherRecipe:
    if preset not in TEXT_RECIPES:
        raise BenchError(f"the text-conditional tier has no teacher recipe for preset {preset!r}; valid: "
                         f"{', '.join(TEXT_RECIPES)}")  # fmt: skip
    return TEXT_RECIPES[preset]


class PromptEncoder(nn.Module):
    """Prompts -> the (B, 77, width) hidden states the UNet cross-attends to: the real CLIP tokenizer, a compact
    embedding table over `token_ids` (row 0: every other token), a CLIPTextModel."""

    def __init__(self, text_model, token_ids: list[int]):
        super().__init__()
        self.text_model = text_model
        self.token_ids = list(token_ids)
        tokenizer = clip_tokenizer()
        lookup = torch.zeros(len(tokenizer), dtype=torch.long)
        lookup[torch.tensor(self.token_ids)] = torch.arange(1, len(self.token_ids) + 1)
        self.register_buffer("lookup", lookup, persistent=False)

    @classmethod
    def build(cls, prompts: list[str], *, width: int, layers: int, heads: int) -> PromptEncoder:
        """A fresh encoder over the tokens of `prompts` (initialised from torch's global generator)."""
        from transformers import CLIPTextConfig, CLIPTextModel

        tokenizer = clip_tokenizer()
        ids = sorted({i for p in prompts for i in tokenizer(p).input_ids})
        rows = {bpe: row + 1 for row, bpe in enumerate(ids)}
        config = CLIPTextConfig(vocab_size=len(ids) + 1, hidden_size=width, intermediate_size=4 * width,
                                num_hidden_layers=layers, num_attention_heads=heads,
                                max_position_embeddings=MAX_LENGTH, bos_token_id=rows[tokenizer.bos_token_id],
                                eos_token_id=rows[tokenizer.eos_token_id], pad_token_id=rows[tokenizer.pad_token_id])  # fmt: skip
        return cls(CLIPTextModel(config), ids)

    @property
    def width(self) -> int:
        return self.text_model.config.hidden_size

    @property
    def tokenizer(self):
        return clip_tokenizer()

    def table_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows of the compact embedding table that CLIP BPE ids map onto (row 0: any other token)."""
        return self.lookup.cpu()[ids]

    def rows(self, prompts: list[str]) -> torch.Tensor:
        """The encoder's input ids of `prompts`: CLIP BPE ids, padded to 77, mapped onto the compact table."""
        ids = clip_tokenizer()(list(prompts), padding="max_length", max_length=MAX_LENGTH, truncation=True,
                               return_tensors="pt").input_ids  # fmt: skip
        return self.table_rows(ids)

    def forward(self, prompts: list[str]) -> torch.Tensor:
        device = self.lookup.device
        return self.text_model(input_ids=self.rows(prompts).to(device)).last_hidden_state

    def save(self, directory: Path) -> None:
        quiet_transformers()
        self.text_model.save_pretrained(directory, safe_serialization=True)
        (directory / TOKENS_FILE).write_text(json.dumps({"clip_bpe_ids": self.token_ids}) + "\n")
        share(directory)

    @classmethod
    def load(cls, directory: Path) -> PromptEncoder:
        from transformers import CLIPTextModel

        quiet_transformers()
        try:
            ids = json.loads((directory / TOKENS_FILE).read_text())["clip_bpe_ids"]
            text_model = CLIPTextModel.from_pretrained(directory, use_safetensors=True)
            if len(ids) + 1 != text_model.config.vocab_size:
                raise ValueError(
                    f"{TOKENS_FILE} lists {len(ids)} tokens for {text_model.config.vocab_size} rows"
                )
            return cls(text_model, ids)
        except Exception as e:
            raise BenchError(f"cannot load the text encoder in {directory}: {e}") from e


def build_text_unet(recipe: TextTeacherRecipe, *, image_size: int, channels: int) -> UNet2DConditionModel:
    """Stable Diffusion's UNet layout at this size: CrossAttn blocks at the levels `cross_attention` marks."""
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in recipe.cross_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(recipe.cross_attention))
    return UNet2DConditionModel(
        sample_size=image_size, in_channels=channels, out_channels=channels,
        block_out_channels=recipe.block_out_channels, layers_per_block=recipe.layers_per_block,
        down_block_types=down, up_block_types=up, mid_block_type="UNetMidBlock2DCrossAttn",
        norm_num_groups=recipe.norm_num_groups, cross_attention_dim=recipe.text_width,
        attention_head_dim=recipe.attention_heads,  # diffusers' name for the number of heads here
    )  # fmt: skip


class TextDiffusionModel:
    """A text-conditional epsilon-prediction DDPM, sampled with DDIM and classifier-free guidance over the null
    prompt "" (eps_u + w (eps_c - eps_u), w = 1: the conditional pass alone), as the class-conditional one is.
    `schedule` is its noise schedule (the harness's, bench.models.unet.noise_schedule, unless the model brings its
    own: a Stable Diffusion folder's, bench/text/stable_diffusion.py), which the methods that run on both read."""

    kind = "text-diffusion"
    raw: TextDiffusionModel | None = None  # the non-EMA weights, where the folder keeps them (raw/)

    def __init__(self, unet: UNet2DConditionModel, encoder: PromptEncoder, schedule=None):
        self.unet, self.encoder = unet, encoder
        self.schedule = schedule if schedule is not None else noise_schedule()

    def with_unet(self, unet: UNet2DConditionModel) -> TextDiffusionModel:
        """This model with another UNet (a method's result; every method keeps the text encoder frozen)."""
        return self.replaced(unet=unet)

    def replaced(self, **parts) -> TextDiffusionModel:
        """This model with some of its parts (`unet`, `encoder`) replaced, the rest (its kind, schedule, VAE,
        t_init) shared, and without the teacher's raw weights: a method's result, or what an attack or a probe
        samples from."""
        model = copy.copy(self)
        vars(model).update({"raw": None, **parts})
        return model

    def one_step(self, unet: UNet2DConditionModel, t_init: int) -> TextOneStepGenerator:
        """A one-step generator distilled from this model (text-sfd's result), on its text encoder and schedule."""
        return TextOneStepGenerator(unet, copy.deepcopy(self.encoder), t_init=t_init, schedule=self.schedule)

    def encode_images(self, x: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] as the UNet denoises them: themselves here (a Stable Diffusion model's: its VAE's
        latents), so a method that trains on images trains on either."""
        return x

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        return (c.in_channels, c.sample_size, c.sample_size)

    def eps(self, x: torch.Tensor, t, context: torch.Tensor, null: torch.Tensor | None = None,
            guidance: float = 1.0) -> torch.Tensor:  # fmt: skip
        """The guided noise prediction given the prompts' hidden states (`null`: the null prompt's, (1, 77, D))."""
        t = torch.as_tensor(t, device=x.device).expand(len(x))
        if guidance == 1.0:
            return self.unet(x, t, encoder_hidden_states=context).sample
        null = null.expand(len(x), -1, -1)
        cond, uncond = self.unet(torch.cat([x, x]), torch.cat([t, t]),
                                 encoder_hidden_states=torch.cat([context, null])).sample.chunk(2)  # fmt: skip
        return uncond + guidance * (cond - uncond)

    def nfe(self, *, steps: int, guidance: float) -> int:
        return steps * (1 if guidance == 1.0 else 2)

    @torch.no_grad()
    def sample(self, prompts: list[str], seeds: list[int], *, steps: int, guidance: float, eta: float = 0.0,
               batch_size: int = 250, device: torch.device | str = "cpu", amp: bool = False,
               progress=None) -> torch.Tensor:  # fmt: skip
        """Images in [-1, 1] for `prompts`, the i-th from noise seeded by `seeds[i]`; returned on the CPU."""
        device = torch.device(device)
        self.unet.to(device).eval()
        self.encoder.to(device).eval()
        out = []
        for i in range(0, len(prompts), batch_size):
            noise, gens = image_noise(seeds[i : i + batch_size], self.image_shape)
            with autocast(device, amp):
                x = self._sample_batch(noise.to(device), gens, prompts[i : i + batch_size], steps=steps,
                                       guidance=guidance, eta=eta)  # fmt: skip
            out.append(x.float().clamp(-1, 1).cpu())
            if progress is not None:
                progress(len(noise))
        return torch.cat(out)

    def _sample_batch(self, noise, gens, prompts, *, steps, guidance, eta):
        context = self.encoder(prompts)
        null = self.encoder([NULL_PROMPT]) if guidance != 1.0 else None
        eps = partial(self.eps, context=context, null=null, guidance=guidance)
        return ddim(eps, noise, gens, steps=steps, eta=eta, schedule=self.schedule)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(directory / "unet", safe_serialization=True)
        self.encoder.save(directory / "text_encoder")
        share(directory / "unet")
        (directory / "sampler.json").write_text(json.dumps({"kind": self.kind}, indent=2))

    @classmethod
    def load(cls, directory: Path) -> TextDiffusionModel:
        try:
            unet = UNet2DConditionModel.from_pretrained(
                directory / "unet", use_safetensors=True, low_cpu_mem_usage=False
            )
        except Exception as e:
            raise BenchError(f"cannot load the UNet in {directory / 'unet'}: {e}") from e
        model = cls(unet, PromptEncoder.load(directory / "text_encoder"))
        if (directory / "raw" / "sampler.json").is_file():
            model.raw = cls.load(directory / "raw")
        return model


class TextOneStepGenerator(TextDiffusionModel):
    """SiD/SFD's one-step generator on the text teacher (SFD `SD/training/sd_util.py::sid_sd_sampler`): x_g = (b* z -
    b* eps_theta(b* z, t*, p)) / a* at t* = `t_init`, unguided, one network evaluation per image."""

    kind = "text-one-step"

    def __init__(self, unet: UNet2DConditionModel, encoder: PromptEncoder, t_init: int = 625, schedule=None):
        super().__init__(unet, encoder, schedule)
        self.t_init = t_init
        abar = self.schedule.alphas_cumprod[t_init]
        self.a, self.b = float(abar.sqrt()), float((1 - abar).sqrt())

    def nfe(self, *, steps: int, guidance: float) -> int:
        return 1

    def generate(self, z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The differentiable forward of training and sampling, given the prompts' hidden states."""
        x_init = self.b * z
        t = torch.full((len(z),), self.t_init, device=z.device)
        return (x_init - self.b * self.unet(x_init, t, encoder_hidden_states=context).sample) / self.a

    def _sample_batch(self, noise, gens, prompts, *, steps, guidance, eta):
        return self.generate(noise, self.encoder(prompts))  # steps and guidance do not apply

    def save(self, directory: Path) -> None:
        super().save(directory)
        (directory / "sampler.json").write_text(
            json.dumps({"kind": self.kind, "t_init": self.t_init}, indent=2)
        )

    @classmethod
    def load(cls, directory: Path) -> TextOneStepGenerator:
        model = TextDiffusionModel.load(directory)
        try:
            t_init = int(json.loads((directory / "sampler.json").read_text())["t_init"])
        except (OSError, ValueError, KeyError) as e:
            raise BenchError(f"cannot read model settings {directory / 'sampler.json'}: {e!r}") from e
        return cls(model.unet, model.encoder, t_init=t_init)
