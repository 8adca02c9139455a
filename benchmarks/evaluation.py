"""Evaluation cost: images per second of the judge (forget accuracy), of fd_judge (judge features of the real and
generated images plus the Frechet distance) and of the Inception-v3 features behind fid_inception.

Inputs are the default preset's: a grid of 100 generated images per class (here: real test images stand in for
them; cost does not depend on content) against the real test images of the retained classes. fid_inception runs
torch-fidelity's extractor exactly as the evaluator does; without the user's weights (--inception-weights or the
torch hub cache) it gets randomly initialised weights of the same architecture, which cost the same.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from bench.data import make_dataset
from bench.models.judge import judge_probs
from bench.presets import get_preset
from benchmarks.common import markdown, publish, shipped, timed
from evaluators.fid import frechet_distance, hub_inception_file, inception_features, load_inception


def run(device: torch.device, *, amp: bool = False, inception_images: int = 32) -> dict:
    preset = get_preset("default")
    _, judge = shipped()
    dataset = make_dataset("fashion-mnist", image_size=preset.image_size)
    forget_set = dataset.forget_set("class-0")
    x, y = dataset.images("test")
    grid = x[: preset.eval_per_class * dataset.num_classes]
    real = x[torch.isin(y, torch.tensor(forget_set.retain))]
    fake = grid[: preset.eval_per_class * len(forget_set.retain)]
    rows = []

    seconds = timed(lambda: judge_probs(judge, grid, device=device), device)
    rows.append({"name": "judge: forget accuracy of the grid", "images": len(grid), "seconds": seconds})
    seconds = timed(lambda: frechet_distance(judge, real, fake, device=device), device, min_repeats=2)
    rows.append({"name": "fd_judge: real + generated features, distance", "images": len(real) + len(fake),
                 "seconds": seconds})  # fmt: skip

    real_weights = hub_inception_file()
    with tempfile.TemporaryDirectory() as tmp:
        net, _ = load_inception(real_weights or _random_inception(Path(tmp) / "inception.pth"))
        batch = fake[:inception_images]
        seconds = timed(
            lambda: inception_features(net, batch, device=device), device, min_seconds=0, min_repeats=2
        )
    rows.append(
        {"name": "fid_inception: Inception-v3 features (299x299)", "images": len(batch), "seconds": seconds}
    )
    for r in rows:
        r["images_per_s"] = r["images"] / r["seconds"]
    inception = rows[-1]["images_per_s"]
    figures = {
        "device": str(device), "rows": rows, "real_weights": real_weights is not None,
        # fid_inception on a default run: the generated images each run, the real test split once (cached).
        "fid_inception_run_s": len(fake) / inception, "fid_inception_reference_s": len(x) / inception,
    }  # fmt: skip
    return publish("evaluation", figures, table)


def _random_inception(path: Path) -> Path:
    """FID's Inception-v3 layers (torchvision's Inception3, 1008 classes, no aux logits) with random weights."""
    from torchvision.models import Inception3

    net = Inception3(num_classes=1008, aux_logits=False, init_weights=False, transform_input=False)
    torch.save(net.state_dict(), path)
    return path


def table(figures: dict) -> str:
    rows = [[r["name"], r["images"], r["seconds"], r["images_per_s"]] for r in figures["rows"]]
    return (
        markdown(["evaluation", "images", "seconds", "images/s"], rows)
        + f"\n\nfid_inception on a default run would add {figures['fid_inception_run_s']:,.0f} s per run, plus "
        f"{figures['fid_inception_reference_s']:,.0f} s once for the real test split's features"
    )
