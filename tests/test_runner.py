"""The runner: an interruption at any point resumes to the same result without redoing finished work."""

import json

import pytest

from bench import store
from bench.config import RunSpec
from bench.context import Runtime
from bench.registry import EVALUATORS
from bench.runner import execute


class Interrupt(Exception):
    pass


SFD_SMOKE = RunSpec(method="sfd", dataset="fashion-mnist", forget_set="class-0", seed=0, preset="smoke")


@pytest.fixture(scope="module")
def sfd_smoke(tmp_path_factory, fmnist_dir):
    """One uninterrupted smoke run of SFD (a one-step generator: it samples its grid in a moment)."""
    return execute(
        SFD_SMOKE, tmp_path_factory.mktemp("straight"), Runtime(data_dir=fmnist_dir.parent, progress=False)
    )


@pytest.mark.slow
def test_interrupted_evaluation_resumes_without_unlearning_again(
    tmp_path, fmnist_dir, monkeypatch, sfd_smoke
):
    spec = SFD_SMOKE
    runtime = Runtime(data_dir=fmnist_dir.parent, progress=False)
    straight = sfd_smoke

    fid_cls = EVALUATORS.get("fid")
    real_call = fid_cls.__call__

    def die(self, samples, ctx):
        raise Interrupt

    monkeypatch.setattr(fid_cls, "__call__", die)
    with pytest.raises(Interrupt):
        execute(spec, tmp_path / "b", runtime)
    d = store.run_dir(tmp_path / "b", spec.run_id)
    assert (d / "model" / "unlearn.json").is_file() and not (d / "metrics.jsonl").exists()
    assert not store.is_done(d)
    saved = (d / "model" / "unlearn.json").read_text()

    monkeypatch.setattr(fid_cls, "__call__", real_call)
    import methods.sfd

    monkeypatch.setattr(methods.sfd.SFD, "unlearn", lambda *a: pytest.fail("unlearning ran again"))
    execute(spec, tmp_path / "b", runtime)
    assert store.is_done(d) and (d / "model" / "unlearn.json").read_text() == saved

    def values(directory):
        return {(r["metric"], r["subset"]): r["value"] for r in store.read_metrics(directory / "metrics.jsonl")
                if r["evaluator"] != "wallclock"}  # fmt: skip

    assert values(straight) == values(d)
    spec_json = json.loads((d / "spec.json").read_text())
    assert spec_json["run_id"] == spec.run_id and spec_json["config"]["iterations"] == 4


@pytest.mark.slow  # moved out of the fast suite (its 3-minute limit); runs in CI
def test_killed_unlearning_resumes_from_its_state_dump(tmp_path, fmnist_dir, monkeypatch):
    spec = RunSpec(method="sfd", dataset="fashion-mnist", forget_set="class-0", seed=0, preset="smoke",
                   overrides=(("iterations", 6),))  # fmt: skip
    runtime = Runtime(data_dir=fmnist_dir.parent, progress=False, checkpoint_every=2)
    straight = execute(spec, tmp_path / "a", runtime)

    from bench.context import RunContext

    real_save, saves = RunContext.save_state, []

    def save_then_die(self, state):
        real_save(self, state)
        saves.append(state["step"])
        if len(saves) == 2:
            raise Interrupt

    monkeypatch.setattr(RunContext, "save_state", save_then_die)
    with pytest.raises(Interrupt):
        execute(spec, tmp_path / "b", runtime)
    monkeypatch.setattr(RunContext, "save_state", real_save)
    resumed = execute(spec, tmp_path / "b", runtime)
    a = (straight / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    b = (resumed / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert saves == [2, 4] and a == b
    assert not (resumed / "state").exists()  # the state dump is dropped once the model is saved


@pytest.mark.slow
def test_a_run_made_with_another_config_is_refused_not_reused(fmnist_dir, tmp_path, monkeypatch):
    """The run id hashes the spec; when the code's preset scaling changes, old results must not pass for new."""
    from bench import launch
    from bench.errors import BenchError
    from methods.esd import ESDNew

    runtime = Runtime(data_dir=fmnist_dir.parent, progress=False)
    spec = RunSpec(method="esd-new", dataset="fashion-mnist", forget_set="class-0", seed=0, preset="smoke")
    d = execute(spec, tmp_path, runtime)
    before = (d / "metrics.jsonl").read_bytes()
    smoke = ESDNew.scaled["smoke"]
    monkeypatch.setitem(ESDNew.scaled, "smoke", type(smoke)({**smoke.overrides, "iterations": 4}, smoke.why))
    for attempt in (lambda: launch.plan([spec], tmp_path), lambda: execute(spec, tmp_path, runtime)):
        with pytest.raises(BenchError, match=r"iterations 3 -> 4.*--force"):
            attempt()
    assert (d / "metrics.jsonl").read_bytes() == before  # nothing lost
    assert launch.plan([spec], tmp_path, force=True).todo == [spec]


def test_a_smoke_run_writes_intervals_and_checked_outcomes(sfd_smoke):
    d = sfd_smoke
    rows = {(r["metric"], r["subset"]): r for r in store.read_metrics(d / "metrics.jsonl")}
    outcomes = store.read_outcomes(d)
    for key in (
        "accuracy[forget]",
        "accuracy[retain]",
        "to_anchor[forget]",
        "prob[forget]",
        "entropy[forget]",
    ):
        r = rows[tuple(key[:-1].split("["))]
        assert r["ci_low"] <= r["value"] <= r["ci_high"], key
        values, test = outcomes[store.outcome_key(key, r["condition"])]
        assert len(values) == r["n"] and values.mean() == pytest.approx(r["value"]), key  # one per image
        assert (test, r["ci_method"]) == (("mcnemar", "wilson") if "prob" not in key and "entropy" not in key
                                          else ("wilcoxon", "bootstrap-1000")), key  # fmt: skip
    fd = rows[("fd_judge", "retain")]
    assert 0 <= fd["ci_low"] <= fd["ci_high"] and fd["ci_method"] == "bootstrap-1000-shifted"
    fd_outcomes = outcomes[store.outcome_key("fd_judge[retain]", fd["condition"])]
    assert fd_outcomes[0].shape == (1000,) and fd_outcomes[1] == "bootstrap"
    assert rows[("unlearn_s", "all")]["ci_low"] is None and not any(
        k.startswith("unlearn_s") for k in outcomes
    )  # measured once
    assert json.loads((d / "DONE").read_text())["outcomes_sha256"]


@pytest.mark.slow  # three smoke runs with the shipped teacher's network
def test_a_stored_oracle_is_loaded_and_the_rows_say_so(tmp_path, fmnist_dir, monkeypatch):
    """retrain keeps its oracle; the next run with the same key loads it, and its rows (and its model record, so a
    resumed evaluation too) say what was reused and how long it took to compute."""
    monkeypatch.setenv("BENCH_MODEL_DIR", str(tmp_path / "store"))
    spec = RunSpec(method="retrain", dataset="fashion-mnist", forget_set="class-0", seed=0, preset="smoke",
                   evaluators=("forget_accuracy", "wallclock"))  # fmt: skip
    runtime = Runtime(data_dir=fmnist_dir.parent, progress=False)
    first = store.read_metrics(execute(spec, tmp_path / "a", runtime) / "metrics.jsonl")
    assert {r["reused"] for r in first} == {""}
    d = execute(spec, tmp_path / "b", runtime)
    again = store.read_metrics(d / "metrics.jsonl")
    assert {r["reused"] for r in again} == {"oracle"} and all(r["reused_s"] > 0 for r in again)
    assert [r["value"] for r in again if r["metric"] == "accuracy"] == [
        r["value"] for r in first if r["metric"] == "accuracy"
    ]
    (d / "metrics.jsonl").unlink()  # evaluated again from the saved model: the record still says so
    assert {
        r["reused"] for r in store.read_metrics(execute(spec, tmp_path / "b", runtime) / "metrics.jsonl")
    } == {"oracle"}


@pytest.mark.slow  # moved out of the fast suite (its 3-minute limit); runs in CI
def test_multi_step_models_are_sampled_under_every_condition_one_step_generators_once(
    tmp_path, fmnist_dir, monkeypatch
):
    """Issue 12.4: the papers' protocol (guidance 3 for multi-step models, none for one-step generators) and a
    second condition (guidance 1); each row says how its images were sampled, and a run evaluated under other
    conditions than its preset now asks for is evaluated again, without unlearning again."""
    import dataclasses

    import methods.finetune
    from bench import launch, presets, status

    smoke = presets.PRESETS["smoke"]
    monkeypatch.setitem(
        presets.PRESETS, "smoke", dataclasses.replace(smoke, guidance=3.0, also_guidance=(1.0,))
    )
    runtime = Runtime(data_dir=fmnist_dir.parent, progress=False)
    evaluators = ("forget_accuracy", "wallclock")
    found = {}
    for method in ("finetune", "sfd"):
        spec = RunSpec(method=method, dataset="fashion-mnist", forget_set="class-0", seed=0, preset="smoke",
                       evaluators=evaluators)  # fmt: skip
        d = execute(spec, tmp_path, runtime)
        found[method] = (spec, d, store.read_metrics(d / "metrics.jsonl"))
        assert store.done_conditions(d) == ["guidance 3", "guidance 1"]

    _, d, rows = found["finetune"]
    by = {(r["condition"], r["metric"], r["subset"]): r for r in rows}
    for condition, w in (("guidance 3", 3.0), ("guidance 1", 1.0)):
        r = by[(condition, "nfe", "all")]
        assert (r["guidance"], r["sampler"], r["value"]) == (w, "ddim-10 eta 0", 10 * (2 if w != 1 else 1))
        assert by[(condition, "accuracy", "forget")]["guidance"] == w
    assert (
        by[("guidance 3", "accuracy", "retain")]["value"] != by[("guidance 1", "accuracy", "retain")]["value"]
    )
    outcomes = store.read_outcomes(d)
    assert {"accuracy[forget] @ guidance 3", "accuracy[forget] @ guidance 1"} <= set(outcomes)

    _, _, rows = found["sfd"]  # sampled once: the same figures under both conditions, without guidance
    one = {}
    for r in rows:
        assert r["guidance"] is None and r["sampler"] == "one-step"
        one.setdefault(r["condition"], {})[(r["metric"], r["subset"])] = r["value"]
    assert set(one) == {"guidance 3", "guidance 1"} and one["guidance 3"][("nfe", "all")] == 1
    assert {k: v for k, v in one["guidance 3"].items() if k[0] != "sample_s"} == {
        k: v for k, v in one["guidance 1"].items() if k[0] != "sample_s"
    }

    # The preset drops its second condition: the finished run is to do again, and only its evaluation is redone.
    monkeypatch.setitem(presets.PRESETS, "smoke", dataclasses.replace(smoke, guidance=3.0))
    spec, d, before = found["finetune"]
    assert launch.plan([spec], tmp_path).todo == [spec]
    state = status.run_states(tmp_path, [spec.run_id])[spec.run_id]
    assert state.state == "done" and "the next `bench run` evaluates it again" in state.detail
    monkeypatch.setattr(methods.finetune.Finetune, "unlearn", lambda *a: pytest.fail("unlearning ran again"))
    execute(spec, tmp_path, runtime)
    after = store.read_metrics(d / "metrics.jsonl")
    assert {r["condition"] for r in after} == {"guidance 3"} and store.done_conditions(d) == ["guidance 3"]
    assert [r["value"] for r in after if r["metric"] == "accuracy"] == [
        r["value"] for r in before if r["metric"] == "accuracy" and r["condition"] == "guidance 3"
    ]
    assert launch.plan([spec], tmp_path).done == [spec]
