"""Tiny models and contexts for fast method tests on CPU."""

from __future__ import annotations

from pathlib import Path

import torch

from bench.context import RunContext, Runtime
from bench.data.fashion_mnist import FashionMNIST
from bench.models.unet import build_unet
from bench.presets import TeacherRecipe, get_preset
from bench.sampling import DiffusionModel

TINY = TeacherRecipe(block_out_channels=(8, 16), layers_per_block=1, attention=(False, False), norm_num_groups=4,
                     steps=0, batch_size=8, lr=1e-3, warmup_steps=0, ema_decay=0.9)  # fmt: skip


def tiny_teacher(seed: int = 0, image_size: int = 8, num_classes: int = 10) -> DiffusionModel:
    torch.manual_seed(seed)
    return DiffusionModel(build_unet(TINY, image_size=image_size, channels=1, num_classes=num_classes).eval())


def tiny_context(run_dir: Path, data_dir: Path, *, requires=frozenset(), checkpoint_every: int = 2,
                 forget: str = "class-0", seed: int = 0) -> RunContext:  # fmt: skip
    ds = FashionMNIST(data_dir=data_dir, image_size=8)
    run_dir.mkdir(parents=True, exist_ok=True)
    return RunContext(run_dir=run_dir, seed=seed, preset=get_preset("smoke"), dataset=ds,
                      forget_set=ds.forget_set(forget), requires=frozenset(requires),
                      runtime=Runtime(checkpoint_every=checkpoint_every, progress=False))  # fmt: skip


class Killed(Exception):
    """Stands for the process being killed right after a state dump."""


def kill_after_saves(ctx: RunContext, saves: int) -> RunContext:
    real = ctx.save_state
    count = {"n": 0}

    def save_then_maybe_die(state):
        real(state)
        count["n"] += 1
        if count["n"] == saves:
            raise Killed

    ctx.save_state = save_then_maybe_die
    return ctx


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
