"""Sampling conditions: forget accuracy under stronger classifier-free guidance, and how often unconditional
(null-class) samples are the forgotten class, beside the untouched teacher's own rate. Many methods act on the
conditional branch only; guidance amplifies what is left of it, and the null branch may still make the class."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attacks.base import ONE_STEP, Attack, AttackContext, Finding, Resume, as_record, from_record, rate
from bench.api import POSITIVE, Metric, Scaled, param
from bench.registry import ATTACKS

ACCURACY = Metric("accuracy", "forget", higher_is_better=False)
NULL_AS_FORGET = Metric("null_as_forget", "forget", higher_is_better=False)
TEACHER_NULL_AS_FORGET = Metric("teacher_null_as_forget", "forget", higher_is_better=False)


@dataclass(frozen=True)
class ConditionsConfig:
    guidance: tuple[float, ...] = param((1.0, 2.0, 3.0, 5.0), "issue 13; field report 2.2(5): guidance sweeps "
                                        "(w = 1: no guidance; the SA/SalUn/SFD cond_scale is w - 1)")  # fmt: skip
    per_class: int = param(100, "probe images per forgotten class", valid=POSITIVE)
    null_images: int = param(200, "null-class samples (of the model, and of the teacher)", valid=POSITIVE)


@ATTACKS.register("conditions")
class Conditions(Attack):
    name = "conditions"
    title = "sampling conditions"
    threat = "nothing beyond sampling access: the guidance scale and the null label are sampler inputs"
    requires = frozenset()
    sources = "field report 2.2(5): guidance sweeps and unconditional-branch sampling (ESD and SA act on it)"
    one_step = (
        "guidance does not apply: a one-step generator is sampled without guidance (SiD/SFD sample cond_scale 0), "
        "so only w = 1 is written and the other scales are declared not applicable. The null label is an input "
        "like any other, so its rate is measured, though the generator was distilled on class labels only: "
        "its null-class output is what it makes when asked for no class, not a trained unconditional model"
    )
    Config = ConditionsConfig
    scaled = {
        "smoke": Scaled({"per_class": 4, "null_images": 4}, "seconds-long test runs"),
        "paper": Scaled({"per_class": 500, "null_images": 1000}, "GPU scale"),
    }
    metrics = (ACCURACY, NULL_AS_FORGET, TEACHER_NULL_AS_FORGET)

    def not_applicable(self, model) -> dict[str, str]:
        if model.kind == ONE_STEP:
            return {
                f"w={w:g}": "a one-step generator takes no guidance" for w in self.config.guidance if w != 1
            }
        return {}

    def _null_rate(self, model, ctx: AttackContext) -> tuple[float, int]:
        n = self.config.null_images
        labels = torch.full((n,), model.num_classes)
        _, seeds = ctx.probe_grid(n, classes=(model.num_classes,))
        pred = ctx.judged(ctx.sample(model, labels, seeds, guidance=1.0))
        return rate(torch.isin(pred, torch.tensor(ctx.forget))), n

    def run(self, model, ctx: AttackContext, resume: Resume) -> list[Finding]:
        cfg = self.config
        labels, seeds = ctx.probe_grid(cfg.per_class)
        findings = []
        skipped = self.not_applicable(model)
        for w in cfg.guidance:
            unit = f"w={w:g}"
            if unit in skipped:
                continue
            if (rows := resume.finished(unit)) is None:
                hits = ctx.hits(ctx.sample(model, labels, seeds, guidance=w), labels)
                rows = resume.finish(unit, [as_record(Finding(ACCURACY, rate(hits), len(hits),
                                                              {"w": w}))])  # fmt: skip
            findings += [from_record(r) for r in rows]
        if (rows := resume.finished("null")) is None:
            share, n = self._null_rate(model, ctx)
            ref, _ = ctx.teacher_figure("null_rate", lambda: self._null_rate(ctx.teacher, ctx))
            rows = resume.finish("null", [as_record(Finding(NULL_AS_FORGET, share, n, {"w": 1.0})),
                                          as_record(Finding(TEACHER_NULL_AS_FORGET, ref, n, {"w": 1.0}))])  # fmt: skip
        return findings + [from_record(r) for r in rows]
