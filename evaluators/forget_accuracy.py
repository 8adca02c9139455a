"""Forget accuracy: how often the judge recognises generations as the class they were conditioned on."""

from __future__ import annotations

import torch

from bench.api import EvalContext, Evaluator, Metric, SampleSet
from bench.models.judge import judge_probs
from bench.registry import EVALUATORS

ACC_FORGET = Metric("accuracy", "forget", higher_is_better=False)
ACC_RETAIN = Metric("accuracy", "retain", higher_is_better=True)
PROB_FORGET = Metric("prob", "forget", higher_is_better=False)
ENTROPY_FORGET = Metric("entropy", "forget", higher_is_better=True, unit="nats")
TO_ANCHOR = Metric("to_anchor", "forget", higher_is_better=True)


@EVALUATORS.register("forget_accuracy")
class ForgetAccuracy(Evaluator):
    """accuracy (forget / retain subsets), and for the forgotten classes the judge's mean probability of the
    conditioning class and mean predictive entropy (as SA and SFD report them), and the fraction labelled as
    the anchor class: the one the method sent them to (Method.anchors: SFD's `anchor`, SalUn's relabel target),
    or, when it sends them to random retained classes, any retained class."""

    name = "forget_accuracy"
    version = "1"
    metrics = (ACC_FORGET, ACC_RETAIN, PROB_FORGET, ENTROPY_FORGET, TO_ANCHOR)

    def __call__(self, samples: SampleSet, ctx: EvalContext):
        probs = judge_probs(ctx.judge, samples.images, device=ctx.device)
        pred = probs.argmax(-1)
        labels = samples.labels
        forget = (labels[:, None] == labels.new_tensor(ctx.forget_set.forget)).any(-1)
        retain = ~forget
        hit = (pred == labels).float()
        p_cond = probs.gather(1, labels[:, None]).squeeze(1)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
        nf, nr = int(forget.sum()), int(retain.sum())
        if nf == 0 or nr == 0:
            raise ValueError("the evaluation grid needs samples of both forgotten and retained classes")
        return [
            (ACC_FORGET, hit[forget].mean().item(), nf),
            (ACC_RETAIN, hit[retain].mean().item(), nr),
            (PROB_FORGET, p_cond[forget].mean().item(), nf),
            (ENTROPY_FORGET, entropy[forget].mean().item(), nf),
            (
                TO_ANCHOR,
                torch.isin(pred[forget], pred.new_tensor(ctx.anchor_classes)).float().mean().item(),
                nf,
            ),
        ]
