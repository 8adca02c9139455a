"""Sampling speed: the one-step generator versus the teacher's K-step DDIM and 1000-step DDPM samplers.

All three run the same network (the SFD generator has the teacher's architecture, and weights do not change
cost) on the same batch in one process, so the ratios are fair: ideally K and 1000 (x2 with guidance). The batch
is 32 so that the 1000-step sampler, timed once, lasts about half a minute on two CPU cores.
"""

from __future__ import annotations

import torch

from bench.presets import get_preset
from bench.sampling import OneStepGenerator
from benchmarks.common import markdown, publish, shipped, timed


def run(device: torch.device, *, batch_size: int = 32, amp: bool = False, ddpm_steps: int = 1000) -> dict:
    preset = get_preset("default")
    teacher, _ = shipped()
    generator = OneStepGenerator(teacher.unet, t_init=440)
    labels = torch.arange(batch_size) % teacher.num_classes
    seeds = list(range(batch_size))
    rows = {}
    cases = [("sfd one-step", generator, 1, preset.guidance, 0.0, 3.0),
             (f"teacher DDIM-{preset.sampler_steps}", teacher, preset.sampler_steps, preset.guidance, 0.0, 3.0),
             (f"teacher DDPM-{ddpm_steps}", teacher, ddpm_steps, preset.guidance, 1.0, 0.0)]  # fmt: skip
    for name, model, steps, guidance, eta, min_s in cases:

        def once(model=model, steps=steps, guidance=guidance, eta=eta):
            return model.sample(labels, seeds, steps=steps, guidance=guidance, eta=eta, batch_size=batch_size,
                                device=device, amp=amp)  # fmt: skip

        # The 1000-step sampler is timed once: one call already lasts minutes on a CPU.
        seconds = timed(
            once, device, min_seconds=min_s, warmup=1 if min_s else 0, min_repeats=3 if min_s else 1
        )
        rows[name] = {"nfe": model.nfe(steps=steps, guidance=guidance), "seconds_per_batch": seconds,
                      "images_per_s": batch_size / seconds}  # fmt: skip
    base = rows["sfd one-step"]["images_per_s"]
    for r in rows.values():
        r["one_step_speedup"] = base / r["images_per_s"]
    figures = {"device": str(device), "batch_size": batch_size, "amp": amp, "rows": rows}
    return publish("sampling", figures, table)


def table(figures: dict) -> str:
    rows = [
        [name, r["nfe"], r["images_per_s"], f"{r['one_step_speedup']:,.1f}x"]
        for name, r in figures["rows"].items()
    ]
    head = f"batch {figures['batch_size']} on {figures['device']}{' (bf16)' if figures['amp'] else ''}"
    return head + "\n\n" + markdown(["sampler", "NFE", "images/s", "one-step speed-up"], rows)
