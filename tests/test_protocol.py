"""Protocol fixes of the fidelity audit (issue 12): what each metric is scored against, each control's objective."""

from __future__ import annotations

import json

import torch
from torch import nn

from bench.api import EvalContext, SampleSet
from bench.cli import main
from bench.config import resolve_config
from bench.data.fashion_mnist import FashionMNIST
from bench.registry import EVALUATORS, METHODS


class Oracle(nn.Module):
    """A judge that reads the class off the first pixel (hand-made images say what it must answer)."""

    def forward(self, x):
        return torch.nn.functional.one_hot(x[:, 0, 0, 0].round().long(), 10).float() * 50


def to_anchor(predicted: list[int], anchors: tuple[int, ...]) -> float:
    images = torch.zeros(len(predicted) + 2, 1, 4, 4)
    images[: len(predicted), 0, 0, 0] = torch.tensor(predicted, dtype=torch.float)
    images[len(predicted) :, 0, 0, 0] = 5  # two retained-class images
    labels = torch.tensor([0] * len(predicted) + [5, 5])
    ds = FashionMNIST(image_size=4)
    ctx = EvalContext(dataset=ds, forget_set=ds.forget_set("class-0"), judge=Oracle(), device=torch.device("cpu"),
                      anchors=anchors)  # fmt: skip
    samples = SampleSet(images=images, labels=labels, nfe=1, sample_s=0, unlearn_s=0, peak_mem_mb=0)
    return {m.name: v for m, v, _ in EVALUATORS.get("forget_accuracy")()(samples, ctx)}["to_anchor"]


def test_to_anchor_scores_against_the_anchor_the_method_used():
    assert to_anchor([1, 1, 3, 3], ()) == 0.5  # the forget set's default anchor (class 1)
    assert to_anchor([1, 1, 3, 3], (3,)) == 0.5 and to_anchor([3, 3, 3, 1], (3,)) == 0.75
    assert to_anchor([1, 2, 3, 0], tuple(range(1, 10))) == 0.75  # random anchors: any retained class


def test_methods_report_their_anchors():
    ds = FashionMNIST(image_size=16)
    fs = ds.forget_set("class-0")

    def anchors(method, **overrides):
        cls = METHODS.get(method)
        return cls(resolve_config(cls, "default", overrides)).anchors(fs)

    assert (
        anchors("sfd") == (1,)
        and anchors("sfd", anchor="3") == (3,)
        and anchors("sfd", anchor="random") == fs.retain
    )
    assert anchors("salun") == (1,) and anchors("salun", relabel="random") == fs.retain
    assert anchors("esd") == (1,)


def test_the_run_records_and_scores_the_anchor_it_used(tmp_path, fmnist_dir):
    results = tmp_path / "r"
    argv = ["run", "--methods", "sfd", "--preset", "smoke", "--set", "sfd.anchor=3", "--results", str(results),
            "--data-dir", str(fmnist_dir)]  # fmt: skip
    assert main(argv) == 0
    (run,) = (results / "runs").iterdir()
    assert json.loads((run / "spec.json").read_text())["anchors_used"] == [3]


def test_salun_alpha_keeps_cifar10s_weight_per_element():
    """The forget term is a per-element mean, the retained term a per-pixel sum: alpha x D stays CIFAR-10's."""
    import dataclasses

    from methods.salun import SalUnConfig, effective_alpha

    cfg = SalUnConfig()
    assert effective_alpha(cfg, (3, 32, 32)) == cfg.alpha == 1e-3  # the paper's setting: unchanged
    assert effective_alpha(cfg, (1, 16, 16)) * 256 == cfg.alpha * 3072  # the default preset: 12x
    assert abs(effective_alpha(cfg, (1, 16, 16)) - 0.012) < 1e-12
    assert effective_alpha(dataclasses.replace(cfg, alpha_pixels=0), (1, 16, 16)) == 1e-3


def test_sa_replay_is_what_the_official_pngs_hold(tmp_path):
    """Against torchvision's own save_image(normalize=True) round trip, as SA's sample_classes writes them."""
    import numpy as np
    from PIL import Image
    from torchvision.utils import save_image

    from methods.sa import as_saved_png, random_flip

    g = torch.Generator().manual_seed(0)
    images = (torch.rand(6, 1, 8, 8, generator=g) * 2.4 - 1.2) * torch.linspace(0.2, 1, 6).view(-1, 1, 1, 1)
    mine = as_saved_png(images)
    for k in range(len(images)):
        save_image(((images[k] + 1) / 2).clamp(0, 1), tmp_path / f"{k}.png", normalize=True)
        png = np.asarray(Image.open(tmp_path / f"{k}.png"))[..., 0]
        assert np.array_equal(png, mine[k, 0].numpy()), k
    flipped = random_flip(images, torch.Generator().manual_seed(1))
    same = [torch.equal(flipped[k], images[k]) for k in range(6)]
    assert (
        all(s or torch.equal(flipped[k], images[k].flip(-1)) for k, s in enumerate(same))
        and 0 < sum(same) < 6
    )
