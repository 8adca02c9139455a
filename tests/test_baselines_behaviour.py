"""ESD, SA, SalUn, SFR-on, GA, RL and EraseDiff on the shipped fashion-mnist teacher at the default preset: each at
least halves the judge's accuracy on class-0 generations relative to `original` while retained classes stay
recognisable (>= 0.6), or is a strict expected failure with its measured figures."""

import pytest

from bench import store
from bench.config import RunSpec
from bench.context import Runtime
from bench.models import store as model_store
from bench.runner import execute

pytestmark = pytest.mark.slow

BASELINES = ("esd", "sa", "salun", "sfron", "ga", "rl", "erasediff")


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    if not (
        model_store.model_dir(model_store.SHIPPED, "fashion-mnist", "default", 0) / model_store.MANIFEST
    ).is_file():
        pytest.skip("the shipped fashion-mnist teacher and judge are not there yet")
    results = tmp_path_factory.mktemp("baselines")
    mp = pytest.MonkeyPatch()
    mp.setenv("BENCH_MODEL_DIR", str(tmp_path_factory.mktemp("models")))  # SA's Fisher cache starts empty
    out = {}
    try:
        for method in ("original", *BASELINES):
            spec = RunSpec(
                method=method, dataset="fashion-mnist", forget_set="class-0", seed=0, preset="default"
            )
            rows = store.read_metrics(execute(spec, results, Runtime(progress=False)) / "metrics.jsonl")
            out[method] = {f"{r['metric']}[{r['subset']}]": r["value"] for r in rows}
            print(method, out[method])
    finally:
        mp.undo()
    return out


SA_AT_CPU_SCALE = pytest.mark.xfail(
    strict=True,
    reason="measured: SA keeps class 0 at the default preset (forget accuracy 0.78 vs original 0.85 after 80 of "
    "its 20k iterations; 0.81-0.83 before its replay was stored as the official 8-bit PNGs); reported in the README rather than tuned away from the paper. Strict: if SA starts "
    "forgetting at this budget, this fails and the README must be updated.",
)


GA_COLLAPSES = pytest.mark.xfail(
    strict=True,
    reason="measured: GA (alpha 1, SalUn's --method ga) erases class 0 by its 15th iteration but takes the retained "
    "classes with it (forget accuracy 0.01, retained 0.20, fd_judge 33.8 after 15 iterations): the unbounded ascent term "
    "outweighs the retained one. Strict: if GA starts keeping the retained classes, this fails.",
)
ERASEDIFF_AT_CPU_SCALE = pytest.mark.xfail(
    strict=True,
    reason="measured: EraseDiff keeps class 0 at the default preset (forget accuracy 0.83 vs original 0.85, retained "
    "0.86, after 36 of its 288 upper steps): its upper forget term, 0.1 x a random-label MSE of about "
    "0.005, is tiny against the pixel-summed retained loss (about 8), and the lower-level steps are undone each "
    "round. Strict: if EraseDiff starts forgetting at this budget, this fails and the method card must be updated.",
)
RL_AT_CPU_SCALE = pytest.mark.xfail(
    strict=True,
    reason="measured: RL with alpha rescaled as SalUn's (x12 at 1x16x16) keeps class 0 at 0.51 after 15 of its 1000 "
    "iterations (retained 0.85, fd_judge 1.0; original 0.85); with the paper's alpha unscaled it erased class 0 "
    "(0.00) but kept only 0.65 of the retained classes. Strict: if RL starts forgetting at this budget, this fails.",
)
EXPECTED_FAILURES = {
    "sa": SA_AT_CPU_SCALE,
    "ga": GA_COLLAPSES,
    "rl": RL_AT_CPU_SCALE,
    "erasediff": ERASEDIFF_AT_CPU_SCALE,
}


@pytest.mark.parametrize(
    "method",
    [pytest.param(m, marks=EXPECTED_FAILURES[m]) if m in EXPECTED_FAILURES else m for m in BASELINES],
)
def test_baseline_forgets_class_0_and_keeps_the_rest(figures, method):
    got, original = figures[method], figures["original"]
    assert got["accuracy[forget]"] <= 0.5 * original["accuracy[forget]"]
    assert got["accuracy[retain]"] >= 0.6
