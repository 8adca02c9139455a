"""SalUn and SFR-on on the shipped fashion-mnist teacher at the default preset, sampled as the papers do (guidance
3): each at least halves the judge's accuracy on class-0 generations relative to `original` while the retained
classes stay recognisable (>= 0.6).

The other baselines do not forget at this CPU budget, as measured in the README's default-run table (ESD 95%, SA
95%, RL 90%, EraseDiff 98% against the teacher's 99% at guidance 3; GA 0% but retained 55%). They were strict
expected failures here until they cost 9 of CI's 40 minutes for figures the default sweep measures anyway."""

import pytest

from bench import store
from bench.config import RunSpec
from bench.context import Runtime
from bench.models import store as model_store
from bench.presets import condition_name, get_preset
from bench.runner import execute

pytestmark = pytest.mark.slow

BASELINES = ("salun", "sfron")
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
    # Sampled at the asserted guidance alone: the preset's second condition (guidance 1) is the default table's.
    mp.setattr("bench.runner.guidances", lambda preset, dataset="": (preset.guidance,))
    out = {}
    try:
        for method in ("original", *BASELINES):
            spec = RunSpec(method=method, dataset="fashion-mnist", forget_set="class-0", seed=0,
                           preset="default", evaluators=("forget_accuracy",))  # fmt: skip
            rows = store.read_metrics(execute(spec, results, Runtime(progress=False)) / "metrics.jsonl")
            out[method] = {
                f"{r['metric']}[{r['subset']}]": r["value"] for r in rows if r["condition"] == MAIN
            }
            print(method, out[method])
    finally:
        mp.undo()
    return out


@pytest.mark.parametrize("method", BASELINES)
def test_baseline_forgets_class_0_and_keeps_the_rest(figures, method):
    got, original = figures[method], figures["original"]
    assert got["accuracy[forget]"] <= 0.5 * original["accuracy[forget]"]
    assert got["accuracy[retain]"] >= 0.6
