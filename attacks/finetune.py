"""The fine-tuning attacks' shared loop: fine-tune a copy of the attacked network on the images the threat model
allows and probe forget accuracy on a log-spaced grid of steps, with a resumable dump after every probe.

A diffusion model is fine-tuned with its own training objective, the DDPM loss (bench.training.ddpm_loss). A
one-step generator has no denoising chain and no loss of its own on images: its network is fine-tuned through its
one-step forward, G(z, c) regressed on the images (mean squared error, a fresh latent z per image and step), the
only image loss a one-step generator has without a discriminator or a teacher, and it is probed by sampling it in
one step, as it is used.
"""

from __future__ import annotations

import copy
import math

import torch

from attacks.base import ONE_STEP, AttackContext, Resume, same_kind
from bench.sampling import Sampler, autocast
from bench.training import ddpm_loss


def log_probes(steps: int, count: int) -> tuple[int, ...]:
    """0 and `count` log-spaced steps up to `steps` (distinct integers, the last one `steps`)."""
    grid = {0, steps}
    for i in range(1, count):
        grid.add(round(math.exp(math.log(steps) * i / count)))
    return tuple(sorted(grid))


def probe_accuracy(model: Sampler, ctx: AttackContext, per_class: int) -> tuple[int, int]:
    """(recognised, n) on the forget classes' probe grid, sampled with the preset's sampler."""
    labels, seeds = ctx.probe_grid(per_class)
    hits = ctx.hits(ctx.sample(model, labels, seeds), labels)
    return int(hits.sum()), len(hits)


def teacher_probe_accuracy(ctx: AttackContext, per_class: int) -> float:
    """The untouched teacher's forget accuracy on the same probe grid: the no-attack reference."""
    hits, n = ctx.teacher_figure(
        f"probe_accuracy/{per_class}", lambda: probe_accuracy(ctx.teacher, ctx, per_class)
    )
    return hits / n


def _step(model: Sampler, net, opt, x, y, g, ctx: AttackContext, *, batch_size: int, grad_clip: float,
          label_dropout: float) -> float:  # fmt: skip
    dev = ctx.device
    idx = torch.randint(len(x), (batch_size,), generator=g)
    x0, labels = x[idx], y[idx].clone()
    if model.kind == ONE_STEP:
        z = torch.randn(x0.shape, generator=g)
        with autocast(dev, ctx.amp):
            out = model.generate(z.to(dev), labels.to(dev))
        loss = ((out.float() - x0.to(dev)) ** 2).mean()
    else:
        if label_dropout > 0:  # the teacher recipe's null-label dropout (classifier-free guidance)
            labels[torch.rand(len(labels), generator=g) < label_dropout] = model.num_classes
        loss = ddpm_loss(net, x0, labels, g, device=dev, amp=ctx.amp)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    opt.step()
    return loss.item()


def relearning_curve(model: Sampler, x: torch.Tensor, y: torch.Tensor, ctx: AttackContext, resume: Resume, *,
                     unit: str, lr: float, batch_size: int, probes: tuple[int, ...], per_class: int,
                     grad_clip: float = 1.0, label_dropout: float = 0.0) -> list[tuple[int, int, int]]:  # fmt: skip
    """(step, recognised, n) at each probe step of Adam fine-tuning on (x, y), batches drawn with replacement.

    The model itself is never changed: a copy of its network is fine-tuned. Probe 0 is the model as it was.
    """
    net = copy.deepcopy(model.unet).to(ctx.device)
    attacked = same_kind(model, net)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = ctx.seeded(unit)
    step, curve = 0, []
    if (state := resume.current(unit)) is not None:
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["rng"])
        step, curve = state["step"], [tuple(p) for p in state["curve"]]
    bar, loss = ctx.run.progress(probes[-1], unit, initial=step), 0.0
    for target in probes:
        if target < step or any(p[0] == target for p in curve):
            continue
        net.train()
        while step < target:
            loss = _step(attacked, net, opt, x, y, g, ctx, batch_size=batch_size, grad_clip=grad_clip,
                         label_dropout=label_dropout)  # fmt: skip
            step += 1
            bar.update()
            ctx.run.log(step, **{f"{unit}/loss": loss})
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"{unit}: the fine-tuning loss is not finite at step {step} (lower the lr)"
            )
        curve.append((step, *probe_accuracy(attacked, ctx, per_class)))
        resume.checkpoint(unit, net=net.state_dict(), opt=opt.state_dict(), rng=g.get_state(), step=step,
                          curve=[list(p) for p in curve])  # fmt: skip
    bar.close()
    return curve


def log_auc(curve: list[tuple[int, int, int]]) -> float:
    """The area under forget accuracy against log(1 + step), over the probed range, as a fraction of that range:
    the curve's mean on the log axis it is drawn on, so early relearning weighs as much as late."""
    xs = [math.log1p(s) for s, _, _ in curve]
    ys = [h / n for _, h, n in curve]
    if len(xs) < 2 or xs[-1] <= xs[0]:
        raise ValueError("the area under a relearning curve needs at least two probe steps")
    area = sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:], strict=False))
    return area / (xs[-1] - xs[0])


def steps_to_reach(curve: list[tuple[int, int, int]], threshold: float) -> int | None:
    """The first probe step whose forget accuracy reaches `threshold`, or None within the probed steps."""
    return next((s for s, h, n in curve if h / n >= threshold), None)
