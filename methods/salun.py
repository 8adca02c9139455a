"""SalUn (Fan et al., "SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency in Both Image
Classification and Generation", ICLR 2024, arXiv 2310.12508), its class-conditional DDPM version.

1. Saliency mask (official `DDPM/runners/diffusion.py::generate_mask`): over real forget images, accumulate the
   gradient of the DDPM loss of the guided prediction (cond_scale 2, i.e. guidance 3), each batch's gradient
   norm-clipped to 1 first; keep the top `mask_ratio` (50%) of all weights by |accumulated gradient|, globally.
2. Unlearning (`saliency_unlearn --method rl`), with gradients multiplied by the mask before each Adam step:

     L = MSE( eps_theta(x_t, c_f), stop-grad eps_theta(x_t, c') )  +  alpha l(x_r, c_r)

   x_t a noised real forget image, MSE averaged over elements; l the DDPM loss summed over pixels on real retained
   images with 10% label dropout; antithetic times. The paper calls c' a random label; the official code fixes
   c' = (c_f + 1) mod K ('next' here: the next retained class, the same for a single forgotten class);
   'random' draws c' uniformly from the retained classes for every image.

The official forward passes of the forget term also drop labels with p 0.1 (the model's default cond_drop_prob);
we follow the paper's equation there and drop labels only in the retained term. Masked weights never move: their
gradients are exactly zero, so Adam's moments stay zero (no weight decay in the official config).
Defaults: `DDPM/configs/cifar10_saliency_unlearn.yml`, README (alpha 1e-3, mask ratio 0.5).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from bench.api import (
    DECAY,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    ForgetSet,
    Method,
    Range,
    Scaled,
    param,
)
from bench.errors import BenchError
from bench.models.unet import noise_schedule
from bench.registry import METHODS
from bench.sampling import DiffusionModel, autocast
from methods.sa import antithetic_timesteps, denoising_loss, drop_labels

SRC = "SalUn DDPM/configs/cifar10_saliency_unlearn.yml"
RELABELS = ("next", "random")


def saliency_mask(grads: dict[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """1 for the round(ratio * N) weights of largest |gradient| over all tensors together, 0 elsewhere."""
    flat = torch.cat([g.abs().flatten() for g in grads.values()])
    keep = torch.zeros(len(flat), dtype=torch.bool)
    keep[torch.topk(flat, int(len(flat) * ratio), sorted=False).indices] = True
    out, i = {}, 0
    for name, g in grads.items():
        out[name] = keep[i : i + g.numel()].view_as(g).to(g.dtype)
        i += g.numel()
    return out


def effective_alpha(cfg, image_shape: tuple[int, int, int]) -> float:
    """alpha for this image size: alpha x (alpha_pixels / C*H*W), so alpha x D is CIFAR-10's at any resolution
    (on CIFAR-10 at 32x32 it is alpha itself)."""
    pixels = image_shape[0] * image_shape[1] * image_shape[2]
    return cfg.alpha * cfg.alpha_pixels / pixels if cfg.alpha_pixels else cfg.alpha


def relabel_loss(eps_forget: torch.Tensor, eps_relabel: torch.Tensor) -> torch.Tensor:
    """MSE(eps_theta(x_t, c_f), stop-grad eps_theta(x_t, c')), mean over all elements (torch MSELoss)."""
    return (eps_forget.float() - eps_relabel.detach().float()).square().mean()


def relabel_targets(
    choice: str, labels: torch.Tensor, forget_set: ForgetSet, g: torch.Generator
) -> torch.Tensor:
    """c' for each forgotten label: the next retained class cyclically ('next'), or a random retained class."""
    retain = torch.tensor(forget_set.retain)
    if choice == "random":
        return retain[torch.randint(len(retain), (len(labels),), generator=g)]
    if choice == "next":
        k = len(forget_set.forget) + len(forget_set.retain)
        nxt = {
            c: next((c + j) % k for j in range(1, k) if (c + j) % k in forget_set.retain)
            for c in forget_set.forget
        }
        return torch.tensor([nxt[int(c)] for c in labels])
    raise BenchError(f"salun.relabel={choice!r}: expected one of {', '.join(RELABELS)}")


def apply_mask(params: dict[str, nn.Parameter], mask: dict[str, torch.Tensor]) -> None:
    """Zero the gradient of every non-salient weight."""
    for name, p in params.items():
        if p.grad is not None:
            p.grad.mul_(mask[name])


def mask_gradients(unet: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, guidance: float,
                   grad_clip: float, g: torch.Generator, device: torch.device, amp: bool = False):  # fmt: skip
    """Sum over forget batches of the clipped gradient of the guided DDPM loss (SalUn's generate_mask)."""
    model = DiffusionModel(unet)
    abar = noise_schedule().alphas_cumprod
    total = {n: torch.zeros_like(p) for n, p in unet.named_parameters()}
    perm = torch.randperm(len(x), generator=g)
    for i in range(0, len(x), batch_size):
        idx = perm[i : i + batch_size]
        t = antithetic_timesteps(len(idx), g)
        noise = torch.randn(x[idx].shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = (a.sqrt() * x[idx] + (1 - a).sqrt() * noise).to(device)
        unet.zero_grad(set_to_none=True)
        with autocast(device, amp):
            pred = model.eps(x_t, t.to(device), y[idx].to(device), guidance)
        (noise.to(device) - pred.float()).square().sum(dim=(1, 2, 3)).mean().backward()
        nn.utils.clip_grad_norm_(unet.parameters(), grad_clip)
        for n, p in unet.named_parameters():
            if p.grad is not None:
                total[n] += p.grad
    unet.zero_grad(set_to_none=True)
    return {n: v.cpu() for n, v in total.items()}


@dataclass(frozen=True)
class SalUnConfig:
    iterations: int = param(1000, f"{SRC} training.n_iters", valid=POSITIVE)
    batch_size: int = param(
        128, f"{SRC} training.batch_size (forget and retained batches each)", valid=POSITIVE
    )
    lr: float = param(1e-4, f"{SRC} optim.lr (Adam, no weight decay)", valid=POSITIVE)
    adam_beta1: float = param(0.9, f"{SRC} optim.beta1", valid=DECAY)
    adam_eps: float = param(1e-8, f"{SRC} optim.eps", valid=POSITIVE)
    grad_clip: float = param(1.0, f"{SRC} optim.grad_clip (norm, before masking)", valid=POSITIVE)
    alpha: float = param(
        1e-3, "SalUn DDPM/README.md --alpha 1e-3 (maintainers, issue #19)", valid=NON_NEGATIVE
    )
    alpha_pixels: int = param(
        3 * 32 * 32,
        "the image size alpha 1e-3 was chosen at (CIFAR-10, 3x32x32): the forget term is a per-element "
        "mean and the retained term a per-pixel sum, so alpha is rescaled by alpha_pixels / (C*H*W) to keep the "
        "retained term's weight per element (0: alpha as given)",
        valid=Range(0),
    )
    relabel: str = param(
        "next", "SalUn runners/diffusion.py: pseudo_c = (label_to_forget + 1) % 10; or 'random'"
    )
    label_dropout: float = param(0.1, "SalUn model.cond_drop_prob (retained term)", valid=FRACTION)
    mask_ratio: float = param(
        0.5, "SalUn DDPM/train.py --mask_ratio 0.5 (threshold_list [0.5])", valid=FRACTION
    )
    mask_guidance: float = param(
        3.0,
        "SalUn DDPM/train.py --cond_scale 2.0 in generate_mask (= guidance 3 here)",
        valid=NON_NEGATIVE,
    )
    mask_images: int = param(
        0, "SalUn generate_mask: one pass over all forget images (0 = all)", valid=Range(0)
    )


@METHODS.register("salun")
class SalUn(Method):
    name = "salun"
    version = "1"
    paper = "Fan et al., SalUn, ICLR 2024 (arXiv 2310.12508); random-label variant with a 50% saliency mask"
    Config = SalUnConfig
    requires = frozenset({"forget", "retain"})
    starts_from = "raw"  # runners/diffusion.py::saliency_unlearn and generate_mask load states[0], no EMA
    scaled = {
        "smoke": Scaled({"iterations": 3, "batch_size": 4, "mask_images": 8}, "seconds-long test runs"),
        "default": Scaled(
            {"iterations": 80, "batch_size": 128, "mask_images": 1024},
            "CPU budget (about 90 s on 2 cores): 80 iterations instead of 1000, the saliency mask from 1024 "
            "forget images (8 batches) instead of all of them.",
        ),
    }  # fmt: skip

    def anchors(self, forget_set):
        if self.config.relabel == "random":
            return forget_set.retain
        targets = relabel_targets("next", torch.tensor(forget_set.forget), forget_set, torch.Generator())
        return tuple(sorted(set(targets.tolist())))

    def validate(self, forget_set):
        relabel_targets(self.config.relabel, torch.tensor(forget_set.forget), forget_set, torch.Generator())

    def unlearn(self, teacher, forget_set, ctx):
        cfg = self.config
        self.validate(forget_set)
        dev, null = ctx.device, teacher.num_classes
        x_f, y_f = ctx.data("forget")
        x_r, y_r = ctx.data("retain")
        unet = copy.deepcopy(self.start_weights(teacher).unet).to(dev)  # the mask is computed there too
        params = dict(unet.named_parameters())
        g = ctx.generator("salun")
        opt = torch.optim.Adam(unet.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, 0.999), eps=cfg.adam_eps)
        start = 0
        if (state := ctx.load_state()) is not None:
            unet.load_state_dict(state["unet"])
            opt.load_state_dict(state["opt"])
            mask, start = {k: v.float() for k, v in state["mask"].items()}, state["step"]
        else:
            n_mask = cfg.mask_images or len(x_f)
            pick = torch.randperm(len(x_f), generator=g)[:n_mask]
            unet.eval()
            grads = mask_gradients(unet, x_f[pick], y_f[pick], batch_size=cfg.batch_size, guidance=cfg.mask_guidance,
                                   grad_clip=cfg.grad_clip, g=g, device=dev, amp=ctx.amp)  # fmt: skip
            mask = saliency_mask(grads, cfg.mask_ratio)
        mask = {k: v.to(dev) for k, v in mask.items()}
        alpha = effective_alpha(cfg, teacher.image_shape)
        unet.train()
        n = cfg.batch_size
        bar = ctx.progress(cfg.iterations, self.name, initial=start)
        for step in range(start, cfg.iterations):
            ir = torch.randint(len(x_r), (n,), generator=g)
            c_r = drop_labels(y_r[ir], cfg.label_dropout, null, g)
            t_r, e_r = antithetic_timesteps(n, g), torch.randn(x_r[ir].shape, generator=g)
            loss_retain = denoising_loss(
                unet, x_r[ir].to(dev), c_r.to(dev), t_r.to(dev), e_r.to(dev), amp=ctx.amp
            )

            i_f = torch.randint(len(x_f), (n,), generator=g)
            t_f, e_f = antithetic_timesteps(n, g), torch.randn(x_f[i_f].shape, generator=g)
            c_new = relabel_targets(cfg.relabel, y_f[i_f], forget_set, g)
            abar = noise_schedule().alphas_cumprod[t_f].view(-1, 1, 1, 1)
            x_t = (abar.sqrt() * x_f[i_f] + (1 - abar).sqrt() * e_f).to(dev)
            t_f = t_f.to(dev)
            with autocast(dev, ctx.amp):
                eps_forget = unet(x_t, t_f, class_labels=y_f[i_f].to(dev)).sample
                with torch.no_grad():
                    eps_new = unet(x_t, t_f, class_labels=c_new.to(dev)).sample
            loss_forget = relabel_loss(eps_forget, eps_new)

            loss = loss_forget + alpha * loss_retain
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
            apply_mask(params, mask)
            opt.step()
            bar.update()
            ctx.log(step + 1, loss=loss.item(), forget=loss_forget.item(), retain=loss_retain.item())
            ctx.probe(step + 1, lambda: DiffusionModel(unet))
            if ctx.should_save(step + 1):
                ctx.save_state({"unet": unet.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                                "mask": {k: v.bool().cpu() for k, v in mask.items()}})  # fmt: skip
        bar.close()
        return DiffusionModel(unet.eval())
