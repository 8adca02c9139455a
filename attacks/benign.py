"""Benign relearning (DiMRA-style): fine-tune the unlearned network on retained-class data only and see whether the
forgotten class comes back by itself. The attacker never holds a forgotten image (a test replaces the forget
readers by functions that fail)."""

from __future__ import annotations

from dataclasses import dataclass

from attacks.base import Attack, AttackContext, Finding, Resume, as_record, from_record
from attacks.finetune import log_probes, relearning_curve, teacher_probe_accuracy
from attacks.kshot import ACCURACY, AUC, RELEARNED, STEPS, curve_findings
from bench.api import FRACTION, POSITIVE, Scaled, param
from bench.registry import ATTACKS

SRC = "DiMRA (arXiv 2512.03564): fine-tuning on the retain set, no knowledge of the forgotten class"


@dataclass(frozen=True)
class BenignConfig:
    steps: int = param(200, "S, as k-shot relearning's, so the curves share an axis", valid=POSITIVE)
    probes: int = param(4, "log-spaced probes after step 0, as k-shot relearning's", valid=POSITIVE)
    lr: float = param(2e-5, "as k-shot relearning's", valid=POSITIVE)
    batch_size: int = param(16, "retained images per step, drawn with replacement", valid=POSITIVE)
    per_class: int = param(100, "probe images per forgotten class", valid=POSITIVE)
    label_dropout: float = param(0.1, "the teacher recipe's null-label dropout (diffusion models only)",
                                 valid=FRACTION)  # fmt: skip
    grad_clip: float = param(1.0, "gradient-norm clip of the teacher recipe", valid=POSITIVE)


@ATTACKS.register("benign")
class Benign(Attack):
    name = "benign"
    title = "benign relearning"
    threat = "the weights and retained-class training data only (never an image of a forgotten class)"
    requires = frozenset({"retain"})
    sources = f"{SRC}; concept resurgence (Suriyakumar et al., arXiv 2410.08074) for text-to-image models"
    one_step = (
        "as k-shot relearning: the generator's network is fine-tuned through its one-step forward, regressed on "
        "retained images of their own classes, and probed in one step; the null label is not dropped in (the "
        "generator was distilled on class labels only)"
    )
    Config = BenignConfig
    scaled = {
        "smoke": Scaled({"steps": 2, "probes": 2, "batch_size": 2, "per_class": 4}, "seconds-long test runs"),
        "paper": Scaled({"steps": 1000, "probes": 6, "batch_size": 64, "per_class": 500}, "GPU scale"),
    }  # fmt: skip
    metrics = (ACCURACY, AUC, STEPS, RELEARNED)

    def run(self, model, ctx: AttackContext, resume: Resume) -> list[Finding]:
        cfg = self.config
        unit = "benign"
        if (rows := resume.finished(unit)) is None:
            x, y = ctx.data("retain")
            reference = teacher_probe_accuracy(ctx, cfg.per_class)
            dropout = cfg.label_dropout if model.kind != "one-step" else 0.0
            curve = relearning_curve(model, x, y, ctx, resume, unit=unit, lr=cfg.lr, batch_size=cfg.batch_size,
                                     probes=log_probes(cfg.steps, cfg.probes), per_class=cfg.per_class,
                                     grad_clip=cfg.grad_clip, label_dropout=dropout)  # fmt: skip
            found = curve_findings(curve, params={"lr": cfg.lr}, reference=reference)
            rows = resume.finish(unit, [as_record(f) for f in found])
        return [from_record(r) for r in rows]
