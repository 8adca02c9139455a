"""Matched budgets (`bench run --budget-s S`): every method unlearns for the same compute, S reference seconds.

Why seconds of a shipped calibration, not FLOPs or the live clock. A live wall-clock stop would make a run's result
depend on the machine and on what else it runs, and a resumed run would not redo the same iterations. FLOPs are
deterministic but miss what a user waits for at this scale: on 2 CPU cores ESD's batch-1 DDIM generation, SA's
replay batches and the methods' set-up (SalUn's saliency mask, SFR-on's Fisher diagonals) are dispatch- and
memory-bound, so equal FLOPs would be very unequal waits. So a method's unlearning seconds are measured once per
(preset, dataset) on a reference machine (`python -m bench perf budget_calibration`, into CALIBRATION) as a fixed
cost (its set-up and first iteration's excess) plus a cost per iteration, and the budget S becomes the number of
iterations that fits: n(S) = floor((S - fixed) / per_iteration). The run's identity holds S and n, so a run gives
the same result on every machine and after every resume; its rows carry its measured `unlearn_s` beside S.

What stays fixed: the learning rates, batch sizes and every other setting of the preset. What the budget changes:
the iteration count, and what the preset tied to it, the EMA decay (the half-life keeps its share of training:
d(n) = d(n0) ** (n0 / n), as the cards' scaled decays were chosen) and the schedules the methods compute from
`iterations` themselves (SFR-on's cosine forget weight stretches with it).
"""

from __future__ import annotations

import dataclasses
import json
import math
from functools import cache
from pathlib import Path
from typing import Any

from bench.config import resolve_config
from bench.errors import BenchError

CALIBRATION = Path(__file__).parent / "assets" / "budgets.json"
KNOB = "iterations"  # the field a budget sets
DEPENDENT = "ema_decay"  # the field that moves with it


def key(preset: str, dataset: str) -> str:
    return f"{preset}/{dataset}"


@cache
def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise BenchError(f"budget calibration {path} is unreadable ({e}): restore it from the repository, or "
                         "measure it again with `python -m bench perf budget_calibration`") from e  # fmt: skip
    return data


def calibration(preset: str, dataset: str, path: Path | None = None) -> dict[str, Any]:
    """The measured costs of every calibrated method at (preset, dataset): {method: {fixed_s, per_iteration_s, ...}}."""
    path = path or CALIBRATION
    table = _read(path)
    k = key(preset, dataset)
    if k not in table:
        have = ", ".join(table) or "none"
        raise BenchError(f"--budget-s: no budget calibration for preset {preset} on {dataset} in {path} (calibrated: "
                         f"{have}); measure one with `python -m bench perf budget_calibration` (it runs each "
                         "method once at the default preset on fashion-mnist and writes this file)")  # fmt: skip
    return table[k]["methods"]


def calibrated(path: Path | None = None) -> dict[str, dict[str, Any]]:
    """'preset/dataset' -> {method: costs} for every calibration in the file."""
    return {k: v["methods"] for k, v in _read(path or CALIBRATION).items()}


def not_budgeted(method_cls) -> str:
    """Why a method runs no budget ('' if it does)."""
    if method_cls.not_budgeted:
        return method_cls.not_budgeted
    if KNOB not in {f.name for f in dataclasses.fields(method_cls.Config)}:
        return f"its config has no {KNOB!r} to stop it at"
    return ""


def overrides(method_cls, preset: str, dataset: str, seconds: float, user: dict[str, Any],
              path: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """The settings that make `method_cls` spend `seconds` of unlearning compute: {iterations, ema_decay}."""
    name = method_cls.name
    if not (math.isfinite(seconds) and seconds > 0):
        raise BenchError(f"--budget-s {seconds!r}: expected a positive number of seconds")
    if why := not_budgeted(method_cls):
        raise BenchError(f"--budget-s: {name} runs no budget: {why}")
    if taken := sorted({KNOB, DEPENDENT} & set(user)):
        raise BenchError(f"--budget-s sets {name}.{KNOB} (and {DEPENDENT} with it); drop --set "
                         f"{', '.join(f'{name}.{t}' for t in taken)}")  # fmt: skip
    costs = calibration(preset, dataset, path)
    if name not in costs:
        raise BenchError(f"--budget-s: {name} is not in the budget calibration of preset {preset} on {dataset} "
                         f"(calibrated: {', '.join(costs)}); measure it with `python -m bench perf "
                         "budget_calibration`")  # fmt: skip
    cost = costs[name]
    n = math.floor((seconds - cost["fixed_s"]) / cost["per_iteration_s"])
    if n < 1:
        raise BenchError(f"--budget-s {seconds:g}: {name} cannot run one iteration in it: its fixed cost is "
                         f"{cost['fixed_s']:.1f} s and an iteration {cost['per_iteration_s']:.2f} s")  # fmt: skip
    out: dict[str, Any] = {KNOB: n}
    base = resolve_config(method_cls, preset, user)
    if hasattr(base, DEPENDENT):  # the half-life keeps its share of the run
        out[DEPENDENT] = round(getattr(base, DEPENDENT) ** (getattr(base, KNOB) / n), 8)
    return out


def fits(method_cls, preset: str, dataset: str, seconds: float, path: Path | None = None) -> str:
    """'' when the method can run the budget, else why not (for the sweep's listing of what it leaves out)."""
    if why := not_budgeted(method_cls):
        return why
    cost = calibration(preset, dataset, path).get(method_cls.name)
    if cost is None:
        return "not in the budget calibration"
    if seconds < cost["fixed_s"] + cost["per_iteration_s"]:
        return (f"its fixed cost ({cost['fixed_s']:.1f} s) and one iteration ({cost['per_iteration_s']:.2f} s) "
                f"exceed {seconds:g} s")  # fmt: skip
    return ""
