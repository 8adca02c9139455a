"""Shared pieces of the benchmarks: timing, the shipped models, writing results."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.errors import BenchError
from bench.models import store

OUT = Path("results") / "benchmarks"


def timed(fn: Callable[[], object], device: torch.device, *, min_seconds: float = 2.0, warmup: int = 1,
          min_repeats: int = 3) -> float:  # fmt: skip
    """Median seconds per call of `fn` after warm-up, over at least `min_repeats` calls lasting `min_seconds`."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while sum(times) < min_seconds or len(times) < min_repeats:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def shipped(dataset: str = "fashion-mnist", preset: str = "default"):
    d = store.find_models(dataset, preset, 0)
    if d is None:
        raise BenchError(
            f"no teacher for {dataset}/{preset}: run `python -m bench pretrain --dataset {dataset}`"
        )
    store.verify(d)
    return store.load_teacher(d / "teacher"), store.load_judge(d / "judge")


def write(name: str, figures: dict, out: Path = OUT) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    meta = {"benchmark": name, "platform": platform.platform(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
    path.write_text(json.dumps({**meta, **figures}, indent=2) + "\n")
    return path
