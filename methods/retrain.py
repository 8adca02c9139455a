"""`retrain`: the oracle: a teacher trained from scratch on the retained classes only, never seeing the forgotten ones.

As the `retrain` mode of the SA, SalUn and SFD DDPM runners: the teacher's own recipe and budget (same architecture,
DDPM loss with 10% null-label dropout, AdamW, warm-up, gradient clipping, EMA for sampling), on retained data.
It is the reference unlearning aims at, not an unlearning method, so `bench run` leaves it out unless named.
A finished oracle is kept in the model store per dataset, preset, forget set, seed and recipe (the default one for
fashion-mnist `class-0` ships with the package), and later runs with the same key load it instead of training.
Defaults are the paper preset's teacher recipe (the CIFAR-10 DDPM recipe of SA/SalUn/SFD `cifar10_train.yml`); every
other preset scales them to that preset's own teacher recipe, read from bench/presets.py so the two cannot drift.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass

import torch

from bench.api import DECAY, FRACTION, POSITIVE, Method, Range, Scaled, param
from bench.models import store as model_store
from bench.presets import PRESETS, TeacherRecipe
from bench.registry import METHODS
from bench.sampling import DiffusionModel
from bench.training import EMA, ddpm_loss, random_flip, warmup_lambda

SRC = "paper preset teacher recipe (SA/SalUn/SFD cifar10_train.yml)"
RECIPE_FIELDS = ("steps", "batch_size", "lr", "warmup_steps", "ema_decay", "label_dropout", "grad_clip", "loss",
                 "antithetic", "flip")  # fmt: skip
_PAPER = PRESETS["paper"].teacher


@dataclass(frozen=True)
class RetrainConfig:
    steps: int = param(_PAPER.steps, f"{SRC} training.n_iters", valid=POSITIVE)
    batch_size: int = param(_PAPER.batch_size, f"{SRC} training.batch_size", valid=POSITIVE)
    lr: float = param(_PAPER.lr, f"{SRC} optim.lr", valid=POSITIVE)
    warmup_steps: int = param(
        _PAPER.warmup_steps,
        "paper preset teacher warm-up (bench/presets.py; DDPM recipe)",
        valid=Range(0),
    )
    ema_decay: float = param(_PAPER.ema_decay, f"{SRC} model.ema_rate", valid=DECAY)
    label_dropout: float = param(_PAPER.label_dropout, f"{SRC} model.cond_drop_prob", valid=FRACTION)
    grad_clip: float = param(_PAPER.grad_clip, f"{SRC} optim.grad_clip", valid=POSITIVE)
    loss: str = param(
        _PAPER.loss,
        "SA ddpm/functions/losses.py: squared error summed over pixels, mean over the batch ('mean': "
        "over every element, the default preset teacher's recipe)",
        valid=("mean", "sum"),
    )
    antithetic: bool = param(_PAPER.antithetic, "SA ddpm/runners/diffusion.py::train: t and 999 - t")
    flip: bool = param(_PAPER.flip, f"{SRC} data.random_flip")


def _recipe(recipe: TeacherRecipe) -> dict:
    return {k: getattr(recipe, k) for k in RECIPE_FIELDS}


@METHODS.register("retrain")
class Retrain(Method):
    name = "retrain"
    version = "1"
    paper = (
        "retrain from scratch on the retained classes only (the 'Retrain' row of SA, SalUn and SFD tables)"
    )
    Config = RetrainConfig
    requires = frozenset({"retain"})
    oracle = True
    not_budgeted = (
        "the oracle, trained from scratch to its recipe: the reference, not a contender for a budget"
    )
    scaled = {
        **{name: Scaled(_recipe(p.teacher), f"the {name} preset's teacher recipe and budget")
           for name, p in PRESETS.items() if name not in ("paper", "smoke")},
        "smoke": Scaled({"steps": 3, "batch_size": 8, "warmup_steps": 1},
                        "seconds-long test runs (the full budget is the teacher's: 6000 steps, ~40 min on 2 cores)"),
    }  # fmt: skip

    def oracle_key(self, teacher, ctx) -> str:
        """What decides the oracle's weights besides the seed: the architecture (not the teacher's weights, which
        retraining never reads), the recipe, the data files and the classes kept."""
        arch = {k: v for k, v in dict(teacher.unet.config).items() if not k.startswith("_")}
        blob = json.dumps({"architecture": arch, "unet": type(teacher.unet).__name__, "config": vars(self.config),
                           "data": ctx.dataset.data_identity()["digest"], "retain": list(ctx.forget_set.retain)},
                          sort_keys=True, default=str)  # fmt: skip
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def unlearn(self, teacher, forget_set, ctx):
        key = self.oracle_key(teacher, ctx)
        where = (ctx.dataset.name, ctx.preset.name, forget_set.name, ctx.seed, key)
        if (found := model_store.find_oracle(*where)) is not None:
            model, manifest = model_store.load_oracle(found)
            ctx.reuse("oracle", found, manifest.get("train_s", float("nan")))
            model.unet.to(ctx.device)
            return model
        model = self._train(teacher, forget_set, ctx)
        if ctx.world.is_main:
            directory = model_store.oracle_dir(model_store.user_store(), *where)
            with model_store.locked(directory):
                model_store.save_oracle(model, directory, key=key, seed=ctx.seed, train_s=ctx.elapsed(),
                                        config=vars(self.config), dataset=ctx.dataset.name, preset=ctx.preset.name,
                                        forget_set=forget_set.name, data=ctx.dataset.data_identity(),
                                        threads=os.environ.get("OMP_NUM_THREADS", ""),
                                        command=f"python -m bench run --methods retrain --datasets "
                                                f"{ctx.dataset.name} --forget-sets {forget_set.name} --seeds "
                                                f"{ctx.seed} --preset {ctx.preset.name}")  # fmt: skip
        return model

    def _train(self, teacher, forget_set, ctx):
        cfg = self.config
        dev, null = ctx.device, teacher.num_classes
        # Same architecture as the teacher, fresh weights from the run's seed (without touching the global RNG).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=ctx.generator("retrain-init"))))
            unet = type(teacher.unet).from_config(copy.deepcopy(teacher.unet.config)).to(dev).train()
        ema = EMA(unet, cfg.ema_decay)
        opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(cfg.warmup_steps))
        g = ctx.generator("retrain")
        x, y = ctx.data("retain")
        start = 0
        if (state := ctx.load_state()) is not None:
            for obj, key in ((unet, "unet"), (ema, "ema"), (opt, "opt"), (sched, "sched")):
                obj.load_state_dict(state[key])
            start = state["step"]
        bar = ctx.progress(cfg.steps, self.name, initial=start)
        for step in range(start, cfg.steps):
            idx = torch.randint(len(x), (cfg.batch_size,), generator=g)
            labels = y[idx].clone()
            labels[torch.rand(len(labels), generator=g) < cfg.label_dropout] = null
            x0 = random_flip(x[idx], g) if cfg.flip else x[idx]
            loss = ddpm_loss(unet, x0, labels, g, device=dev, amp=ctx.amp, reduction=cfg.loss,
                             antithetic=cfg.antithetic)  # fmt: skip
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            ema.update(unet)
            bar.update()
            ctx.log(step + 1, loss=loss.item())
            ctx.probe(step + 1, lambda: DiffusionModel(ema.model))
            if ctx.should_save(step + 1):
                ctx.save_state({"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                "sched": sched.state_dict(), "step": step + 1})  # fmt: skip
        bar.close()
        return DiffusionModel(ema.model.eval())
