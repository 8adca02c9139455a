"""Generative models behind one interface: multi-step diffusion (DDIM/DDPM) and one-step generators.

Every image has its own noise generator seeded from its grid position, so image i pairs across methods.
"""

from __future__ import annotations

import contextlib
import json
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DModel

from bench.errors import BenchError
from bench.files import share
from bench.models.unet import load_unet, noise_schedule, num_classes_of


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on the given device when asked for, a no-op otherwise."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def image_noise(seeds: list[int], shape: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Initial noise, one CPU generator per image (CPU so values do not depend on the device)."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return torch.stack([torch.randn(shape, generator=g) for g in gens]), gens


def ddim(
    eps, x: torch.Tensor, gens: list[torch.Generator], *, steps: int, eta: float, schedule=None
) -> torch.Tensor:
    """DDIM (eta 0) or ancestral (eta 1) sampling from noise `x` with the harness's schedule (or `schedule`, a
    model's own scheduler); `eps(x, t)` is the (guided) noise prediction, and the fresh noise of eta > 0 comes from
    each image's own generator."""
    scheduler = DDIMScheduler.from_config((noise_schedule() if schedule is None else schedule).config)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        e = eps(x, t).float()
        variance_noise = None
        if eta > 0:
            variance_noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(x.device)
        x = scheduler.step(e, t, x, eta=eta, variance_noise=variance_noise).prev_sample
    return x


class Sampler(ABC):
    """A class-conditional generator of images in [-1, 1]; `kind` names how it is sampled."""

    kind: str
    # A teacher's raw (non-EMA) weights, where its folder keeps them (raw/): the official SA and SalUn start there.
    raw: Sampler | None = None

    def __init__(self, unet: UNet2DModel):
        self.unet = unet

    @property
    def num_classes(self) -> int:
        return num_classes_of(self.unet)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        return (c.in_channels, c.sample_size, c.sample_size)

    @abstractmethod
    def nfe(self, *, steps: int, guidance: float) -> int:
        """Network evaluations per image."""

    @abstractmethod
    def _sample_batch(self, noise, gens, labels, *, steps, guidance, eta, amp) -> torch.Tensor: ...

    def settings(self) -> dict:
        return {"kind": self.kind}

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, seeds: list[int], *, steps: int, guidance: float, eta: float = 0.0,
               batch_size: int = 250, device: torch.device | str = "cpu", amp: bool = False,
               progress=None) -> torch.Tensor:  # fmt: skip
        """Images for `labels`, the i-th drawn from noise seeded by `seeds[i]`; returned on the CPU."""
        device = torch.device(device)
        self.unet.to(device).eval()
        out = []
        for i in range(0, len(labels), batch_size):
            noise, gens = image_noise(seeds[i : i + batch_size], self.image_shape)
            y = labels[i : i + batch_size].to(device)
            with autocast(device, amp):
                x = self._sample_batch(
                    noise.to(device), gens, y, steps=steps, guidance=guidance, eta=eta, amp=amp
                )
            out.append(x.float().clamp(-1, 1).cpu())
            if progress is not None:
                progress(len(y))
        return torch.cat(out)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(directory / "unet", safe_serialization=True)
        share(directory / "unet")  # save_pretrained writes its safetensors 0600, whatever the umask
        (directory / "sampler.json").write_text(json.dumps(self.settings(), indent=2))


class DiffusionModel(Sampler):
    """An epsilon-prediction DDPM sampled with DDIM (eta 0) or ancestrally (eta 1) and guidance.

    Guidance follows the standard convention eps_u + w (eps_c - eps_u); w = 1 skips the unconditional pass.
    (The SA/SalUn/SFD code's `cond_scale` s equals w - 1.)
    """

    kind = "diffusion"

    def nfe(self, *, steps: int, guidance: float) -> int:
        return steps * (1 if guidance == 1.0 else 2)

    def eps(self, x: torch.Tensor, t: torch.Tensor | int, labels: torch.Tensor, guidance: float = 1.0):
        t = torch.as_tensor(t, device=x.device).expand(len(x))
        if guidance == 1.0:
            return self.unet(x, t, class_labels=labels).sample
        null = torch.full_like(labels, self.num_classes)
        cond, uncond = self.unet(
            torch.cat([x, x]), torch.cat([t, t]), class_labels=torch.cat([labels, null])
        ).sample.chunk(2)
        return uncond + guidance * (cond - uncond)

    def _sample_batch(self, noise, gens, labels, *, steps, guidance, eta, amp):
        return ddim(lambda x, t: self.eps(x, t, labels, guidance), noise, gens, steps=steps, eta=eta)


class OneStepGenerator(Sampler):
    """SiD/SFD one-step generator: x_g = (b* z - b* eps_theta(b* z, t*, c)) / a* with t* = `t_init`."""

    kind = "one-step"

    def __init__(self, unet: UNet2DModel, t_init: int = 440):
        super().__init__(unet)
        self.t_init = t_init
        abar = noise_schedule().alphas_cumprod[t_init]
        self.a, self.b = float(abar.sqrt()), float((1 - abar).sqrt())

    def nfe(self, *, steps: int, guidance: float) -> int:
        return 1

    def settings(self) -> dict:
        return {"kind": self.kind, "t_init": self.t_init}

    def generate(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Differentiable forward used in training and sampling (no guidance: the paper samples cond_scale 0)."""
        x_init = self.b * z
        t = torch.full((len(z),), self.t_init, device=z.device)
        return (x_init - self.b * self.unet(x_init, t, class_labels=labels).sample) / self.a

    def _sample_batch(self, noise, gens, labels, *, steps, guidance, eta, amp):
        return self.generate(noise, labels)


KINDS = {cls.kind: cls for cls in (DiffusionModel, OneStepGenerator)}


def is_one_step(model) -> bool:
    """A one-step generator of either tier (OneStepGenerator, bench.text's TextOneStepGenerator and
    LatentTextOneStepGenerator)."""
    return model.kind.endswith("one-step")


def load_sampler(directory: Path) -> Sampler:
    """Reload a saved model; a missing or corrupt file raises a BenchError that names it."""
    settings_file = directory / "sampler.json"
    try:
        settings = json.loads(settings_file.read_text())
        kind = settings.pop("kind")
        if kind.startswith("text-"):  # the text tier's (bench.text.model imports this module)
            from bench.text.model import TextDiffusionModel, TextOneStepGenerator
            from bench.text.stable_diffusion import LatentTextDiffusionModel, LatentTextOneStepGenerator

            text_kinds = (
                TextDiffusionModel,
                TextOneStepGenerator,
                LatentTextDiffusionModel,
                LatentTextOneStepGenerator,
            )
            return {c.kind: c for c in text_kinds}[kind].load(directory)
        cls = KINDS[kind]
    except (OSError, ValueError, KeyError) as e:
        raise BenchError(f"cannot read model settings {settings_file}: {e!r}") from e
    try:
        unet = load_unet(directory / "unet")  # the backbone its config.json names
    except Exception as e:
        raise BenchError(f"cannot load the UNet in {directory / 'unet'}: {e}") from e
    return cls(unet, **settings)
