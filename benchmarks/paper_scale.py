"""SFD at the paper's scale, without data: SFD reads no images, so its cost at full scale can be measured anywhere.

The teacher is the CIFAR-10 DDPM of the official code (the `paper` preset's recipe: the official network, channels
128, multipliers 1-2-2-2, 2 residual blocks per level, attention at 16x16, 38.6M parameters, 32x32x3), randomly initialised
(weights do not change the cost). SFD runs its own loop with the paper's config (`cifar10_sfd.yml`) for a few
iterations; the paper's batch is 128 retained + 128 forgotten images. On a CPU that batch takes minutes per
iteration, so it is measured at small batches and projected linearly per image (two batches check that the time
per image is flat); on CUDA the paper's batch itself is measured. The projection is the paper's 50k iterations.
"""

from __future__ import annotations

import torch

from bench.data import make_dataset
from bench.models.unet import build_unet
from bench.presets import get_preset
from bench.registry import METHODS
from bench.sampling import DiffusionModel
from benchmarks.common import iteration_flops, iteration_seconds, markdown, matmul_peak, publish


def run(device: torch.device, *, amp: bool = False, batch_sizes: tuple[int, ...] | None = None,
        iterations: int = 3, recipe=None) -> dict:  # fmt: skip
    paper = get_preset("paper")
    recipe = recipe or paper.teacher
    if batch_sizes is None:
        batch_sizes = (128,) if device.type == "cuda" else (1, 2)
    config = METHODS.get("sfd").Config()
    torch.manual_seed(0)
    unet = build_unet(recipe, image_size=32, channels=3, num_classes=10)
    teacher = DiffusionModel(unet)
    dataset = make_dataset("cifar10", image_size=32)  # only its class list: no image is read
    forget_set = dataset.forget_set("class-0")
    common = {"preset": "paper", "device": device}
    flops_per_image = iteration_flops(
        "sfd", teacher, dataset, forget_set, overrides={"batch_size": 1}, **common
    )
    rows = []
    for b in batch_sizes:
        per_step = iteration_seconds("sfd", teacher, dataset, forget_set, overrides={"batch_size": b}, amp=amp,
                                     iterations=iterations + 1, **common)[1:]  # fmt: skip  # first: set-up
        seconds = sorted(per_step)[len(per_step) // 2]
        rows.append({"batch_size": b, "seconds_per_iteration": seconds, "seconds_per_image": seconds / b,
                     "gflop_per_s": flops_per_image * b / seconds / 1e9})  # fmt: skip
    nearest = min(rows, key=lambda r: abs(r["batch_size"] - config.batch_size))
    per_iteration = nearest["seconds_per_image"] * config.batch_size
    peak = matmul_peak(device, amp)
    figures = {
        "device": str(device), "amp": amp, "parameters": sum(p.numel() for p in unet.parameters()),
        "paper_batch_size": config.batch_size, "paper_iterations": config.iterations,
        "gflop_per_iteration_at_paper_batch": flops_per_image * config.batch_size / 1e9,
        "rows": rows,
        "projected_seconds_per_iteration": per_iteration,
        "projected_from_batch": nearest["batch_size"],
        "projected_hours": per_iteration * config.iterations / 3600,
        "fraction_of_peak": nearest["gflop_per_s"] * 1e9 / peak,
    }  # fmt: skip
    return publish("paper_scale", figures, table)


def table(figures: dict) -> str:
    rows = [[r["batch_size"], r["seconds_per_iteration"], r["seconds_per_image"], r["gflop_per_s"]]
            for r in figures["rows"]]  # fmt: skip
    measured = figures["projected_from_batch"] == figures["paper_batch_size"]
    how = "measured" if measured else f"projected from batch {figures['projected_from_batch']}"
    return (
        f"SFD on the CIFAR-10 DDPM ({figures['parameters'] / 1e6:.1f}M parameters, 32x32, random weights) on "
        f"{figures['device']}{' (bf16)' if figures['amp'] else ''}: "
        f"{figures['gflop_per_iteration_at_paper_batch']:,.0f} GFLOP per iteration at batch "
        f"{figures['paper_batch_size']} + {figures['paper_batch_size']}\n\n"
        + markdown(["batch", "s / iteration", "s / image", "GFLOP/s"], rows)
        + f"\n\npaper budget ({figures['paper_iterations']:,} iterations at batch {figures['paper_batch_size']}): "
        f"{figures['projected_seconds_per_iteration']:,.1f} s per iteration ({how}), "
        f"{figures['projected_hours']:,.0f} hours; {100 * figures['fraction_of_peak']:.0f}% of the matmul ceiling"
    )
