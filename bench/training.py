"""Training utilities shared by pretraining and methods: EMA, atomic resumable state, LR warm-up."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch import nn

from bench.errors import BenchError
from bench.files import sha256
from bench.store import atomic_write_text


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


def global_rng_state() -> dict:
    """torch's global generators (CPU, and every CUDA device's): UNet dropout draws from them, so a state dump
    that resumes to the same weights must hold them."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict | None) -> None:
    if not state:  # a dump written before the global generators were kept
        return
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def warmup_lambda(warmup_steps: int):
    """Linear learning-rate warm-up, then constant (the DDPM training recipe)."""
    return lambda step: min(1.0, (step + 1) / max(1, warmup_steps))


def state_record(path: Path) -> Path:
    """The sidecar beside a state dump (state.pt -> state.pt.json) holding its sha256."""
    return path.with_name(path.name + ".json")


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(state_record(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def save_state(path: Path, state: dict) -> None:
    """Write a resumable state atomically (a kill leaves either the old file or the new one) with its checksum.

    The sidecar is replaced before the dump and keeps the previous dump's checksum too, so whichever of the two
    dumps a kill leaves in place still matches it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    old = _read_record(path) if path.is_file() else None
    previous = old.get("sha256") if old else None
    atomic_write_text(state_record(path), json.dumps({"file": path.name, "sha256": sha256(tmp),
                                                      "previous": previous}) + "\n")  # fmt: skip
    os.replace(tmp, path)


def remove_state(path: Path) -> None:
    """Delete a state dump and its checksum sidecar."""
    path.unlink(missing_ok=True)
    state_record(path).unlink(missing_ok=True)


def load_state(path: Path, *, remedy: str = "") -> dict:
    """Load a state written by save_state, after checking its checksum, without unpickling arbitrary objects."""
    remedy = remedy or f"delete {path} and {state_record(path).name} beside it to start this training over"
    record = _read_record(path)
    if record is None or not isinstance(record.get("sha256"), str):
        raise BenchError(
            f"training state {path} has no readable checksum record {state_record(path)} (written by an older "
            f"version, or the record was lost), so it cannot be trusted: {remedy}"
        )
    if sha256(path) not in (record["sha256"], record.get("previous")):
        raise BenchError(
            f"training state {path} does not match its checksum in {state_record(path)}: truncated or modified "
            f"since it was written; {remedy}"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BenchError(f"cannot load training state {path} (truncated or tampered?): {e}; {remedy}") from e


def ddpm_loss(unet: nn.Module, x0: torch.Tensor, labels: torch.Tensor | None, g: torch.Generator, *,
              device: torch.device, amp: bool = False, reduction: str = "mean", antithetic: bool = False, shard=None,
              context: torch.Tensor | None = None, abar: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The DDPM denoising loss ||eps - eps_theta(sqrt(abar_t) x0 + sqrt(1-abar_t) eps, t, c)||^2, t ~ U{0..999}.

    `reduction`: "mean" over every element, "sum" over each image's pixels then mean over the batch (the official
    SA/SalUn/SFD loss, functions/losses.py::noise_estimation_loss_conditional), or "none" (each image's mean).
    `antithetic`: t for half the batch and 999 - t for the other half, as the official training loops draw it.
    Randomness (t, eps) comes from the CPU generator `g`, so a run is reproducible and resumable. `shard`
    (a data-parallel World's shard) takes this rank's slice of the global batch after all of it is drawn.
    `context`: a text-conditional UNet's prompt hidden states (bench/text), in place of class labels.
    `abar`: the model's alphas_cumprod where it has its own schedule (a Stable Diffusion teacher's).
    """
    from bench.models.unet import noise_schedule

    abar = noise_schedule().alphas_cumprod if abar is None else abar
    if antithetic:
        half = torch.randint(len(abar), (len(x0) // 2 + 1,), generator=g)
        t = torch.cat([half, len(abar) - 1 - half])[: len(x0)]
    else:
        t = torch.randint(len(abar), (len(x0),), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    if shard is not None:
        x0, t, noise = shard(x0), shard(t), shard(noise)
        labels = labels if labels is None else shard(labels)
        context = context if context is None else shard(context)
    a = abar[t].view(-1, 1, 1, 1)
    x_t = (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        if context is not None:
            pred = unet(x_t, t.to(device), encoder_hidden_states=context).sample
        else:
            pred = unet(x_t, t.to(device), class_labels=labels.to(device)).sample
    err = (pred.float() - noise.to(device)) ** 2
    if reduction == "mean":
        return err.mean()
    if reduction == "sum":
        return err.flatten(1).sum(1).mean()
    return err.flatten(1).mean(1)


def random_flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each image mirrored left-right with probability 1/2 (torchvision RandomHorizontalFlip, the official data
    transform with random_flip: true)."""
    flip = torch.rand(len(x), generator=g) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)
