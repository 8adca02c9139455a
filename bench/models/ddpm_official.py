"""The class-conditional DDPM of the SA/SalUn/SFD/EraseDiff code, written here from its description.

The official network (`Conditional_Model` in clear-nus/selective-amnesia `ddpm/models/diffusion.py`, copied by the
others) is the DDPM CIFAR-10 UNet (Ho et al.) with a class path of its own: an embedding of the K classes plus a
learned null vector, through a two-layer MLP of width 4 ch, concatenated with the time embedding (sinusoidal of width
ch, then a two-layer MLP of width 4 ch) and projected into each residual block. Guidance replaces the class
embedding by the null vector; here that is class index K, as for the diffusers teachers, so the methods call
`unet(x, t, class_labels=...).sample` on either backbone.

Parameter names are the official ones (`temb.dense.0`, `classes_emb`, `null_classes_emb`, `cemb.dense.*`,
`down.L.block.B.temb_cemb_proj`, `mid.attn_1.q`, ...), so an official checkpoint loads by stripping DataParallel's
`module.` prefix. The official ResnetBlock sizes its projection for a class embedding of 512 whatever ch is, so
the official code only runs at ch = 128; this one uses 4 ch (the same at 128).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


def sinusoidal(t: torch.Tensor, dim: int) -> torch.Tensor:
    """DDPM's timestep features: [sin(t f_i), cos(t f_i)] with f_i = 10000^(-i / (dim/2 - 1)), zero-padded if odd."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) / (half - 1) * torch.arange(half, dtype=torch.float32, device=t.device)
    )
    angles = t.float()[:, None] * freqs[None]
    out = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(out, (0, dim % 2))


class _MLP(nn.Module):
    """Two linear layers with a SiLU between them, held as `dense.0` and `dense.1` (the official names)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.ModuleList([nn.Linear(d_in, d_out), nn.Linear(d_out, d_out)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense[1](F.silu(self.dense[0](x)))


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus a projection of SiLU([temb, cemb]), GroupNorm-SiLU-dropout-conv, 1x1 skip if needed."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb_cemb_proj = nn.Linear(emb_dim, c_out)
        self.norm2 = _norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_cemb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class _Attention(nn.Module):
    """Single-head self-attention over the pixels (1x1 convolutions for q, k, v and the output), residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        z = self.norm(x)
        q, k, v = (f(z).flatten(2).transpose(1, 2) for f in (self.q, self.k, self.v))  # (b, hw, c)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # scale c^-1/2
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class _Down(nn.Module):
    """Stride-2 3x3 convolution after padding one zero row and column at the bottom and right, or 2x2 mean."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2) if self.conv is None else self.conv(F.pad(x, (0, 1, 0, 1)))


class _Up(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution when `with_conv`."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x if self.conv is None else self.conv(x)


class _Level(nn.Module):
    """One resolution level: `block` (residual blocks), `attn` (one per block, or none), `downsample`/`upsample`."""

    def __init__(self, blocks: list[_ResBlock], attn: list[_Attention]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)

    def run_block(self, i: int, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.block[i](h, emb)
        return self.attn[i](h) if len(self.attn) else h


class _Mid(nn.Module):
    def __init__(self, channels: int, emb_dim: int, dropout: float):
        super().__init__()
        self.block_1 = _ResBlock(channels, channels, emb_dim, dropout)
        self.attn_1 = _Attention(channels)
        self.block_2 = _ResBlock(channels, channels, emb_dim, dropout)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h, emb)), emb)


class OfficialConditionalUNet(ModelMixin, ConfigMixin):
    """The official class-conditional DDPM; `forward(x, t, class_labels)` with class `num_classes` = the null vector.

    Config fields are the official `model:` ones (ch, ch_mult, num_res_blocks, attn_resolutions, dropout,
    resamp_with_conv) plus what the harness reads of every teacher: sample_size (`data.image_size`), in_channels,
    out_channels (`model.out_ch`) and num_classes (`data.n_classes`, the null class not counted).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, sample_size: int = 32, in_channels: int = 3, out_channels: int = 3, num_classes: int = 10,
                 ch: int = 128, ch_mult: tuple[int, ...] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: tuple[int, ...] = (16,), dropout: float = 0.1,
                 resamp_with_conv: bool = True):  # fmt: skip
        super().__init__()
        ch_mult = tuple(ch_mult)
        if ch % 32:
            raise ValueError(
                f"ch={ch}: the network's GroupNorms have 32 groups, so ch must be a multiple of 32"
            )
        if sample_size % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"sample_size={sample_size} does not halve evenly {len(ch_mult) - 1} times (ch_mult "
                             f"{list(ch_mult)}): the skip connections would not line up")  # fmt: skip
        emb = 4 * ch  # width of the time embedding and of the class embedding alike
        self.temb = _MLP(ch, emb)
        self.classes_emb = nn.Embedding(num_classes, ch)
        self.null_classes_emb = nn.Parameter(torch.randn(ch))
        self.cemb = _MLP(ch, emb)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        widths = [ch * m for m in ch_mult]
        res, skips, c = sample_size, [ch], ch
        self.down = nn.ModuleList()
        for i, width in enumerate(widths):
            blocks, attn = [], []
            for _ in range(num_res_blocks):
                blocks.append(_ResBlock(c, width, 2 * emb, dropout))
                c = width
                if res in attn_resolutions:
                    attn.append(_Attention(c))
                skips.append(c)
            level = _Level(blocks, attn)
            if i < len(widths) - 1:
                level.downsample = _Down(c, resamp_with_conv)
                res //= 2
                skips.append(c)
            self.down.append(level)
        self.mid = _Mid(c, 2 * emb, dropout)
        ups: list[_Level] = []
        for i in reversed(range(len(widths))):
            blocks, attn = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(_ResBlock(c + skips.pop(), widths[i], 2 * emb, dropout))
                c = widths[i]
                if res in attn_resolutions:
                    attn.append(_Attention(c))
            level = _Level(blocks, attn)
            if i > 0:
                level.upsample = _Up(c, resamp_with_conv)
                res *= 2
            ups.append(level)
        self.up = nn.ModuleList(reversed(ups))  # up[i] works at the resolution of down[i]
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    def class_embedding(self, labels: torch.Tensor) -> torch.Tensor:
        """Rows of [classes_emb; null_classes_emb]: label `num_classes` selects the learned null vector."""
        table = torch.cat([self.classes_emb.weight, self.null_classes_emb[None]])
        return F.embedding(labels, table)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                class_labels: torch.Tensor | None = None, return_dict: bool = True):  # fmt: skip
        """eps(x_t, t, c); `class_labels` None is the null class for the whole batch."""
        x = sample
        t = torch.as_tensor(timestep, device=x.device)
        t = t.reshape(-1).expand(len(x)) if t.numel() == 1 else t
        if class_labels is None:
            class_labels = torch.full((len(x),), self.config.num_classes, device=x.device, dtype=torch.long)
        temb = sinusoidal(t, self.config.ch).to(self.conv_in.weight.dtype)
        emb = torch.cat([self.temb(temb),
                         self.cemb(self.class_embedding(class_labels.to(x.device)))], dim=1)  # fmt: skip
        hs = [self.conv_in(x)]
        for i, level in enumerate(self.down):
            for j in range(len(level.block)):
                hs.append(level.run_block(j, hs[-1], emb))
            if i < len(self.down) - 1:
                hs.append(level.downsample(hs[-1]))
        h = self.mid(hs[-1], emb)
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j in range(len(level.block)):
                h = level.run_block(j, torch.cat([h, hs.pop()], dim=1), emb)
            if i > 0:
                h = level.upsample(h)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return UNet2DOutput(sample=out) if return_dict else (out,)
