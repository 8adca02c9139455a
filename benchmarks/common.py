"""Shared pieces of the benchmarks: timing, FLOP counting, the shipped models, a method's iterations, output."""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.config import resolve_config
from bench.context import RunContext, Runtime
from bench.errors import BenchError
from bench.models import store
from bench.presets import get_preset
from bench.registry import METHODS

OUT = Path("results") / "benchmarks"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, *, min_seconds: float = 2.0, warmup: int = 1,
          min_repeats: int = 3) -> float:  # fmt: skip
    """Median seconds per call of `fn` after warm-up, over at least `min_repeats` calls lasting `min_seconds`."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while sum(times) < min_seconds or len(times) < min_repeats:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call as torch counts them: convolutions, matmuls and attention (a multiply-add is 2 FLOPs);
    elementwise work (normalisation, activations, the optimiser) is not counted."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@cache
def matmul_peak(device: torch.device, amp: bool = False, n: int = 2048) -> float:
    """Measured FLOP/s of a square matmul (bf16 when `amp`): the practical compute ceiling of the device."""
    dtype = torch.bfloat16 if amp else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / timed(lambda: a @ b, device, min_seconds=1.0, warmup=2)


def shipped(dataset: str = "fashion-mnist", preset: str = "default"):
    d = store.find_models(dataset, preset, 0)
    if d is None:
        raise BenchError(
            f"no teacher for {dataset}/{preset}: run `python -m bench pretrain --dataset {dataset}`"
        )
    store.verify(d)
    return store.load_teacher(d / "teacher"), store.load_judge(d / "judge")


def iteration_clock(method: str, teacher, dataset, forget_set, *, preset: str, overrides: dict, iterations: int,
                    device: torch.device, amp: bool = False, checkpoint_every: int = 10**9) -> list[float]:  # fmt: skip
    """Unlearning seconds (the run's clock: set-up included, probes not) after each of `iterations` iterations of a
    method's own loop."""
    cls = METHODS.get(method)
    config = resolve_config(cls, preset, {**overrides, "iterations": iterations})
    clock: list[float] = []

    def probe(step, seconds, sampler):
        clock.append(seconds)

    with tempfile.TemporaryDirectory() as tmp:
        runtime = Runtime(device=str(device), amp=amp, progress=False, checkpoint_every=checkpoint_every,
                          probe=probe, probe_every=1)  # fmt: skip
        ctx = RunContext(run_dir=Path(tmp), seed=0, preset=get_preset(preset), dataset=dataset, forget_set=forget_set,
                         requires=cls.requires, runtime=runtime)  # fmt: skip
        teacher.unet.to(device)
        cls(config).unlearn(teacher, forget_set, ctx)
    return clock


def iteration_seconds(method: str, teacher, dataset, forget_set, **kwargs) -> list[float]:
    """Wall-clock seconds of each iteration of a method's own unlearning loop (its probe clock)."""
    clock = iteration_clock(method, teacher, dataset, forget_set, **kwargs)
    return [b - a for a, b in zip([0.0, *clock], clock, strict=False)]


def iteration_flops(method: str, teacher, dataset, forget_set, *, preset: str, overrides: dict,
                    device: torch.device) -> int:  # fmt: skip
    """FLOPs of one iteration of a method's loop (with its set-up, which for data-free methods computes nothing)."""
    return count_flops(lambda: iteration_seconds(method, teacher, dataset, forget_set, preset=preset,
                                                 overrides=overrides, iterations=1, device=device))  # fmt: skip


def write(name: str, figures: dict, out: Path = OUT) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    meta = {"benchmark": name, "platform": platform.platform(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**meta, **figures}, indent=2) + "\n")
    tmp.replace(path)
    return path


def publish(name: str, figures: dict, table: Callable[[dict], str], out: Path = OUT) -> dict:
    """Write a benchmark's figures as JSON and print its table."""
    path = write(name, figures, out)
    print(table(figures))
    print(f"written to {path}")
    return figures


def markdown(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (first column left, figures right), the form the benchmarks print and the README quotes."""

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return "–" if v is None else str(v)

    align = [":--"] + ["--:"] * (len(headers) - 1)  # names left, figures right
    lines = [headers, align, *[[cell(v) for v in r] for r in rows]]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def write_summary(tables: dict[str, str], *, argv: list[str], seconds: float, out: Path = OUT) -> Path:
    """performance.md: every table of one `bench perf` invocation, with the command and the machine."""
    head = (
        f"`python -m bench {' '.join(argv)}` on {platform.machine()} with {os.cpu_count()} CPUs "
        f"({torch.get_num_threads()} torch threads), torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}: "
        f"{seconds / 60:.1f} min in all."
    )
    body = "\n\n".join(f"### {name}\n\n{table}" for name, table in tables.items())
    out.mkdir(parents=True, exist_ok=True)
    path = out / "performance.md"
    path.write_text(f"{head}\n\n{body}\n")
    return path
