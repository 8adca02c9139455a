"""The class-conditional teacher backbones, each with one extra null class for guidance.

`diffusers-unet2d`: a diffusers UNet2DModel whose class embedding has a row for the null class. `official-ddpm`:
the class-conditional DDPM of the SA/SalUn/SFD code (bench.models.ddpm_official). Both are called as
`unet(x, t, class_labels=...).sample`, save with `save_pretrained` (diffusers format, safetensors) and are told
apart on loading by the `_class_name` of their config.json.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from diffusers import DDPMScheduler, UNet2DModel
from torch import nn

from bench.models.ddpm_official import OfficialConditionalUNet
from bench.presets import TeacherRecipe

# config.json `_class_name` -> class; TeacherRecipe.backbone -> class.
UNET_CLASSES = {cls.__name__: cls for cls in (UNet2DModel, OfficialConditionalUNet)}
BACKBONES = {"diffusers-unet2d": UNet2DModel, "official-ddpm": OfficialConditionalUNet}


def noise_schedule() -> DDPMScheduler:
    """The DDPM schedule of the SA/SalUn/SFD DDPM code: linear betas 1e-4..0.02 over 1000 steps."""
    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                         prediction_type="epsilon", clip_sample=False)  # fmt: skip


def _levels(n: int, image_size: int) -> int:
    """Resolution levels that the image size halves into evenly (28 -> 14 -> 7 stops there)."""
    while n > 1 and image_size % 2 ** (n - 1):
        n -= 1
    return n


def build_unet(recipe: TeacherRecipe, *, image_size: int, channels: int, num_classes: int) -> nn.Module:
    """The recipe's backbone for `num_classes` classes plus the null class `num_classes` (classifier-free guidance).

    Resolution levels that the image size cannot halve into evenly (28 -> 14 -> 7 stops there) are dropped.
    """
    levels = _levels(len(recipe.block_out_channels), image_size)
    if recipe.backbone == "official-ddpm":
        ch = recipe.block_out_channels[0]
        return OfficialConditionalUNet(
            sample_size=image_size, in_channels=channels, out_channels=channels, num_classes=num_classes, ch=ch,
            ch_mult=tuple(c // ch for c in recipe.block_out_channels[:levels]),
            num_res_blocks=recipe.layers_per_block, attn_resolutions=recipe.attn_resolutions,
            dropout=recipe.dropout, resamp_with_conv=True,
        )  # fmt: skip
    if recipe.backbone != "diffusers-unet2d":
        raise ValueError(
            f"unknown teacher backbone {recipe.backbone!r}: expected one of {', '.join(BACKBONES)}"
        )
    attention = recipe.attention[:levels]
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
    return UNet2DModel(
        sample_size=image_size, in_channels=channels, out_channels=channels,
        block_out_channels=recipe.block_out_channels[:levels], layers_per_block=recipe.layers_per_block,
        down_block_types=down, up_block_types=up, norm_num_groups=recipe.norm_num_groups,
        attention_head_dim=None if recipe.block_out_channels[0] < 64 else 32,
        num_class_embeds=num_classes + 1,
    )  # fmt: skip


def config_num_classes(config: Mapping) -> int | None:
    """Real classes (the null class not counted) a saved teacher's config.json declares; None if none."""
    if config.get("_class_name") == OfficialConditionalUNet.__name__:
        n = config.get("num_classes")
    else:  # a UNet2DModel: one learned embedding per class and one for the null class
        embeds = config.get("num_class_embeds") if config.get("class_embed_type") is None else None
        n = embeds - 1 if isinstance(embeds, int) else None
    return n if isinstance(n, int) else None


def num_classes_of(unet: nn.Module) -> int:
    """Real classes of a teacher (its class embeddings less the null class)."""
    if isinstance(unet, OfficialConditionalUNet):
        return unet.config.num_classes
    return unet.config.num_class_embeds - 1


def unet_class(unet_dir: Path) -> type:
    """The backbone class a saved UNet folder holds (its config.json `_class_name`; UNet2DModel if absent)."""
    name = json.loads((Path(unet_dir) / "config.json").read_text()).get("_class_name", "UNet2DModel")
    if name not in UNET_CLASSES:
        raise ValueError(f"{unet_dir} holds a {name}; the harness's teachers are {', '.join(UNET_CLASSES)}")
    return UNET_CLASSES[name]


def load_unet(unet_dir: Path) -> nn.Module:
    """A saved teacher backbone of either class (safetensors only)."""
    return unet_class(unet_dir).from_pretrained(unet_dir, use_safetensors=True, low_cpu_mem_usage=False)
