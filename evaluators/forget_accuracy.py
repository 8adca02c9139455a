"""Forget accuracy: how often the judge recognises generations as the class they were conditioned on.

Each rate (accuracy, to_anchor) carries its 95% Wilson interval and the per-image outcomes (hit or not) for the
report's exact McNemar test; each mean over images (prob, entropy) its percentile bootstrap interval over the images
and the per-image values for the Wilcoxon signed-rank test (bench.stats).
"""

from __future__ import annotations

import torch

from bench import stats
from bench.api import EvalContext, Evaluator, Measurement, Metric, SampleSet
from bench.models.judge import judge_probs
from bench.registry import EVALUATORS

ACC_FORGET = Metric("accuracy", "forget", higher_is_better=False)
ACC_RETAIN = Metric("accuracy", "retain", higher_is_better=True)
PROB_FORGET = Metric("prob", "forget", higher_is_better=False)
ENTROPY_FORGET = Metric("entropy", "forget", higher_is_better=True, unit="nats")
TO_ANCHOR = Metric("to_anchor", "forget", higher_is_better=True)
# The text tier's (bench.text): the held-out paraphrases of the forgotten and the retained classes, and the
# training prompts of the retained classes the forgotten ones are confused with (EraseBench-style spill-over).
ACC_FORGET_PARAPHRASE = Metric("accuracy", "forget-paraphrase", higher_is_better=False)
ACC_RETAIN_PARAPHRASE = Metric("accuracy", "retain-paraphrase", higher_is_better=True)
ACC_NEIGHBOUR = Metric("accuracy", "neighbour", higher_is_better=True)


def rate(metric: Metric, outcomes: torch.Tensor) -> Measurement:
    """A fraction of images, with its Wilson interval and the images' outcomes (for McNemar)."""
    k, n = int(outcomes.sum()), len(outcomes)
    return Measurement(metric, k / n, n, ci=stats.wilson_interval(k, n), ci_method="wilson",
                       outcomes=outcomes.to(torch.uint8), test=stats.MCNEMAR)  # fmt: skip


def mean(metric: Metric, values: torch.Tensor) -> Measurement:
    """A mean over images, with its percentile bootstrap interval and the images' values (for Wilcoxon)."""
    v = values.double()
    return Measurement(metric, v.mean().item(), len(v), ci=stats.bootstrap_mean_interval(v.numpy()),
                       ci_method=f"bootstrap-{stats.RESAMPLES}", outcomes=v, test=stats.WILCOXON)  # fmt: skip


@EVALUATORS.register("forget_accuracy")
class ForgetAccuracy(Evaluator):
    """accuracy (forget / retain subsets), and for the forgotten classes the judge's mean probability of the
    conditioning class and mean predictive entropy (as SA and SFD report them), and the fraction labelled as
    the anchor class: the one the method sent them to (Method.anchors: SFD's `anchor`, SalUn's relabel target),
    or, when it sends them to random retained classes, any retained class.

    On the text tier these are the training prompts' figures, and three more say how far erasure reaches: the
    accuracy on the paraphrases of the forgotten class (does it generalise beyond the words it was trained on?),
    on the paraphrases of the retained classes, and on the training prompts of the forgotten class's neighbours
    (not measured for a class without neighbours: bag)."""

    name = "forget_accuracy"
    version = "2"  # 2: intervals and per-image outcomes; rates are exact k/n
    metrics = (ACC_FORGET, ACC_RETAIN, PROB_FORGET, ENTROPY_FORGET, TO_ANCHOR,
               ACC_FORGET_PARAPHRASE, ACC_RETAIN_PARAPHRASE, ACC_NEIGHBOUR)  # fmt: skip

    def __call__(self, samples: SampleSet, ctx: EvalContext):
        rows = self._training_prompts(samples.of_kind(), ctx)
        if samples.kinds is not None:
            rows += self._reach(samples, ctx)
        return rows

    def _reach(self, samples: SampleSet, ctx: EvalContext) -> list[Measurement]:
        train, para = samples.of_kind(), samples.of_kind("paraphrase")
        hit = judge_probs(ctx.judge, para.images, device=ctx.device).argmax(-1) == para.labels
        forget = torch.isin(para.labels, torch.tensor(ctx.forget_set.forget))
        rows = [rate(ACC_FORGET_PARAPHRASE, hit[forget]), rate(ACC_RETAIN_PARAPHRASE, hit[~forget])]
        neighbours = ctx.forget_set.neighbours()
        if neighbours:
            near = torch.isin(train.labels, torch.tensor(neighbours))
            pred = judge_probs(ctx.judge, train.images[near], device=ctx.device).argmax(-1)
            rows.append(rate(ACC_NEIGHBOUR, pred == train.labels[near]))
        return rows

    def _training_prompts(self, samples: SampleSet, ctx: EvalContext) -> list[Measurement]:
        probs = judge_probs(ctx.judge, samples.images, device=ctx.device)
        pred = probs.argmax(-1)
        labels = samples.labels
        forget = (labels[:, None] == labels.new_tensor(ctx.forget_set.forget)).any(-1)
        retain = ~forget
        hit = pred == labels
        p_cond = probs.gather(1, labels[:, None]).squeeze(1)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
        if not forget.any() or not retain.any():
            raise ValueError("the evaluation grid needs samples of both forgotten and retained classes")
        return [
            rate(ACC_FORGET, hit[forget]),
            rate(ACC_RETAIN, hit[retain]),
            mean(PROB_FORGET, p_cond[forget]),
            mean(ENTROPY_FORGET, entropy[forget]),
            rate(TO_ANCHOR, torch.isin(pred[forget], pred.new_tensor(ctx.anchor_classes))),
        ]
