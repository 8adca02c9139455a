"""Embedding inversion: freeze the unlearned network, add one new class embedding, optimise it on N real images of
the forgotten class with the model's own loss, then sample with it. If a vector exists that makes the frozen
network draw the class, the class is still in the weights, however its own label was remapped.
The class-conditional analogue of Pham et al.'s Concept Inversion ("Circumventing Concept Erasure Methods for
Text-to-Image Generative Models", ICLR 2024; NYU-DICE-Lab/circumventing-concept-erasure, esd/train.sh: 25 images,
5000 steps at batch 4 x 4, lr 5e-3 scaled by the batch, constant), scaled to the preset.
"""

from __future__ import annotations

import copy
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attacks.base import (
    ONE_STEP,
    Attack,
    AttackContext,
    Finding,
    Resume,
    as_record,
    from_record,
    rate,
    same_kind,
)
from bench.api import POSITIVE, Metric, Scaled, param
from bench.models.ddpm_official import OfficialConditionalUNet
from bench.registry import ATTACKS
from bench.sampling import Sampler, autocast
from bench.training import ddpm_loss

RECOVERED = Metric("recovered", "forget", higher_is_better=False)
SRC = "Pham et al. ICLR 2024, esd/train.sh"


class NewClass(nn.Module):
    """A diffusers class-embedding table with one trainable row appended after the null class."""

    def __init__(self, table: torch.Tensor, init: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table.detach().clone())
        self.new = nn.Parameter(init.detach().clone())

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return F.embedding(labels, torch.cat([self.table, self.new[None]]))


def with_new_class(unet: nn.Module) -> tuple[nn.Module, nn.Parameter, int]:
    """A frozen copy of the network with a new class (index K + 1, after the null class K) whose embedding, the one
    trainable parameter, starts from the null class's: the concept-neutral start, as the empty prompt."""
    net = copy.deepcopy(unet).requires_grad_(False)
    if isinstance(net, OfficialConditionalUNet):
        null = net.null_classes_emb
        net.inverted = nn.Parameter(null.detach().clone())

        def table(self, labels):
            rows = torch.cat([self.classes_emb.weight, self.null_classes_emb[None], self.inverted[None]])
            return F.embedding(labels, rows)

        net.class_embedding = types.MethodType(table, net)  # the instance's, before the class's method
        return net, net.inverted, net.config.num_classes + 1
    weight = net.class_embedding.weight
    net.class_embedding = NewClass(weight, weight[-1])
    return net, net.class_embedding.new, weight.shape[0]


@dataclass(frozen=True)
class InversionConfig:
    images: int = param(
        25, f"N real images per forgotten class ({SRC}: --num_train_images=25)", valid=POSITIVE
    )
    steps: int = param(
        300, f"optimisation steps ({SRC}: 5000, scaled to the preset's budget)", valid=POSITIVE
    )
    batch_size: int = param(16, f"images per step ({SRC}: batch 4 x 4 accumulation)", valid=POSITIVE)
    lr: float = param(0.08, f"Adam learning rate ({SRC}: 5e-3 scaled by the batch of 16, constant)",
                      valid=POSITIVE)  # fmt: skip
    per_class: int = param(100, "samples drawn with the new embedding per forgotten class", valid=POSITIVE)
    checkpoint_every: int = param(100, "steps between resumable state dumps", valid=POSITIVE)


@ATTACKS.register("inversion")
class Inversion(Attack):
    name = "inversion"
    title = "embedding inversion"
    threat = "the weights and N real training images of each forgotten class"
    requires = frozenset({"forget"})
    sources = ("Pham et al., 'Circumventing Concept Erasure Methods for Text-to-Image Generative Models', ICLR 2024 "
               "(Concept Inversion; code NYU-DICE-Lab/circumventing-concept-erasure): a class embedding in place of "
               "the text token")  # fmt: skip
    one_step = (
        "the new embedding is optimised through the frozen generator's one-step forward, G(z, e) regressed on the "
        "N images (a fresh latent per image and step): the same L2 image objective as the diffusion loss, on the "
        "only path the generator has, and samples are drawn with it in one step"
    )
    Config = InversionConfig
    scaled = {
        "smoke": Scaled({"images": 2, "steps": 2, "batch_size": 2, "per_class": 4, "checkpoint_every": 1},
                        "seconds-long test runs"),
        "paper": Scaled({"steps": 2000, "batch_size": 64, "per_class": 500}, "GPU scale"),
    }  # fmt: skip
    metrics = (RECOVERED,)

    def run(self, model: Sampler, ctx: AttackContext, resume: Resume) -> list[Finding]:
        cfg = self.config
        unit = "inversion"
        if (rows := resume.finished(unit)) is not None:
            return [from_record(r) for r in rows]
        x, y = ctx.data("forget")
        idx = ctx.choose(x, y, cfg.images, "inversion/images", exemplars=True)
        net, new, index = with_new_class(model.unet)
        net.to(ctx.device)
        attacked = same_kind(model, net)
        opt = torch.optim.Adam([new], lr=cfg.lr)
        g, step = ctx.seeded(unit), 0
        if (state := resume.current(unit)) is not None:
            with torch.no_grad():
                new.copy_(state["new"])
            opt.load_state_dict(state["opt"])
            g.set_state(state["rng"])
            step = state["step"]
        # With several forgotten classes, one embedding is fitted to all their images (the shared concept), and
        # a sample counts as recovered when the judge labels it as any of them.
        xs = x[idx.flatten()]
        bar = ctx.run.progress(cfg.steps, unit, initial=step)
        net.train()
        while step < cfg.steps:
            pick = torch.randint(len(xs), (cfg.batch_size,), generator=g)
            x0, labels = xs[pick], torch.full((cfg.batch_size,), index)
            if model.kind == ONE_STEP:
                z = torch.randn(x0.shape, generator=g)
                with autocast(ctx.device, ctx.amp):
                    out = attacked.generate(z.to(ctx.device), labels.to(ctx.device))
                loss = ((out.float() - x0.to(ctx.device)) ** 2).mean()
            else:
                loss = ddpm_loss(net, x0, labels, g, device=ctx.device, amp=ctx.amp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update()
            ctx.run.log(step, **{f"{unit}/loss": loss.item()})
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                resume.checkpoint(
                    unit, new=new.detach().cpu(), opt=opt.state_dict(), rng=g.get_state(), step=step
                )
        bar.close()
        labels, seeds = ctx.probe_grid(cfg.per_class)
        images = ctx.sample(attacked, torch.full_like(labels, index), seeds)
        pred = ctx.judged(images)
        hits = torch.isin(pred, torch.tensor(ctx.forget))
        found = Finding(RECOVERED, rate(hits), len(hits),
                        {"images": cfg.images, "steps": cfg.steps, "lr": cfg.lr})  # fmt: skip
        return [from_record(r) for r in resume.finish(unit, [as_record(found)])]
