"""Budget calibration: each method's unlearning seconds as a fixed cost plus a cost per iteration, at the default
preset on fashion-mnist (and, `budget_calibration_text`, the text tier's methods on fashion-mnist-text), which
`bench run --budget-s S` turns into iterations (bench/budget.py).

Each method unlearns class 0 once at its preset's iteration count, with the run's clock read after every iteration
(state dumps every 50 steps, as in a run; the per-iteration probe's own time is not counted). The cost per iteration
is the mean over all but the first, (clock[n] - clock[1]) / (n - 1), and the fixed cost clock[1] less one
iteration: the set-up (SalUn's saliency mask, SFR-on's Fisher diagonals, SA's cached replay and Fisher loaded) and
the first iteration's excess, so that fixed + n per_iteration is the measured clock at the iteration count itself.
The table is written to results/benchmarks/ and, as the shipped calibration, to bench/assets/budgets.json.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from bench import budget
from bench.config import resolve_config
from bench.data import make_dataset
from bench.presets import get_preset
from bench.registry import METHODS
from bench.runner import load_models
from bench.store import atomic_write_text
from benchmarks.common import OUT, iteration_clock, markdown, publish
from benchmarks.time_to_forget import DATASET, FORGET_SET, METHODS_TIMED

# The text tier's methods that take a budget (text-uce is a closed-form edit), on its dataset's first concept.
TEXT_METHODS = ("text-esd-u", "text-esd-x", "text-finetune", "text-salun", "text-sa", "text-sfd")
TEXT_DATASET, TEXT_FORGET_SET = "fashion-mnist-text", "concept-t-shirt"


def run(device: torch.device, *, amp: bool = False, methods: tuple[str, ...] = METHODS_TIMED, preset: str = "default",
        out=OUT, asset=budget.CALIBRATION, dataset_name: str = DATASET, forget_set_name: str = FORGET_SET,
        name: str = "budget_calibration") -> dict:  # fmt: skip
    dataset = make_dataset(dataset_name, image_size=get_preset(preset).image_size)
    teacher, _, _ = load_models(dataset, get_preset(preset), device=device)
    forget_set = dataset.forget_set(forget_set_name)
    costs = {}
    for method in methods:
        n = resolve_config(METHODS.get(method), preset, {}).iterations
        clock = iteration_clock(method, teacher, dataset, forget_set, preset=preset, overrides={}, iterations=n,
                                device=device, amp=amp, checkpoint_every=50)  # fmt: skip
        if len(clock) != n or n < 2:
            raise RuntimeError(f"{method}: {len(clock)} clock readings for {n} iterations")
        per = (clock[-1] - clock[0]) / (n - 1)
        costs[method] = {"fixed_s": round(clock[0] - per, 3), "per_iteration_s": round(per, 5), "iterations": n,
                         "measured_s": round(clock[-1], 2)}  # fmt: skip
        print(f"  {method}: {costs[method]}", flush=True)
    figures = {"preset": preset, "dataset": dataset_name, "device": str(device), "amp": amp, "methods": costs}
    if asset is not None and device.type == "cpu" and not amp:
        _ship(asset, preset, dataset_name, costs, device, name)
    return publish(name, figures, table, out)


def run_text(device: torch.device, *, amp: bool = False, **kwargs) -> dict:
    """`bench perf budget_calibration_text`: the text tier's budgeted methods, into the same shipped file."""
    return run(device, amp=amp, **{"methods": TEXT_METHODS, "dataset_name": TEXT_DATASET,
                                   "forget_set_name": TEXT_FORGET_SET, "name": "budget_calibration_text", **kwargs})  # fmt: skip


def _ship(path, preset: str, dataset: str, costs: dict, device: torch.device, name: str) -> None:
    """Merge this (preset, dataset)'s costs into the shipped calibration."""
    table = json.loads(path.read_text()) if path.is_file() else {}
    table[budget.key(preset, dataset)] = {
        "machine": f"{_cpu()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads",
        "device": str(device), "torch": torch.__version__, "measured": time.strftime("%Y-%m-%d"),
        "command": f"OMP_NUM_THREADS=2 python -m bench perf {name}", "methods": costs,
    }  # fmt: skip
    atomic_write_text(path, json.dumps(table, indent=2, sort_keys=True) + "\n")
    budget._read.cache_clear()


def _cpu() -> str:
    try:
        block = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
        info = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in block.splitlines())}
        return f"{info['model name']} (family {info['cpu family']}, model {info['model']})"
    except (OSError, KeyError):
        return platform.processor() or platform.machine()


def table(figures: dict) -> str:
    headers = ["method", "iterations", "measured s", "fixed s", "s per iteration"]
    rows = [[m, c["iterations"], c["measured_s"], c["fixed_s"], c["per_iteration_s"]]
            for m, c in figures["methods"].items()]  # fmt: skip
    return markdown(headers, rows)
