"""The judge: a small CNN classifier, registered with timm, whose penultimate features serve FID."""

from __future__ import annotations

import torch
from timm.models import register_model
from torch import nn


class JudgeCNN(nn.Module):
    """Conv-BN-ReLU stages with max-pooling between them, global average pooling and a linear head.

    It follows timm's split into `forward_features` / `forward_head` so it can stand where a timm model does.
    """

    def __init__(self, in_chans: int = 1, num_classes: int = 10, widths: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_chans
        for i, w in enumerate(widths):
            if i:
                layers.append(nn.MaxPool2d(2))
            for _ in range(2):
                layers += [
                    nn.Conv2d(c, w, 3, padding=1, bias=False),
                    nn.BatchNorm2d(w),
                    nn.ReLU(inplace=True),
                ]
                c = w
        self.features = nn.Sequential(*layers)
        self.num_features = c
        self.head = nn.Linear(c, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, num_features) of images in [-1, 1]."""
        return self.features(x).mean(dim=(2, 3))

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def bench_judge_cnn(pretrained: bool = False, **kwargs) -> JudgeCNN:
    """`timm.create_model("bench_judge_cnn", in_chans=1, num_classes=10, widths=...)`."""
    if pretrained:
        raise ValueError("bench_judge_cnn has no hub weights; load a trained judge from the model store")
    return JudgeCNN(**kwargs)


@torch.no_grad()
def judge_probs(
    judge: nn.Module, images: torch.Tensor, *, batch_size: int = 1000, device="cpu"
) -> torch.Tensor:
    """Class probabilities (N, K) of images in [-1, 1], computed in batches; returned on the CPU."""
    judge.to(device).eval()
    out = [judge(images[i : i + batch_size].to(device)).float().softmax(-1).cpu()
           for i in range(0, len(images), batch_size)]  # fmt: skip
    return torch.cat(out)
