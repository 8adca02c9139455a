"""The default text sweep's cost: `bench run --datasets fashion-mnist-text` (every text-tier method of the default
sweep and `original`, concept-t-shirt, seed 0) from scratch with the shipped models, per run and in all.

The budget is 15 minutes on 2 CPU cores (issue 17). Each run's phases come from its timings.json (bench/runner.py),
the total from the wall-clock around the whole sweep (models, data and the FID reference statistics too).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from benchmarks.common import OUT, markdown, publish

BUDGET_S = 900.0
DATASET = "fashion-mnist-text"


def run(device: torch.device, *, amp: bool = False, preset: str = "default", methods: tuple[str, ...] = (),
        out: Path = OUT) -> dict:  # fmt: skip
    """`methods`: a subset of the sweep's (default: all of it, as `bench run` picks them)."""
    from bench.cli import main

    results = out / "text-sweep"
    shutil.rmtree(results, ignore_errors=True)  # from scratch: a finished run would be reused, not timed
    args = [
        "run",
        "--datasets",
        DATASET,
        "--preset",
        preset,
        "--results",
        str(results),
        "--device",
        str(device),
    ]
    args += ["--methods", ",".join(methods)] if methods else []
    args += ["--amp"] if amp else []
    t0 = time.perf_counter()
    if main(args) != 0:
        raise RuntimeError(f"the text sweep failed: see {results}")
    total = time.perf_counter() - t0
    rows = []
    for d in sorted((results / "runs").iterdir()):
        spec, timings = (json.loads((d / f).read_text()) for f in ("spec.json", "timings.json"))
        rows.append({"method": spec["method"], "unlearn_s": timings["unlearn_compute_s"],
                     "sample_s": timings["sample_s"], "evaluate_s": timings["evaluate_s"],
                     "total_s": timings["total_s"]})  # fmt: skip
    figures = {"device": str(device), "amp": amp, "preset": preset, "threads": torch.get_num_threads(),
               "runs": rows, "total_s": total, "budget_s": BUDGET_S, "within_budget": total <= BUDGET_S}  # fmt: skip
    return publish("text_sweep", figures, table, out)


def table(figures: dict) -> str:
    rows = [
        [r["method"], r["unlearn_s"], r["sample_s"], r["evaluate_s"], r["total_s"]] for r in figures["runs"]
    ]
    rows.append(["the sweep (with loading)", None, None, None, figures["total_s"]])
    head = (f"`bench run --datasets {DATASET} --preset {figures['preset']}` from scratch on {figures['device']} "
            f"({figures['threads']} threads): {figures['total_s']:,.0f} s of a {figures['budget_s']:.0f} s budget")  # fmt: skip
    return head + "\n\n" + markdown(["method", "unlearn s", "sample s", "evaluate s", "run s"], rows)
