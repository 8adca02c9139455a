"""Wall-clock cost of a run: unlearning time, sampling time and throughput, NFE per image, peak memory."""

from __future__ import annotations

from bench.api import EvalContext, Evaluator, Metric, SampleSet
from bench.registry import EVALUATORS

UNLEARN_S = Metric("unlearn_s", "all", higher_is_better=False, unit="s")
SAMPLE_S = Metric("sample_s", "all", higher_is_better=False, unit="s")
IMAGES_PER_S = Metric("images_per_s", "all", higher_is_better=True, unit="img/s")
NFE = Metric("nfe", "all", higher_is_better=False, unit="evals/img")
PEAK_MEM = Metric("peak_mem_mb", "all", higher_is_better=False, unit="MiB")


@EVALUATORS.register("wallclock")
class Wallclock(Evaluator):
    """Figures measured by the runner around unlearning and sampling (peak memory: resident set on CPU,
    allocated memory on CUDA, from the start of the run to the end of sampling)."""

    name = "wallclock"
    version = "1"
    metrics = (UNLEARN_S, SAMPLE_S, IMAGES_PER_S, NFE, PEAK_MEM)

    def __call__(self, samples: SampleSet, ctx: EvalContext):
        n = len(samples.images)
        return [
            (UNLEARN_S, samples.unlearn_s, 1),
            (SAMPLE_S, samples.sample_s, n),
            (IMAGES_PER_S, n / samples.sample_s, n),
            (NFE, samples.nfe, n),
            (PEAK_MEM, samples.peak_mem_mb, 1),
        ]
