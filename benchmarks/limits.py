"""The machine's limit: the measured matmul throughput (the practical compute ceiling), the FLOPs of each model
and step (torch's flop counter), and the fraction of the ceiling that sampling, evaluation and training reach.

The same script runs unchanged on CUDA (`--device cuda`, `--amp` for bf16 autocast, whose ceiling is then the
bf16 matmul's).
"""

from __future__ import annotations

import copy

import torch

from bench.config import resolve_config
from bench.data import make_dataset
from bench.presets import get_preset
from bench.registry import METHODS
from bench.sampling import autocast
from bench.training import ddpm_loss
from benchmarks.common import (
    count_flops,
    iteration_flops,
    iteration_seconds,
    markdown,
    matmul_peak,
    publish,
    shipped,
    timed,
)


def run(device: torch.device, *, amp: bool = False, sample_batch: int = 250, train_batch: int = 128,
        sfd_iterations: int = 6) -> dict:  # fmt: skip
    preset = get_preset("default")
    peak = matmul_peak(device, amp)
    teacher, judge = shipped()
    unet, judge = teacher.unet.to(device), judge.to(device).eval()
    shape, k = teacher.image_shape, teacher.num_classes
    g = torch.Generator().manual_seed(0)
    x = torch.randn((sample_batch, *shape), generator=g).to(device)
    t = torch.randint(1000, (sample_batch,), generator=g).to(device)
    y = (torch.arange(sample_batch) % k).to(device)

    @torch.no_grad()
    def unet_forward():
        with autocast(device, amp):
            return unet.eval()(x, t, class_labels=y).sample

    @torch.no_grad()
    def judge_forward():
        with autocast(device, amp):
            return judge(x)

    x0, y0 = x[:train_batch].cpu(), y[:train_batch].cpu()
    trainee = copy.deepcopy(unet)  # the teacher itself stays as shipped for the SFD measurement below
    opt = torch.optim.Adam(trainee.parameters(), lr=preset.teacher.lr)

    def train_step():
        loss = ddpm_loss(trainee.train(), x0, y0, g, device=device, amp=amp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rows = []
    for name, unit, n, fn in (
        ("teacher UNet forward (one sampling step)", "image", sample_batch, unet_forward),
        ("judge forward (forget accuracy, fd_judge features)", "image", sample_batch, judge_forward),
        ("teacher training step (DDPM loss, Adam)", "image", train_batch, train_step),
    ):
        flops = count_flops(fn) / n
        seconds = timed(fn, device) / n
        rows.append(_row(name, unit, n, flops, seconds, peak))
    teacher.unet.to("cpu")

    # SFD's own loop at the default preset (a batch of retained and one of forgotten classes per iteration);
    # the dataset only names the classes: SFD reads no image.
    dataset = make_dataset("fashion-mnist", image_size=preset.image_size)
    forget_set = dataset.forget_set("class-0")
    common = {"preset": "default", "overrides": {}}
    flops = iteration_flops("sfd", teacher, dataset, forget_set, device=device, **common)
    per_step = iteration_seconds("sfd", teacher, dataset, forget_set, iterations=sfd_iterations, device=device,
                                 amp=amp, **common)[1:]  # fmt: skip  # the first includes the set-up
    seconds = sorted(per_step)[len(per_step) // 2]
    n = resolve_config(METHODS.get("sfd"), "default", {}).batch_size
    rows.append(_row("SFD iteration (default preset)", "iteration", f"{n}+{n}", flops, seconds, peak))

    figures = {"device": str(device), "amp": amp, "matmul_peak_gflop_per_s": peak / 1e9, "rows": rows}
    return publish("limits", figures, table)


def _row(name: str, unit: str, batch: int | str, flops: float, seconds: float, peak: float) -> dict:
    return {"name": name, "unit": unit, "batch": batch, "gflop_per_unit": flops / 1e9, "units_per_s": 1 / seconds,
            "gflop_per_s": flops / seconds / 1e9, "fraction_of_peak": flops / seconds / peak}  # fmt: skip


def table(figures: dict) -> str:
    head = f"matmul ceiling: {figures['matmul_peak_gflop_per_s']:.0f} GFLOP/s ({figures['device']}" + (
        ", bf16)" if figures["amp"] else ", fp32)"
    )
    rows = [[r["name"], r["batch"], r["gflop_per_unit"], f"{r['units_per_s']:,.1f} {r['unit']}/s",
             r["gflop_per_s"], f"{100 * r['fraction_of_peak']:.0f}%"] for r in figures["rows"]]  # fmt: skip
    return (
        head
        + "\n\n"
        + markdown(["step", "batch", "GFLOP per unit", "throughput", "GFLOP/s", "of ceiling"], rows)
    )
