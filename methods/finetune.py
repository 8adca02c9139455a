"""`finetune`: keep training the teacher on the retained classes only (the classic "FT" unlearning baseline).

Forgetting here is only catastrophic forgetting: the forgotten class is never shown again. SalUn (Fan et al.,
ICLR 2024, Sec. 5) lists FT among its diffusion baselines; we give it SalUn's own DDPM budget (official
`DDPM/configs/cifar10_saliency_unlearn.yml`: 1000 iterations, batch 128, Adam lr 1e-4) so the two compare
at equal cost, and the teacher's own loss (DDPM epsilon MSE with 10% null-label dropout, which keeps
classifier-free guidance working).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from bench.api import FRACTION, POSITIVE, Method, Scaled, param
from bench.registry import METHODS
from bench.sampling import DiffusionModel
from bench.training import ddpm_loss


@dataclass(frozen=True)
class FinetuneConfig:
    iterations: int = param(1000, "SalUn cifar10_saliency_unlearn.yml n_iters (equal budget)", valid=POSITIVE)
    batch_size: int = param(128, "SalUn cifar10_saliency_unlearn.yml batch_size", valid=POSITIVE)
    lr: float = param(1e-4, "SalUn cifar10_saliency_unlearn.yml optim.lr", valid=POSITIVE)
    grad_clip: float = param(1.0, "SalUn/SA DDPM configs grad_clip", valid=POSITIVE)
    label_dropout: float = param(
        0.1, "teacher's CFG dropout (SA/SalUn/SFD cifar10_train.yml)", valid=FRACTION
    )
    loss: str = param(
        "sum",
        "SalUn DDPM/functions/losses.py: squared error summed over pixels, mean over the batch",
        valid=("mean", "sum"),
    )
    antithetic: bool = param(True, "SalUn DDPM/runners/diffusion.py: t and 999 - t")


@METHODS.register("finetune")
class Finetune(Method):
    name = "finetune"
    version = "1"
    paper = "FT baseline as in Fan et al., SalUn (ICLR 2024), Sec. 5; budget of SalUn's DDPM config"
    Config = FinetuneConfig
    requires = frozenset({"retain"})
    scaled = {
        "smoke": Scaled({"iterations": 3, "batch_size": 16}, "seconds-long test runs"),
        "default": Scaled({"iterations": 50, "batch_size": 128},
                          "CPU budget: 50 iterations (about 21 s on 2 cores) instead of 1000, trimmed from 100 to keep "
                          "the default sweep near 15 minutes: the 100-iteration run's probe grid (24 class-0 "
                          "images, guidance 3) recognised class 0 in 100% at every fifth of it, as the teacher"),
    }  # fmt: skip

    def unlearn(self, teacher, forget_set, ctx):
        cfg = self.config
        unet = copy.deepcopy(teacher.unet).to(ctx.device).train()
        opt = torch.optim.Adam(unet.parameters(), lr=cfg.lr)
        g = ctx.generator("finetune")
        x, y = ctx.data("retain")
        start = 0
        if (state := ctx.load_state()) is not None:
            unet.load_state_dict(state["unet"])
            opt.load_state_dict(state["opt"])
            start = state["step"]
        bar = ctx.progress(cfg.iterations, "finetune", initial=start)
        for step in range(start, cfg.iterations):
            idx = torch.randint(len(x), (cfg.batch_size,), generator=g)
            labels = y[idx].clone()
            labels[torch.rand(len(labels), generator=g) < cfg.label_dropout] = teacher.num_classes
            loss = ddpm_loss(unet, x[idx], labels, g, device=ctx.device, amp=ctx.amp, reduction=cfg.loss,
                             antithetic=cfg.antithetic)  # fmt: skip
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
            opt.step()
            bar.update()
            ctx.log(step + 1, loss=loss.item())
            ctx.probe(step + 1, lambda: DiffusionModel(unet))
            if ctx.should_save(step + 1):
                ctx.save_state({"unet": unet.state_dict(), "opt": opt.state_dict(), "step": step + 1})
        bar.close()
        return DiffusionModel(unet.eval())
