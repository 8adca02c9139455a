"""Training utilities shared by pretraining and methods: EMA, atomic resumable state, LR warm-up."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from bench.errors import BenchError


class EMA:
    """Exponential moving average of a model's weights (the copy used for sampling)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = list(self.model.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - self.decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


def warmup_lambda(warmup_steps: int):
    """Linear learning-rate warm-up, then constant (the DDPM training recipe)."""
    return lambda step: min(1.0, (step + 1) / max(1, warmup_steps))


def save_state(path: Path, state: dict) -> None:
    """Write a resumable state atomically: a kill leaves either the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path) -> dict:
    """Load a state written by save_state, without unpickling arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BenchError(f"cannot load training state {path} (truncated or tampered?): {e}") from e


def ddpm_loss(unet: nn.Module, x0: torch.Tensor, labels: torch.Tensor, g: torch.Generator, *, device: torch.device,
              amp: bool = False, reduction: str = "mean") -> torch.Tensor:  # fmt: skip
    """The DDPM denoising loss ||eps - eps_theta(sqrt(abar_t) x0 + sqrt(1-abar_t) eps, t, c)||^2, t ~ U{0..999}.

    Randomness (t, eps) comes from the CPU generator `g`, so a run is reproducible and resumable.
    """
    from bench.models.unet import noise_schedule

    abar = noise_schedule().alphas_cumprod
    t = torch.randint(len(abar), (len(x0),), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    a = abar[t].view(-1, 1, 1, 1)
    x_t = (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        pred = unet(x_t, t.to(device), class_labels=labels.to(device)).sample
    err = (pred.float() - noise.to(device)) ** 2
    return err.mean() if reduction == "mean" else err.flatten(1).mean(1)
