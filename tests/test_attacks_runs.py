"""Attacks on finished smoke runs, through bench/attack.py and the command line: rows land beside the run's own
records without confusing them, finished attacks are skipped, a killed one resumes to the same file, another
config is refused, and `--evaluators +robustness` keeps the runs' ids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bench import attack, store
from bench.cli import main
from bench.context import Runtime
from bench.errors import BenchError
from bench.models.store import load_run_model
from bench.registry import ATTACKS

# End to end through the runs and the command line (about 25 s): in the slow set, still in CI.
pytestmark = pytest.mark.slow


class Killed(BaseException):
    """Stands for the process being killed (attack_run records an ordinary exception as a failed attack)."""


@pytest.fixture(scope="module")
def attacked(tmp_path_factory, fmnist_dir):
    """A finished smoke run of `original` (made by the command line, as a user's), attacked by every attack."""
    results = tmp_path_factory.mktemp("attacked")
    assert main(["run", "--methods", "original", "--preset", "smoke", "--results", str(results), "--data-dir",
                 str(fmnist_dir.parent)]) == 0  # fmt: skip
    (d,) = (results / "runs").iterdir()
    runtime = Runtime(data_dir=fmnist_dir.parent, progress=False)
    status = attack.attack_sweep(results, ATTACKS.names(), runtime)
    return results, d, runtime, status


def _copy(attacked, results: Path) -> Path:
    """The fixture's finished run, not yet attacked, in another sweep folder (no second smoke run)."""
    _, d, _, _ = attacked
    dest = results / "runs" / d.name
    shutil.copytree(d, dest, ignore=shutil.ignore_patterns(attack.FOLDER))
    return dest


def test_rows_are_tidy_and_beside_the_run_records(attacked):
    results, d, _, status = attacked
    class_tier = [n for n in ATTACKS.names() if ATTACKS.get(n).tier == "class"]
    assert status == {d.name: {**dict.fromkeys(class_tier, "done"),
                               "textual-inversion": f"does not apply: {attack.CLASS_TIER}"}}  # fmt: skip
    rows = attack.load_rows(results)
    assert {r["evaluator"] for r in rows} == set(class_tier)
    assert all(set(store.COLUMNS) <= set(r) and r["run_id"] == d.name and r["kind"] == "attack" for r in rows)
    kshot = [r for r in rows if r["evaluator"] == "kshot" and r["metric"] == "accuracy"]
    assert {(r["k"], r["steps"]) for r in kshot} == {(k, s) for k in (1, 2) for s in (0, 1, 2)}
    for name in ATTACKS.names():
        record = json.loads((d / "robustness" / name / "DONE").read_text())
        assert record["rows_sha256"] == attack.rows_sha(d / "robustness" / name / "rows.jsonl")
        assert not (d / "robustness" / name / "state").exists()
    # the run's own records are untouched and still verify: the report reads metrics.jsonl alone
    assert store.is_done(d) and load_run_model(d / "model")
    assert set(store.load_results(results)["evaluator"]) == {"forget_accuracy", "fid", "wallclock"}


def test_finished_attacks_are_skipped(attacked, monkeypatch):
    results, d, runtime, _ = attacked
    for name in ATTACKS.names():
        monkeypatch.setattr(ATTACKS.get(name), "run", lambda *a: pytest.fail("a finished attack ran again"))
    assert attack.attack_sweep(results, ATTACKS.names(), runtime)[d.name]["kshot"] == "done"


def test_an_attack_made_with_another_config_is_refused(attacked, monkeypatch):
    results, _, runtime, _ = attacked
    cls = ATTACKS.get("conditions")
    smoke = cls.scaled["smoke"]
    monkeypatch.setitem(cls.scaled, "smoke", type(smoke)({**smoke.overrides, "null_images": 3}, smoke.why))
    with pytest.raises(BenchError, match="--force"):
        attack.attack_sweep(results, ["conditions"], runtime)


def test_a_killed_attack_resumes_to_the_same_file(attacked, tmp_path, monkeypatch):
    _, d, runtime, _ = attacked
    other = _copy(attacked, tmp_path)
    from bench.context import RunContext

    real, saves = RunContext.save_state, []

    def save_then_die(self, state):
        real(self, state)
        saves.append(1)
        if len(saves) == 3:
            raise Killed

    monkeypatch.setattr(RunContext, "save_state", save_then_die)
    with pytest.raises(Killed):
        attack.attack_run(other, ["kshot"], runtime)
    assert (other / "robustness" / "kshot" / "state" / "state.pt").is_file()
    monkeypatch.setattr(RunContext, "save_state", real)
    assert attack.attack_run(other, ["kshot"], runtime) == {"kshot": "done"}
    name = "robustness/kshot/rows.jsonl"
    assert (other / name).read_text() == (d / name).read_text()


def test_an_unfinished_run_is_not_attacked(tmp_path, fmnist_dir):
    d = tmp_path / "runs" / "x"
    d.mkdir(parents=True)
    status = attack.attack_sweep(tmp_path, ["kshot"], Runtime(data_dir=fmnist_dir.parent, progress=False))
    assert status["x"]["kshot"].startswith("skipped")


def test_plus_robustness_adds_the_attacks_and_keeps_the_run_ids():
    defaults = ["forget_accuracy", "fid", "wallclock"]
    assert attack.evaluator_names(None, defaults) == defaults
    assert attack.evaluator_names(["+robustness"], defaults) == defaults
    assert attack.evaluator_names(["fid", "robustness"], defaults) == ["fid"]
    assert attack.evaluator_names(["robustness"], defaults) == defaults  # a run keeps its own evaluation
    assert attack.evaluator_names(["+clip_score", "+kshot"], defaults) == [*defaults, "clip_score"]
    assert attack.requested(["+robustness"]) == tuple(ATTACKS.names())
    assert attack.requested(["fid", "kshot"]) == ("kshot",)
    assert attack.requested(None) == ()
    assert "retrain" in attack.with_controls(None, ("kshot",)) and attack.with_controls(
        ["sfd"], ("kshot",)
    ) == ["sfd"]


def test_command_line_run_and_attack(attacked, tmp_path, fmnist_dir, capsys):
    d = _copy(attacked, tmp_path)
    common = ["--preset", "smoke", "--results", str(tmp_path), "--data-dir", str(fmnist_dir.parent)]
    # the run is finished: `+conditions` adds an attack without changing the run's id, so nothing is redone
    assert main(["run", "--methods", "original", "--evaluators", "+conditions", *common]) == 0
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [d.name]
    assert {r["evaluator"] for r in attack.load_rows(tmp_path)} == {"conditions"}
    capsys.readouterr()
    assert (
        main(
            ["attack", "--results", str(tmp_path), "--attacks", "kshot", "--data-dir", str(fmnist_dir.parent)]
        )
        == 0
    )
    assert "kshot: done" in capsys.readouterr().out
    assert {r["evaluator"] for r in attack.load_rows(tmp_path)} == {"conditions", "kshot"}
    assert main(["attack", "--results", str(tmp_path), "--attacks", "nope"]) == 2
    assert "valid attacks" in capsys.readouterr().err
    assert main(["attack", "--cards"]) == 0
    assert "threat model" in capsys.readouterr().out


def test_report_draws_the_curves_and_writes_the_robustness_table(attacked, tmp_path):
    from bench.report import make_report

    results, _, _, _ = attacked
    report = make_report(results, tmp_path / "report")
    names = {p.name for p in report.paths}
    stem = "fashion-mnist_class-0_smoke"
    assert {
        f"robustness_{stem}.md",
        f"robustness_{stem}.tex",
        "robustness.csv",
        f"relearning_{stem}.png",
    } <= names
    assert "## Robustness" in report.markdown and "| original |" in report.markdown
    import pandas as pd

    wide = pd.read_csv(tmp_path / "report" / "robustness.csv")
    assert list(wide["method"]) == ["original"] and wide["AUC k=1 mean"].iloc[0] == pytest.approx(1.0)
    assert "\\toprule" in (tmp_path / "report" / f"robustness_{stem}.tex").read_text()


def test_the_perf_benchmark_times_the_suite(attacked, tmp_path, fmnist_dir, monkeypatch):
    from benchmarks import BENCHMARKS
    from benchmarks import robustness as bench_robustness

    assert BENCHMARKS["robustness"] == "benchmarks.robustness"
    monkeypatch.setenv("BENCH_DATA_DIR", str(fmnist_dir.parent))
    d = _copy(attacked, tmp_path)
    figures = bench_robustness.run(torch.device("cpu"), attacks=("conditions", "concealment"), out=tmp_path,
                                   run_dir=d)  # fmt: skip
    assert [r["attack"] for r in figures["attacks"]] == ["conditions", "concealment"]
    assert figures["total_s"] >= sum(r["seconds"] for r in figures["attacks"]) > 0
    assert (tmp_path / "robustness.json").is_file() and "budget" in bench_robustness.table(figures)
