"""The class-conditional teacher: a diffusers UNet2DModel with one extra null class for guidance."""

from __future__ import annotations

from diffusers import DDPMScheduler, UNet2DModel

from bench.presets import TeacherRecipe


def noise_schedule() -> DDPMScheduler:
    """The DDPM schedule of the SA/SalUn/SFD DDPM code: linear betas 1e-4..0.02 over 1000 steps."""
    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                         prediction_type="epsilon", clip_sample=False)  # fmt: skip


def build_unet(recipe: TeacherRecipe, *, image_size: int, channels: int, num_classes: int) -> UNet2DModel:
    """A UNet for `num_classes` classes plus the null class `num_classes` (classifier-free guidance).

    Resolution levels that the image size cannot halve into evenly (28 -> 14 -> 7 stops there) are dropped.
    """
    levels = len(recipe.block_out_channels)
    while levels > 1 and image_size % 2 ** (levels - 1):
        levels -= 1
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


def num_classes_of(unet: UNet2DModel) -> int:
    """Real classes of a teacher (its class embeddings less the null class)."""
    return unet.config.num_class_embeds - 1
