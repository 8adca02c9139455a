"""Time to forget: forget accuracy and fd_judge against unlearning wall-clock, for each method at the default
preset, with the peak memory and the harness's own share of each run's wall-clock.

Each method runs as a complete default run (the runner's `execute`, into results/benchmarks/runs/, in a process of
its own) whose probe, every 1/`probes` of the method's iterations, samples a small fixed grid (`forget_per_class`
images of the forgotten class, `retain_per_class` of each retained one; the same seeds for every method and probe)
with the run's sampler and scores it with the run's evaluators. Probe time is not unlearning time. The runner's
timings.json of the same runs gives the share of wall-clock outside model compute (loading, writing, bookkeeping),
and its peak resident memory (of the whole process: Python, torch, the loaded models, the evaluation grid's
sampling) the memory figure. `bench report` plots the curves from time_to_forget.json.
"""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from bench import store
from bench.api import EvalContext, SampleSet
from bench.config import RunSpec, resolve_config
from bench.context import Runtime
from bench.data import make_dataset
from bench.presets import condition_name, get_preset
from bench.registry import METHODS
from bench.runner import execute, load_models, process_memory_mb
from benchmarks.common import OUT, markdown, publish
from evaluators.fid import FID
from evaluators.forget_accuracy import ForgetAccuracy

# Every unlearning method but the oracle (and the `sid` control).
METHODS_TIMED = ("sfd", "finetune", "esd", "esd-new", "sa", "salun", "sfron", "ga", "rl", "erasediff")
DATASET, FORGET_SET = "fashion-mnist", "class-0"


class ProbeGrid:
    """A small fixed grid (more images of the forgotten class, whose accuracy is the curve) scored like a run."""

    def __init__(
        self, preset: str, device: torch.device, amp: bool, forget_per_class: int, retain_per_class: int
    ):
        self.preset, self.device, self.amp = get_preset(preset), device, amp
        dataset = make_dataset(DATASET, image_size=self.preset.image_size)
        forget_set = dataset.forget_set(FORGET_SET)
        self.teacher, judge, _ = load_models(dataset, self.preset, device=device)
        per_class = [forget_per_class if c in forget_set.forget else retain_per_class
                     for c in range(dataset.num_classes)]  # fmt: skip
        self.labels = torch.arange(dataset.num_classes).repeat_interleave(torch.tensor(per_class))
        self.seeds = [7_000_003 + i for i in range(len(self.labels))]  # not the evaluation grid's seeds
        self.ectx = EvalContext(dataset=dataset, forget_set=forget_set, judge=judge, device=device)

    def score(self, sampler) -> dict[str, float]:
        p = self.preset
        images = sampler.sample(self.labels, self.seeds, steps=p.sampler_steps, guidance=p.guidance, eta=p.eta,
                                device=self.device, amp=self.amp)  # fmt: skip
        samples = SampleSet(images, self.labels, nfe=0, sample_s=0.0, unlearn_s=0.0, peak_mem_mb=0.0)
        rows = [*ForgetAccuracy()(samples, self.ectx), *FID()(samples, self.ectx)]
        return {f"{m.name}_{m.subset}" if m.name == "accuracy" else m.name: v for m, v, _ in rows}


def run(device: torch.device, *, amp: bool = False, methods: tuple[str, ...] = METHODS_TIMED, preset: str = "default",
        probes: int = 5, forget_per_class: int = 24, retain_per_class: int = 8, out: Path = OUT) -> dict:  # fmt: skip
    grid = (preset, device, amp, forget_per_class, retain_per_class)
    here = ProbeGrid(*grid)
    reference = here.score(here.teacher)
    points, summary = [], []
    # One fresh process per method, so that its peak resident memory is its own and not what earlier runs left.
    spawn = multiprocessing.get_context("spawn")
    for method in methods:
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:
            curve, run_summary = pool.submit(_timed_run, method, grid, probes, out).result()
        points += curve
        summary.append(run_summary)
    total = sum(s["timings"]["total_s"] for s in summary)
    overhead = sum(s["timings"]["overhead_s"] for s in summary)
    figures = {
        "device": str(device), "amp": amp, "preset": preset, "dataset": DATASET, "forget_set": FORGET_SET,
        "probe_grid": {"forget_per_class": forget_per_class, "retain_per_class": retain_per_class, "probes": probes},
        "reference": {"method": "original", **reference}, "points": points, "runs": summary,
        "overhead_fraction": overhead / total, "runs_total_s": total,
    }  # fmt: skip
    return publish("time_to_forget", figures, table, out)


def _timed_run(method: str, grid: tuple, probes: int, out: Path) -> tuple[list[dict], dict]:
    """One default run of `method` with the probe; its curve and its final figures."""
    grid = ProbeGrid(*grid)
    preset, device = grid.preset.name, grid.device
    iterations = resolve_config(METHODS.get(method), preset, {}).iterations
    curve: list[dict] = []

    def probe(step, seconds, sampler):
        curve.append({"method": method, "step": step, "seconds": seconds, **grid.score(sampler)})

    runtime = Runtime(device=str(device), amp=grid.amp, probe=probe, probe_every=max(1, iterations // probes))
    spec = RunSpec(method=method, dataset=DATASET, forget_set=FORGET_SET, seed=0, preset=preset)
    rss_before = process_memory_mb("VmRSS")
    d = execute(spec, out, runtime, force=True)
    main = condition_name(get_preset(preset).guidance)  # the main protocol's figures, as the probes sample
    final = {(r["metric"], r["subset"]): r["value"] for r in store.read_metrics(d / "metrics.jsonl")
             if r.get("condition", main) == main}  # fmt: skip
    chance = 1 / grid.ectx.dataset.num_classes
    gone = next((c["seconds"] for c in curve if c["accuracy_forget"] <= chance + 1e-6), None)
    return curve, {
        "method": method, "iterations": iterations, "unlearn_s": final[("unlearn_s", "all")],
        "seconds_to_chance": gone, "accuracy_forget": final[("accuracy", "forget")],
        "accuracy_retain": final[("accuracy", "retain")], "fd_judge": final[("fd_judge", "retain")],
        "peak_mem_mb": final[("peak_mem_mb", "all")], "resident_before_mb": rss_before,
        "timings": json.loads((d / "timings.json").read_text()),
    }  # fmt: skip


def table(figures: dict) -> str:
    headers = ["method", "iterations", "unlearn s", "s to chance", "forget acc. %", "retain acc. %", "fd_judge",
               "peak MiB", "harness overhead"]  # fmt: skip
    rows = [[s["method"], s["iterations"], s["unlearn_s"], s["seconds_to_chance"], 100 * s["accuracy_forget"],
             100 * s["accuracy_retain"], s["fd_judge"], s["peak_mem_mb"],
             f"{100 * s['timings']['overhead_fraction']:.1f}%"] for s in figures["runs"]]  # fmt: skip
    ref = figures["reference"]
    return (
        markdown(headers, rows)
        + f"\n\nteacher on the probe grid: forget accuracy {100 * ref['accuracy_forget']:.0f}%, fd_judge "
        f"{ref['fd_judge']:.2f}; harness overhead over all runs: {100 * figures['overhead_fraction']:.1f}% of "
        f"{figures['runs_total_s']:,.0f} s"
    )
