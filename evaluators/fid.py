"""Frechet distance in the judge's feature space (`fd_judge`), between generated and real retained-class images.

It is not Inception FID and is never reported under that name: the judge is trained on this dataset, so the
distance is comparable across methods on one dataset and preset, not with published FIDs.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from bench.api import EvalContext, Evaluator, Metric, SampleSet
from bench.registry import EVALUATORS

FD_JUDGE = Metric("fd_judge", "retain", higher_is_better=False)


class JudgeFeatures(nn.Module):
    """torchmetrics feature extractor: the judge's penultimate features of images in [-1, 1]."""

    def __init__(self, judge: nn.Module):
        super().__init__()
        self.judge = judge
        self.num_features = judge.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.judge.forward_features(x.float())


def frechet_distance(
    judge: nn.Module, real: torch.Tensor, fake: torch.Tensor, *, device, batch_size: int = 1000
) -> float:
    """FID formula (torchmetrics) on judge features; images are float tensors in [-1, 1]."""
    judge.eval()
    fid = FrechetInceptionDistance(feature=JudgeFeatures(judge), reset_real_features=True).to(device)
    with torch.no_grad():
        for imgs, is_real in ((real, True), (fake, False)):
            for i in range(0, len(imgs), batch_size):
                fid.update(imgs[i : i + batch_size].to(device), real=is_real)
    return float(fid.compute())


@EVALUATORS.register("fid")
class FID(Evaluator):
    """fd_judge on the retained classes: generations conditioned on them vs the real test images of them."""

    name = "fid"
    version = "1"
    metrics = (FD_JUDGE,)

    def __call__(self, samples: SampleSet, ctx: EvalContext):
        retain = ctx.forget_set.retain
        keep = torch.isin(samples.labels, torch.tensor(retain))
        real, _ = ctx.dataset.images("test", retain)
        fake = samples.images[keep]
        if len(fake) < 2 or len(real) < 2:
            raise ValueError(
                "fd_judge needs at least two generated and two real images of the retained classes"
            )
        return [(FD_JUDGE, frechet_distance(ctx.judge, real, fake, device=ctx.device), len(fake))]
