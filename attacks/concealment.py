"""Concealment probe: noise real test images of the forgotten class part of the way (t/T) and let the unlearned model
denoise them conditioned on the forgotten label. A model that only hides the class (suppresses the path from pure
noise) restores it from a partly noised image; one that erased it turns the image into something else.
After Sharma et al., "Unlearning or Concealment?" (arXiv 2409.05668), whose partial-diffusion probe this is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

from attacks.base import ONE_STEP, Attack, AttackContext, Finding, Resume, as_record, from_record, rate
from bench.api import POSITIVE, Metric, Scaled, param
from bench.models.unet import noise_schedule
from bench.registry import ATTACKS
from bench.sampling import DiffusionModel, autocast, image_noise

RECOGNISED = Metric("recognised", "forget", higher_is_better=False)
NOISE_SEED = 9_000_011


@dataclass(frozen=True)
class ConcealmentConfig:
    fractions: tuple[float, ...] = param((0.25, 0.5, 0.75), "t/T of the partial noising (issue 13; Sharma et al. "
                                         "find a critical t/T near 0.55)")  # fmt: skip
    per_class: int = param(100, "real test images per forgotten class (a seeded choice, the same for every "
                           "method)", valid=POSITIVE)  # fmt: skip
    batch_size: int = param(250, "images per denoising batch", valid=POSITIVE)


@torch.no_grad()
def denoise_from(model: DiffusionModel, x0: torch.Tensor, labels: torch.Tensor, seeds: list[int], fraction: float,
                 *, steps: int, guidance: float, eta: float, device, amp: bool) -> tuple[torch.Tensor, int]:  # fmt: skip
    """x0 noised to the last timestep of the sampler's DDIM grid at or below fraction x T, then denoised along
    the rest of that grid; returns the images (CPU) and the timestep it started from."""
    scheduler = DDIMScheduler.from_config(noise_schedule().config)
    scheduler.set_timesteps(steps)
    grid = [t for t in scheduler.timesteps.tolist() if t <= fraction * scheduler.config.num_train_timesteps]
    start = grid[0]
    abar = scheduler.alphas_cumprod[start]
    noise, gens = image_noise(seeds, tuple(x0.shape[1:]))
    x = (abar.sqrt() * x0 + (1 - abar).sqrt() * noise).to(device)
    model.unet.to(device).eval()
    y = labels.to(device)
    with autocast(device, amp):
        for t in grid:
            eps = model.eps(x, t, y, guidance).float()
            var = None
            if eta > 0:
                var = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(device)
            x = scheduler.step(eps, t, x, eta=eta, variance_noise=var).prev_sample
    return x.float().clamp(-1, 1).cpu(), start


@ATTACKS.register("concealment")
class Concealment(Attack):
    name = "concealment"
    title = "concealment probe"
    threat = "the weights (white-box denoiser access) and real test images of the forgotten class"
    requires = frozenset({"forget"})
    sources = "Sharma et al., 'Unlearning or Concealment?' (arXiv 2409.05668): the partial-diffusion probe"
    one_step = (
        "does not apply: a one-step generator has no denoising chain to enter part of the way, and its network "
        "was distilled on pure-noise inputs at one timestep only, so feeding it a partly noised real image would "
        "probe inputs it was never trained on; the attack declares so and writes no row"
    )
    Config = ConcealmentConfig
    scaled = {
        "smoke": Scaled({"per_class": 4}, "seconds-long test runs"),
        "paper": Scaled({"per_class": 500}, "GPU scale"),
    }
    metrics = (RECOGNISED,)

    def applies(self, model) -> str:
        if model.kind == ONE_STEP:
            return "a one-step generator has no denoising chain (see the card)"
        return ""

    def run(self, model, ctx: AttackContext, resume: Resume) -> list[Finding]:
        cfg, p = self.config, ctx.preset
        x, y = ctx.data("forget", split="test")
        # Every test image, recognised or not: the t/T = 0 row is the judge's accuracy on them, the ceiling.
        idx = ctx.choose(x, y, cfg.per_class, "concealment/images", exemplars=False).flatten()
        x, y = x[idx], y[idx]
        findings = [Finding(RECOGNISED, rate(ctx.hits(x, y)), len(y), {"t_frac": 0.0, "t": 0})]
        for fraction in cfg.fractions:
            unit = f"concealment-{fraction:g}"
            if (rows := resume.finished(unit)) is None:
                seeds = [NOISE_SEED + ctx.run.seed * 10_000_019 + i for i in range(len(y))]
                out, parts = [], []
                for i in range(0, len(y), cfg.batch_size):
                    images, start = denoise_from(model, x[i : i + cfg.batch_size], y[i : i + cfg.batch_size],
                                                 seeds[i : i + cfg.batch_size], fraction, steps=p.attack_sampler_steps,
                                                 guidance=p.attack_guidance, eta=p.eta, device=ctx.device, amp=ctx.amp)  # fmt: skip
                    out.append(images)
                    parts.append(start)
                hits = ctx.hits(torch.cat(out), y)
                found = Finding(RECOGNISED, rate(hits), len(y), {"t_frac": fraction, "t": parts[0]})
                rows = resume.finish(unit, [as_record(found)])
            findings += [from_record(r) for r in rows]
        return findings
