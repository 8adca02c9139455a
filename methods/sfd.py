"""Score Forgetting Distillation (Chen, Zhang & Zhou, "Score Forgetting Distillation: A Swift, Data-Free
Method for Machine Unlearning in Diffusion Models", ICLR 2025, arXiv 2409.11219), and `sid`, its control.

Three networks start from the teacher: the frozen teacher eps_phi, a fake score eps_psi and a one-step
generator G_theta, x_g = (b* z - b* eps_theta(b* z, t*, c)) / a* (t* = 440, sigma ~ 2.5). With
x_t = a_t x_g + b_t eps and the denoiser f(x_t, c) = (x_t - b_t eps(x_t, t, c)) / a_t, each iteration takes

  fake-score step:  L_psi = E_{c in C_r} ||eps_psi(x_t, c) - eps||^2 + lambda_psi_f E ||eps_psi(x_t^f, c_f) - eps||^2
                    (generator samples without gradient; squared error summed over pixels)
  generator step:   L_theta = E_{c in C_r} l(x_g; c, c) + lambda_theta_f E l(x_g^f; c_o, c_f), where the SiD loss is
                    l(x_g; c_T, c_F) = sum_pixels (f_phi(x_t, c_T) - f_psi(x_t, c_F))
                                       * [(f_phi - x_g) - alpha (f_phi - f_psi)] / omega,
                    omega = stop-grad(mean_pixels |f_phi(x_t, c_T) - x_g|)

so the generator keeps the teacher's scores on retained classes and, for the forgotten class c_f, moves its
score towards the teacher's score of the anchor ("safe") class c_o. No image is ever read: only class labels.
Defaults are the official DDPM config `DDPM/configs/cifar10_sfd.yml` of tqch/score-forgetting-distillation and
its `runners/diffusion.py::train_sfd` loop, where retained labels come from the retained classes' label
frequencies (balanced here, so we draw them uniformly without loading the data).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bench.api import (
    DECAY,
    NON_NEGATIVE,
    POSITIVE,
    TIMESTEP,
    ForgetSet,
    Method,
    Range,
    Scaled,
    param,
)
from bench.errors import BenchError
from bench.models import store as model_store
from bench.models.cache import load_cached, teacher_digest, write_cached
from bench.models.unet import noise_schedule
from bench.registry import METHODS
from bench.sampling import OneStepGenerator, autocast
from bench.training import EMA

SRC = "cifar10_sfd.yml"
SID = "cifar10_sid.yml"


@dataclass(frozen=True)
class SFDConfig:
    iterations: int = param(50_000, f"{SRC} training.n_iters", valid=POSITIVE)
    batch_size: int = param(
        128, f"{SRC} training.batch_size (per term: retained and forgotten each)", valid=POSITIVE
    )
    lr_fake: float = param(1e-5, f"{SRC} sg_optim.lr", valid=POSITIVE)
    lr_generator: float = param(1e-5, f"{SRC} g_optim.lr", valid=POSITIVE)
    adam_beta1: float = param(0.0, f"{SRC} sg_optim/g_optim.beta1", valid=DECAY)
    adam_beta2: float = param(0.999, f"{SRC} sg_optim/g_optim.beta2", valid=DECAY)
    adam_eps: float = param(1e-8, f"{SRC} sg_optim/g_optim.eps", valid=POSITIVE)
    grad_clip: float = param(1.0, f"{SRC} grad_clip (clip_grad_value_, by value)", valid=POSITIVE)
    alpha: float = param(1.2, f"{SRC} distill.alpha (SiD's alpha)", valid=NON_NEGATIVE)
    t_min: int = param(38, f"{SRC} distill.t_min", valid=TIMESTEP)
    t_max: int = param(712, f"{SRC} distill.t_max (exclusive: t ~ U{{38..711}})", valid=Range(1, 1000))
    t_init: int = param(440, f"{SRC} distill.t_init (sigma ~ 2.5, SiD's init_sigma)", valid=TIMESTEP)
    fake_retain_weight: float = param(1.0, f"{SRC} distill.sg_remain_coef", valid=NON_NEGATIVE)
    fake_forget_weight: float = param(
        0.01, f"{SRC} distill.sg_forget_coef (lambda_psi_f)", valid=NON_NEGATIVE
    )
    generator_retain_weight: float = param(1.0, f"{SRC} distill.g_remain_coef", valid=NON_NEGATIVE)
    generator_forget_weight: float = param(
        0.01, f"{SRC} distill.g_forget_coef (lambda_theta_f)", valid=NON_NEGATIVE
    )
    distill: str = param(
        "retained",
        "train_sfd: the distilled labels come from the retain set (DDPM/datasets/__init__.py:184, "
        "targets != label_to_forget); 'all' distils every class, the forgotten one included",
        valid=("retained", "all"),
    )
    anchor: str = param(
        "fixed", f"{SRC} distill.label_to_override: 'fixed' (forget set's anchor), 'random', or K"
    )
    ema_decay: float = param(0.9999, f"{SRC} model.ema_rate (generator EMA, used for sampling)", valid=DECAY)


@dataclass(frozen=True)
class SiDConfig(SFDConfig):
    """The SFD repo's stage 1 (DDPM/README.md: `--config cifar10_sid.yml --label_to_forget -1`)."""

    lr_fake: float = param(3e-5, f"{SID} sg_optim.lr (line 49)", valid=POSITIVE)
    fake_forget_weight: float = param(0.0, f"{SID} distill.sg_forget_coef (line 72)", valid=NON_NEGATIVE)
    generator_forget_weight: float = param(0.0, f"{SID} distill.g_forget_coef (line 74)", valid=NON_NEGATIVE)
    distill: str = param(
        "all",
        "DDPM/README.md stage 1 runs with --label_to_forget -1, so the retain set (datasets/__init__.py:184, "
        "targets != -1) holds every class: the class forgotten later is distilled too",
        valid=("retained", "all"),
    )


def denoise(unet: nn.Module, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, a, b) -> torch.Tensor:
    """f(x_t, c) = (x_t - b_t eps(x_t, t, c)) / a_t: the network's estimate of the clean image."""
    return (x_t - b * unet(x_t, t, class_labels=labels).sample.float()) / a


def fake_score_loss(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Denoising loss of the fake score: squared error summed over pixels, mean over the batch."""
    return (eps_pred.float() - eps).square().sum(dim=(1, 2, 3)).mean()


def sid_loss(f_real: torch.Tensor, f_fake: torch.Tensor, x_g: torch.Tensor, alpha: float) -> torch.Tensor:
    """SiD's generator loss with the omega normalisation, mean over the batch."""
    with torch.no_grad():
        omega = (f_real - x_g).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_(min=1e-5)
    diff = f_real - f_fake
    return (diff * ((f_real - x_g) - alpha * diff) / omega).sum(dim=(1, 2, 3)).mean()


class Schedule:
    """a_t = sqrt(abar_t), b_t = sqrt(1 - abar_t) of the 1000-step linear DDPM schedule (or of `abar`, a model's
    own alphas_cumprod)."""

    def __init__(self, device: torch.device, abar: torch.Tensor | None = None):
        abar = (noise_schedule().alphas_cumprod if abar is None else abar).to(device)
        self.a, self.b = abar.sqrt(), (1 - abar).sqrt()

    def noise(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor):
        a, b = self.a[t].view(-1, 1, 1, 1), self.b[t].view(-1, 1, 1, 1)
        return a * x0 + b * eps, a, b


@dataclass
class Draw:
    """The random inputs of one loss term: generator noise z, diffusion noise eps and times t."""

    z: torch.Tensor
    eps: torch.Tensor
    t: torch.Tensor

    @classmethod
    def new(cls, n: int, shape, cfg: SFDConfig, g: torch.Generator, device) -> Draw:
        z = torch.randn((n, *shape), generator=g)
        eps = torch.randn((n, *shape), generator=g)
        t = torch.randint(cfg.t_min, cfg.t_max, (n,), generator=g)
        return cls(z.to(device), eps.to(device), t.to(device))

    def shard(self, world) -> Draw:
        """This rank's slice of a global batch's draw (the draw itself on one rank)."""
        return Draw(world.shard(self.z), world.shard(self.eps), world.shard(self.t))


def fake_score_step(
    gen: OneStepGenerator, fake: nn.Module, sched: Schedule, terms, amp: bool
) -> torch.Tensor:
    """Accumulate grad of L_psi into the fake score; `terms` = [(weight, labels, Draw)]."""
    total = 0.0
    for weight, labels, d in terms:
        if weight == 0:
            continue
        with torch.no_grad(), autocast(d.z.device, amp):
            x_g = gen.generate(d.z, labels).float()
        x_t, _, _ = sched.noise(x_g, d.t, d.eps)
        with autocast(d.z.device, amp):
            loss = fake_score_loss(fake(x_t, d.t, class_labels=labels).sample, d.eps)
        (weight * loss).backward()
        total += weight * loss.item()
    return torch.tensor(total)


def generator_step(gen: OneStepGenerator, teacher: nn.Module, fake: nn.Module, sched: Schedule, terms, alpha: float,
                   amp: bool) -> torch.Tensor:  # fmt: skip
    """Accumulate grad of L_theta into the generator; `terms` = [(weight, teacher labels, fake labels, Draw)]."""
    total = 0.0
    for weight, c_teacher, c_fake, d in terms:
        if weight == 0:
            continue
        with autocast(d.z.device, amp):
            x_g = gen.generate(d.z, c_fake).float()
            x_t, a, b = sched.noise(x_g, d.t, d.eps)
            loss = sid_loss(
                denoise(teacher, x_t, d.t, c_teacher, a, b), denoise(fake, x_t, d.t, c_fake, a, b), x_g, alpha
            )
        (weight * loss).backward()
        total += weight * loss.item()
    return torch.tensor(total)


def anchor_labels(choice: str, forget_set: ForgetSet, n: int, g: torch.Generator) -> torch.Tensor:
    """The teacher's labels c_o for forgotten samples: the fixed anchor, a chosen class, or random retained ones."""
    if choice == "random":
        retain = torch.tensor(forget_set.retain)
        return retain[torch.randint(len(retain), (n,), generator=g)]
    if choice == "fixed":
        return torch.full((n,), forget_set.anchor)
    if choice.isdigit():
        if int(choice) in forget_set.forget:
            raise BenchError(f"sfd.anchor={choice} is inside forget set {forget_set.name!r}")
        return torch.full((n,), forget_set.with_anchor(int(choice)).anchor)
    raise BenchError(f"sfd.anchor={choice!r}: expected 'fixed', 'random' or a retained class number")


@METHODS.register("sfd")
class SFD(Method):
    name = "sfd"
    version = "1"
    paper = "Chen, Zhang & Zhou, Score Forgetting Distillation, ICLR 2025 (arXiv 2409.11219)"
    Config = SFDConfig
    requires = frozenset()
    data_parallel = (
        True  # each rank takes its slice of both terms' batches; gradients averaged before clipping
    )
    scaled = {
        "smoke": Scaled({"iterations": 4, "batch_size": 4, "ema_decay": 0.5}, "seconds-long test runs"),
        "default": Scaled(
            {"iterations": 300, "batch_size": 16, "lr_fake": 1e-4, "lr_generator": 1e-4, "ema_decay": 0.98},
            "CPU budget: 300 iterations of batch 16+16 (about 2 minutes on 2 cores) instead of 50k of 128+128. "
            "lr 1e-4 instead of 1e-5: at 1e-5 the class is still recognised after 300 iterations "
            "(shared/research/cpu.md measured forget accuracy 0.42 at 1e-5 vs 0.00 at 1e-4). EMA 0.98 keeps the "
            "EMA half-life near 11% of training, as 0.9999 over 50k iterations does (14%).",
        ),
    }  # fmt: skip

    def anchors(self, forget_set):
        choice = self.config.anchor
        if choice == "random":
            return forget_set.retain
        return (int(choice),) if choice.isdigit() else (forget_set.anchor,)

    def validate(self, forget_set):
        cfg = self.config
        if cfg.t_min >= cfg.t_max:
            raise BenchError(f"{self.name}.t_min={cfg.t_min} must be below {self.name}.t_max={cfg.t_max}")
        anchor_labels(cfg.anchor, forget_set, 1, torch.Generator())

    def unlearn(self, teacher, forget_set, ctx):
        _, ema = self.distill(
            teacher.unet, teacher.unet, teacher.unet, forget_set, ctx, shape=teacher.image_shape
        )
        return OneStepGenerator(ema, t_init=self.config.t_init)

    def distill(self, teacher: nn.Module, fake_init: nn.Module, generator_init: nn.Module, forget_set: ForgetSet,
                ctx, *, shape: tuple[int, ...], stream: str = "sfd", extra_state: dict | None = None,
                step_offset: int = 0) -> tuple[nn.Module, nn.Module]:  # fmt: skip
        """The SFD/SiD loop from these three starting networks (copied); returns the fake score and the EMA of
        the generator's network. `stream` names its random stream, `extra_state` goes into its state dumps, and
        `step_offset` counts the steps of an earlier stage in the logs, probes and dumps (sfd-2stage)."""
        cfg = self.config
        dev, amp = ctx.device, ctx.amp
        g = ctx.generator(stream)
        self.validate(forget_set)
        world = ctx.world  # every rank draws the global batch from g and computes on its slice of each term
        world.check_batch(cfg.batch_size, f"{self.name}.batch_size")
        frozen = copy.deepcopy(teacher).to(dev).eval().requires_grad_(False)
        fake = copy.deepcopy(fake_init).to(dev).train().requires_grad_(True)
        gen = OneStepGenerator(
            copy.deepcopy(generator_init).to(dev).train().requires_grad_(True), t_init=cfg.t_init
        )
        ema = EMA(gen.unet, cfg.ema_decay)
        adam = {"betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_eps}
        opt_fake = torch.optim.Adam(fake.parameters(), lr=cfg.lr_fake, **adam)
        opt_gen = torch.optim.Adam(gen.unet.parameters(), lr=cfg.lr_generator, **adam)
        start = 0
        state = ctx.load_state()
        if (
            state is not None
            and extra_state is not None
            and state.get("extra", {}).get("stage") != extra_state.get("stage")
        ):
            state = None  # another stage's dump (sfd-2stage): this stage starts afresh
        if state is not None:
            for obj, key in ((fake, "fake"), (gen.unet, "generator"), (ema, "ema"), (opt_fake, "opt_fake"),
                             (opt_gen, "opt_generator")):  # fmt: skip
                obj.load_state_dict(state[key])
            start = state["step"] - step_offset
            if extra_state is not None:
                extra_state.update(state.get("extra", {}))
        sched = Schedule(dev)
        every = (*forget_set.retain, *forget_set.forget)
        retain = torch.tensor(sorted(every) if cfg.distill == "all" else forget_set.retain)
        forget = torch.tensor(forget_set.forget)
        n = cfg.batch_size
        bar = ctx.progress(cfg.iterations, self.name, initial=start)
        for step in range(start, cfg.iterations):
            c_r = world.shard(retain[torch.randint(len(retain), (n,), generator=g)]).to(dev)
            c_f = world.shard(forget[torch.randint(len(forget), (n,), generator=g)]).to(dev)
            c_o = world.shard(anchor_labels(cfg.anchor, forget_set, n, g)).to(dev)

            fake.requires_grad_(True)
            opt_fake.zero_grad(set_to_none=True)
            loss_fake = fake_score_step(gen, fake, sched, [
                (cfg.fake_retain_weight, c_r, Draw.new(n, shape, cfg, g, dev).shard(world)),
                (cfg.fake_forget_weight, c_f, Draw.new(n, shape, cfg, g, dev).shard(world)),
            ], amp)  # fmt: skip
            world.average_gradients(fake)  # as DDP in the official train_sfd: the mean over ranks, then clip
            nn.utils.clip_grad_value_(fake.parameters(), cfg.grad_clip)
            opt_fake.step()

            fake.requires_grad_(False)
            opt_gen.zero_grad(set_to_none=True)
            loss_gen = generator_step(gen, frozen, fake, sched, [
                (cfg.generator_retain_weight, c_r, c_r, Draw.new(n, shape, cfg, g, dev).shard(world)),
                (cfg.generator_forget_weight, c_o, c_f, Draw.new(n, shape, cfg, g, dev).shard(world)),
            ], cfg.alpha, amp)  # fmt: skip
            world.average_gradients(gen.unet)
            nn.utils.clip_grad_value_(gen.unet.parameters(), cfg.grad_clip)
            opt_gen.step()
            ema.update(gen.unet)
            loss_fake, loss_gen = world.all_reduce_mean([loss_fake, loss_gen])  # the global batch's losses

            bar.update()
            ctx.log(step_offset + step + 1, loss_fake=loss_fake, loss_generator=loss_gen)
            ctx.probe(step_offset + step + 1, lambda: OneStepGenerator(ema.model, t_init=cfg.t_init))
            if ctx.should_save(step + 1):
                ctx.save_state({"fake": fake.state_dict(), "generator": gen.unet.state_dict(),
                                "ema": ema.state_dict(), "opt_fake": opt_fake.state_dict(),
                                "opt_generator": opt_gen.state_dict(), "step": step_offset + step + 1,
                                "extra": dict(extra_state or {})})  # fmt: skip
        bar.close()
        return fake.eval(), ema.model


@METHODS.register("sid")
class SiD(SFD):
    name = "sid"
    paper = ("SiD distillation (Zhou et al., ICML 2024) of every class, the SFD repo's stage 1 (cifar10_sid.yml, "
             "--label_to_forget -1): the 'distilled but not unlearned' control")  # fmt: skip
    Config = SiDConfig
    not_budgeted = (
        "the distillation control, not unlearning: its model comes from the per-teacher stage-1 cache"
    )
    scaled = {
        "smoke": SFD.scaled["smoke"],
        "default": Scaled(
            {**SFD.scaled["default"].overrides, "lr_fake": 3e-4},
            "as sfd (300 iterations of batch 16, EMA 0.98, both learning rates 10x the paper's for the CPU budget): "
            "lr_fake 3e-4 and lr_generator 1e-4 keep cifar10_sid.yml's ratio of 3",
        ),
    }  # fmt: skip

    def unlearn(self, teacher, forget_set, ctx):
        _, ema = self.stage1(teacher, forget_set, ctx)
        return OneStepGenerator(ema, t_init=self.config.t_init)

    def stage1_path(self, teacher, seed: int) -> Path:
        """Where the distillation of this teacher with this config and seed is kept: it reads no forget set (every
        class distilled, forgetting weights 0), so every forget set's `sid` and `sfd-2stage` runs share it."""
        blob = json.dumps(vars(self.config), sort_keys=True, default=str)
        key = hashlib.sha256(blob.encode()).hexdigest()[:12]
        return (
            model_store.user_store()
            / "sid-stage1"
            / teacher_digest(teacher.unet)
            / f"{key}-seed{seed}.safetensors"
        )

    def stage1(
        self, teacher, forget_set, ctx, extra_state: dict | None = None
    ) -> tuple[nn.Module, nn.Module]:
        """The stage-1 fake score and EMA generator network: from the model store's cache, or distilled here and
        cached (rank 0 writes; every rank decides from the same file, so data-parallel ranks stay together)."""
        net, shape = teacher.unet, teacher.image_shape
        cfg = self.config
        if (
            cfg.distill != "all" or cfg.fake_forget_weight or cfg.generator_forget_weight
        ):  # reads the forget set
            return self.distill(net, net, net, forget_set, ctx, shape=shape, extra_state=extra_state)
        path = self.stage1_path(teacher, ctx.seed)
        if (found := load_cached(path, what="sid stage-1")) is not None:
            tensors, record = found
            ctx.reuse("sid stage 1", path, record.get("seconds", float("nan")))
            return _unpack(tensors, "fake.", teacher.unet), _unpack(tensors, "generator.", teacher.unet)
        t0 = ctx.elapsed()
        fake, ema = self.distill(net, net, net, forget_set, ctx, shape=shape, extra_state=extra_state)
        if ctx.world.is_main:
            tensors = {**_pack(fake, "fake."), **_pack(ema, "generator.")}
            write_cached(path, tensors, seconds=ctx.elapsed() - t0)
        return fake, ema


def _pack(net: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().cpu() for k, v in net.state_dict().items()}


def _unpack(tensors: dict[str, torch.Tensor], prefix: str, like: nn.Module) -> nn.Module:
    net = copy.deepcopy(like)
    net.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    return net.eval()
