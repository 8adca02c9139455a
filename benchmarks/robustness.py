"""Robustness cost: the whole attack suite (attacks/) on one finished run at the default preset, per attack.

The run is `original` (a diffusion model, so every attack applies, the concealment probe included, and no
unlearning cost is mixed in): it is run once into results/benchmarks/runs/ and reused; its attacks are redone at
every call. The budget is 3 minutes for the whole suite on 2 CPU cores (issue 13); each attack's seconds come from
its DONE record (bench/attack.py), the total from the wall-clock around all of them (models and data loading too).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from bench import attack
from bench.config import RunSpec
from bench.context import Runtime
from bench.registry import ATTACKS
from bench.runner import execute
from benchmarks.common import OUT, markdown, publish

BUDGET_S = 180.0


def run(device: torch.device, *, amp: bool = False, preset: str = "default", method: str = "original",
        attacks: tuple[str, ...] | None = None, out: Path = OUT, run_dir: Path | None = None) -> dict:  # fmt: skip
    """`run_dir`: attack that finished run instead of making (or reusing) one in OUT/runs/."""
    names = list(attacks or ATTACKS.names())
    runtime = Runtime(device=str(device), amp=amp, progress=False)
    if run_dir is None:
        spec = RunSpec(method=method, dataset="fashion-mnist", forget_set="class-0", seed=0, preset=preset)
        run_dir = execute(spec, out, runtime)  # reused when it is finished
    d = Path(run_dir)
    spec = json.loads((d / "spec.json").read_text())
    shutil.rmtree(d / attack.FOLDER, ignore_errors=True)
    t0 = time.perf_counter()
    status = attack.attack_run(d, names, runtime)
    total = time.perf_counter() - t0
    attack.raise_failures({d.name: status})
    rows = []
    for name in names:
        record = json.loads((d / attack.FOLDER / name / attack.DONE).read_text())
        rows.append({"attack": name, "seconds": record["seconds"], "rows": record["rows"],
                     "status": status[name]})  # fmt: skip
    figures = {"device": str(device), "amp": amp, "preset": spec["preset"], "method": spec["method"],
               "threads": torch.get_num_threads(),
               "attacks": rows, "total_s": total, "budget_s": BUDGET_S, "within_budget": total <= BUDGET_S}  # fmt: skip
    return publish("robustness", figures, table, out)


def table(figures: dict) -> str:
    rows = [[r["attack"], r["seconds"], r["rows"]] for r in figures["attacks"]]
    rows.append(["all (with loading)", figures["total_s"], sum(r["rows"] for r in figures["attacks"])])
    head = (f"the attack suite on one `{figures['method']}` run, preset {figures['preset']}, on {figures['device']} "
            f"({figures['threads']} threads): {figures['total_s']:,.0f} s of a {figures['budget_s']:.0f} s budget")  # fmt: skip
    return head + "\n\n" + markdown(["attack", "seconds", "rows"], rows)
