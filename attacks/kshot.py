"""k-shot relearning: fine-tune the unlearned network on k real images of the forgotten class and watch the class
come back (or not), against steps, beside the same attack on `original` (the ceiling) and `retrain` (the oracle
that never saw the class: a perfectly erased model relearns from k images too, so the gap to it is what counts).
The k images are clear examples (AttackContext.choose): relearning one the judge finds ambiguous would lower forget
accuracy on the untouched teacher itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from attacks.base import Attack, AttackContext, Finding, Resume, as_record, from_record
from attacks.finetune import log_auc, log_probes, relearning_curve, steps_to_reach, teacher_probe_accuracy
from bench.api import POSITIVE, Metric, Scaled, param
from bench.registry import ATTACKS

SRC = (
    "issue 13; shared/research/field-2024-2026.md 2.2 (DiMRA arXiv 2512.03564, concept resurgence 2410.08074)"
)
CALIBRATED = "calibrated on the shipped default teacher (README, Robustness)"

ACCURACY = Metric("accuracy", "forget", higher_is_better=False)
AUC = Metric("auc", "forget", higher_is_better=False)
STEPS = Metric("steps_to_relearn", "forget", higher_is_better=True, unit="steps")
RELEARNED = Metric("relearned", "forget", higher_is_better=False)


@dataclass(frozen=True)
class KShotConfig:
    shots: tuple[int, ...] = param((1, 5, 25), f"{SRC}: k in {{1, 5, 25}} real images per forgotten class")
    steps: int = param(200, f"S, the last probe step ({CALIBRATED})", valid=POSITIVE)
    probes: int = param(4, "log-spaced probes after step 0 (1 <= step <= S)", valid=POSITIVE)
    lr: float = param(
        2e-5, f"Adam learning rate ({CALIBRATED}: 1e-4 damages the untouched teacher)", valid=POSITIVE
    )
    batch_size: int = param(16, "images per step, drawn with replacement from the k", valid=POSITIVE)
    per_class: int = param(100, "probe images per forgotten class (the default grid's 100)", valid=POSITIVE)
    grad_clip: float = param(1.0, "gradient-norm clip of the teacher recipe", valid=POSITIVE)


def curve_findings(curve, *, params: dict, reference: float) -> list[Finding]:
    """The curve's rows, its log-axis area, whether and when it reached half the teacher's no-attack value."""
    threshold = reference / 2
    common = {**params, "threshold": threshold, "teacher_accuracy": reference}
    out = [Finding(ACCURACY, h / n, n, {**params, "steps": s}) for s, h, n in curve]
    n = curve[-1][2]
    out.append(Finding(AUC, log_auc(curve), n, {**params, "steps": curve[-1][0]}))
    reached = steps_to_reach(curve, threshold)
    out.append(Finding(RELEARNED, float(reached is not None), n, {**common, "steps": curve[-1][0]}))
    if reached is not None:  # never reached within S: no number is made up (relearned says 0)
        out.append(Finding(STEPS, reached, n, common))
    return out


@ATTACKS.register("kshot")
class KShot(Attack):
    name = "kshot"
    title = "k-shot relearning"
    threat = "the weights and k real training images of each forgotten class"
    requires = frozenset({"forget"})
    sources = ("the relearning attacks of DiMRA (arXiv 2512.03564) and concept resurgence (arXiv 2410.08074), with "
               "k real images as in the field report's 2.2(c): plain fine-tuning with the model's training loss")  # fmt: skip
    one_step = (
        "one-step generators (SFD, SiD) have no denoising chain, so no DDPM loss reaches their one-step output: "
        "the generator's network is fine-tuned through its one-step forward, G(z, c_f) regressed on the k images "
        "(mean squared error, a fresh latent per image and step), and probed by sampling it in one step. That is "
        "the strongest image loss an attacker has with only the k images (no discriminator, no teacher); `sid`, "
        "distilled but not unlearned, is its one-step ceiling"
    )
    Config = KShotConfig
    scaled = {
        "smoke": Scaled({"shots": (1, 2), "steps": 2, "probes": 2, "batch_size": 2, "per_class": 4},
                        "seconds-long test runs"),
        "paper": Scaled({"steps": 1000, "probes": 6, "batch_size": 64, "per_class": 500},
                        "GPU scale: a longer attack, a larger probe grid"),
    }  # fmt: skip
    metrics = (ACCURACY, AUC, STEPS, RELEARNED)

    def run(self, model, ctx: AttackContext, resume: Resume) -> list[Finding]:
        cfg = self.config
        x, y = ctx.data("forget")
        picks = ctx.choose(x, y, max(cfg.shots), "kshot/images", exemplars=True)
        reference = teacher_probe_accuracy(ctx, cfg.per_class)
        probes = log_probes(cfg.steps, cfg.probes)
        findings = []
        for k in cfg.shots:
            unit = f"kshot-k{k}"
            if (rows := resume.finished(unit)) is None:
                idx = picks[:, :k].flatten()
                curve = relearning_curve(model, x[idx], y[idx], ctx, resume, unit=unit, lr=cfg.lr,
                                         batch_size=cfg.batch_size, probes=probes, per_class=cfg.per_class,
                                         grad_clip=cfg.grad_clip)  # fmt: skip
                found = curve_findings(curve, params={"k": k, "lr": cfg.lr}, reference=reference)
                rows = resume.finish(unit, [as_record(f) for f in found])
            findings += [from_record(r) for r in rows]
        return findings
