"""SFD on the shipped fashion-mnist teacher at the default preset: class 0 is forgotten, the rest kept;
`sid` (no forgetting terms) keeps class 0."""

import pytest

from bench import store
from bench.config import RunSpec
from bench.context import Runtime
from bench.runner import execute

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    results = tmp_path_factory.mktemp("sfd")
    out = {}
    for method in ("sfd", "sid"):
        spec = RunSpec(
            method=method,
            dataset="fashion-mnist",
            forget_set="class-0",
            seed=0,
            preset="default",
            evaluators=("forget_accuracy", "wallclock"),
        )  # FID is the default sweep's to measure
        rows = store.read_metrics(execute(spec, results, Runtime(progress=False)) / "metrics.jsonl")
        out[method] = {f"{r['metric']}[{r['subset']}]": r["value"] for r in rows}
        print(method, out[method])
    return out


def test_sfd_forgets_class_0_and_sends_it_to_the_anchor(figures):
    sfd = figures["sfd"]
    assert sfd["accuracy[forget]"] <= 0.15  # chance is 0.10
    assert sfd["to_anchor[forget]"] > 0.5  # most class-0 generations now look like the anchor (class 1)
    assert sfd["accuracy[retain]"] >= 0.7
    assert sfd["nfe[all]"] == 1


def test_sid_keeps_class_0(figures):
    # Measured 0.57 at the default preset (the teacher's own class-0 rate is 0.85 with DDIM-25): distillation of
    # every class at 300 CPU iterations keeps class 0 far above chance (0.10) and far above SFD, not yet at 0.7.
    assert figures["sid"]["accuracy[forget]"] >= 0.5
    assert figures["sid"]["accuracy[forget]"] >= 10 * max(figures["sfd"]["accuracy[forget]"], 0.01)
    assert figures["sid"]["to_anchor[forget]"] <= 0.1
    assert figures["sid"]["accuracy[retain]"] >= 0.7
