"""ESD, SA, SalUn, SFR-on, GA, RL and EraseDiff on the shipped fashion-mnist teacher at the default preset, sampled as
the papers do (guidance 3): each at least halves the judge's accuracy on class-0 generations relative to `original`
while retained classes stay recognisable (>= 0.6), or is a strict expected failure with its measured figures."""

import pytest

from bench import store
from bench.config import RunSpec
from bench.context import Runtime
from bench.models import store as model_store
from bench.presets import condition_name, get_preset
from bench.runner import execute

pytestmark = pytest.mark.slow

BASELINES = ("esd", "sa", "salun", "sfron", "ga", "rl", "erasediff")
MAIN = condition_name(get_preset("default").guidance)  # the papers' protocol: guidance 3


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    if not (
        model_store.model_dir(model_store.SHIPPED, "fashion-mnist", "default", 0) / model_store.MANIFEST
    ).is_file():
        pytest.skip("the shipped fashion-mnist teacher and judge are not there yet")
    results = tmp_path_factory.mktemp("baselines")
    mp = pytest.MonkeyPatch()
    # An empty user store: SA's replay and Fisher come from the shipped store, as in a fresh `bench run`.
    mp.setenv("BENCH_MODEL_DIR", str(tmp_path_factory.mktemp("models")))
    out = {}
    try:
        for method in ("original", *BASELINES):
            spec = RunSpec(
                method=method, dataset="fashion-mnist", forget_set="class-0", seed=0, preset="default"
            )
            rows = store.read_metrics(execute(spec, results, Runtime(progress=False)) / "metrics.jsonl")
            out[method] = {
                f"{r['metric']}[{r['subset']}]": r["value"] for r in rows if r["condition"] == MAIN
            }
            print(method, out[method])
    finally:
        mp.undo()
    return out


SA_AT_CPU_SCALE = pytest.mark.xfail(
    strict=True,
    reason="measured: SA keeps class 0 at the default preset (forget accuracy 0.95 vs original 0.99 under the "
    "papers' guidance 3, retained 0.98; 0.59 vs 0.87 at guidance 1, retained 0.81; after 40 of its 20k iterations); "
    "reported in the README rather "
    "than tuned away from the paper. Strict: if SA starts forgetting at this budget, this fails and the README must "
    "be updated.",
)


GA_COLLAPSES = pytest.mark.xfail(
    strict=True,
    reason="measured: GA (alpha 1, SalUn's --method ga) erases class 0 by its 15th iteration but takes the retained "
    "classes with it (forget accuracy 0.00, retained 0.55, fd_judge 23.2 at guidance 3; 0.01, 0.19, 36.4 at guidance "
    "1): the unbounded ascent term outweighs the retained one. Strict: if GA starts keeping the retained classes, this "
    "fails.",
)
ERASEDIFF_AT_CPU_SCALE = pytest.mark.xfail(
    strict=True,
    reason="measured: EraseDiff keeps class 0 at the default preset (forget accuracy 0.98 vs original 0.99 at "
    "guidance 3, retained 1.00; 0.88 vs 0.87 at guidance 1; after 18 of its 288 upper steps): its upper forget term, 0.1 x a random-label MSE of about "
    "0.005, is tiny against the pixel-summed retained loss (about 8), and the lower-level steps are undone each "
    "round. Strict: if EraseDiff starts forgetting at this budget, this fails and the method card must be updated.",
)
RL_AT_CPU_SCALE = pytest.mark.xfail(
    strict=True,
    reason="measured: RL with alpha rescaled as SalUn's (x12 at 1x16x16) keeps class 0 at 0.90 after 15 of its 1000 "
    "iterations at guidance 3 (retained 1.00; original 0.99; at guidance 1: 0.53 vs 0.87); with the paper's alpha unscaled it erased class 0 "
    "(0.00) but kept only 0.65 of the retained classes. Strict: if RL starts forgetting at this budget, this fails.",
)
ESD_HIDES = pytest.mark.xfail(
    strict=True,
    reason="measured: under the papers' guidance 3 ESD's class 0 comes back (forget accuracy 0.95 vs original 0.99, "
    "retained 0.99, after 500 of its 1000 iterations, x_t on a 10-step grid); at guidance 1 it is 0.44 vs 0.87 "
    "(retained 0.82), about half: ESD weakens the conditional branch, and guidance amplifies what is left (the robustness suite "
    "shows the same). Strict: if ESD starts forgetting under guidance 3, this fails and the README must be updated.",
)
EXPECTED_FAILURES = {
    "esd": ESD_HIDES,
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
