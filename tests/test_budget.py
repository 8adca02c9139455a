"""Matched budgets (`bench run --budget-s`, issue 15.3): seconds into iterations from a calibration, the EMA decay
that moves with them, the methods that cannot run a budget, the sweep key, and the report "at equal unlearning
time" on hand-made rows."""

from __future__ import annotations

import json
import logging
import math

import pandas as pd
import pytest

from bench import budget, store, sweep
from bench.cli import main
from bench.config import RunSpec, resolve_config
from bench.errors import BenchError
from bench.registry import METHODS
from bench.report import make_report
from tests.test_sweep import specs_of, write

COSTS = {"sfd": (2.0, 0.5), "esd": (0.0, 0.1), "salun": (8.0, 1.0)}  # method -> (fixed_s, per_iteration_s)


@pytest.fixture
def calibrated(tmp_path, monkeypatch):
    """A hand-made calibration of the default and smoke presets on fashion-mnist."""
    methods = {m: {"fixed_s": f, "per_iteration_s": p, "iterations": 10, "measured_s": f + 10 * p}
               for m, (f, p) in COSTS.items()}  # fmt: skip
    path = tmp_path / "budgets.json"
    path.write_text(
        json.dumps({budget.key(p, "fashion-mnist"): {"methods": methods} for p in ("default", "smoke")})
    )
    monkeypatch.setattr(budget, "CALIBRATION", path)
    return path


def test_a_budget_is_the_iterations_that_fit_and_the_ema_keeps_its_share_of_training(calibrated):
    sfd = METHODS.get("sfd")
    # (12 s - 2 s fixed) / 0.5 s = 20 iterations; the preset's 0.98 over 300 iterations -> 0.98 ** (300 / 20).
    got = budget.overrides(sfd, "default", "fashion-mnist", 12.0, {})
    assert got["iterations"] == 20
    assert got["ema_decay"] == pytest.approx(0.98**15, abs=1e-8)
    half_life = math.log(0.5) / math.log(got["ema_decay"])
    assert half_life / 20 == pytest.approx((math.log(0.5) / math.log(0.98)) / 300, rel=1e-6)
    # Everything else stays as the preset has it: learning rates and batch.
    base, budgeted = resolve_config(sfd, "default", {}), resolve_config(sfd, "default", got)
    assert (budgeted.lr_generator, budgeted.batch_size) == (base.lr_generator, base.batch_size)
    # A method without an EMA gets its iterations only; floor, never more than the budget.
    assert budget.overrides(METHODS.get("esd"), "default", "fashion-mnist", 1.05, {}) == {"iterations": 10}


def test_a_budget_too_small_for_the_fixed_cost_is_refused_with_the_figures(calibrated):
    salun = METHODS.get("salun")
    assert "fixed cost (8.0 s)" in budget.fits(salun, "default", "fashion-mnist", 8.5)
    assert budget.fits(salun, "default", "fashion-mnist", 9.0) == ""
    with pytest.raises(BenchError, match=r"cannot run one iteration.*fixed cost is 8.0 s"):
        budget.overrides(salun, "default", "fashion-mnist", 8.5, {})


@pytest.mark.parametrize("method", ["original", "retrain", "sid", "sfd-2stage"])
def test_methods_that_cannot_run_a_budget_say_why(calibrated, method):
    cls = METHODS.get(method)
    assert budget.not_budgeted(cls)
    with pytest.raises(BenchError, match=f"{method} runs no budget"):
        budget.overrides(cls, "default", "fashion-mnist", 30.0, {})


def test_bad_budgets_and_clashing_settings_are_errors(calibrated, tmp_path):
    sfd = METHODS.get("sfd")
    with pytest.raises(BenchError, match="drop --set sfd.iterations"):
        budget.overrides(sfd, "default", "fashion-mnist", 30.0, {"iterations": 5})
    with pytest.raises(BenchError, match="positive number of seconds"):
        budget.overrides(sfd, "default", "fashion-mnist", -1.0, {})
    with pytest.raises(BenchError, match=r"ga is not in the budget calibration.*calibrated: sfd, esd, salun"):
        budget.overrides(METHODS.get("ga"), "default", "fashion-mnist", 30.0, {})
    with pytest.raises(BenchError, match=r"no budget calibration for preset paper.*perf budget_calibration"):
        budget.overrides(sfd, "paper", "fashion-mnist", 30.0, {})
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(BenchError, match=f"budget calibration {broken} is unreadable"):
        budget.calibration("default", "fashion-mnist", broken)


@pytest.mark.parametrize(("dataset", "tier"), [("fashion-mnist", "class"), ("fashion-mnist-text", "text")])
def test_every_method_of_the_default_sweep_but_the_controls_is_in_the_shipped_calibration(dataset, tier):
    """The shipped file covers what `--budget-s` runs by default (sweeps/budgets.toml; on the text tier, its
    default sweep and the methods run by name that take a budget)."""
    costs = budget.calibration("default", dataset, budget.CALIBRATION)
    runnable = [m for m in METHODS if METHODS.get(m).tier == tier and not METHODS.get(m).oracle
                and (METHODS.get(m).default_sweep or tier == "text") and not budget.not_budgeted(METHODS.get(m))]  # fmt: skip
    assert sorted(costs) == sorted(runnable)
    for cost in costs.values():  # fixed + n per-iteration is the measured clock
        assert cost["per_iteration_s"] > 0
        assert cost["fixed_s"] + cost["iterations"] * cost["per_iteration_s"] == pytest.approx(
            cost["measured_s"], abs=0.05
        )


def test_budget_runs_expand_per_budget_and_leave_out_what_cannot_run(calibrated, caplog):
    with caplog.at_level(logging.WARNING, logger="bench"):
        specs = specs_of("--methods", "sfd,esd,original,salun", "--budget-s", "5,12", "--preset", "smoke")
    got = {(s.method, s.budget_s): dict(s.overrides) for s in specs}
    assert set(got) == {("sfd", 5.0), ("sfd", 12.0), ("esd", 5.0), ("esd", 12.0), ("salun", 12.0)}
    assert got["esd", 5.0] == {"iterations": 50} and got["sfd", 12.0]["iterations"] == 20
    assert "--budget-s 5,12: original left out: no unlearning" in caplog.text
    assert "--budget-s 5: salun left out: its fixed cost (8.0 s)" in caplog.text
    assert len({s.run_id for s in specs}) == len(specs)
    # Without a budget the run is the one it always was (the same id).
    plain = specs_of("--methods", "sfd", "--preset", "smoke")[0]
    assert plain.budget_s == 0.0 and "budget_s" not in plain.to_dict()
    assert RunSpec.from_dict(specs[0].to_dict()) == specs[0]
    with pytest.raises(BenchError, match="no method of the sweep can run these budgets"):
        specs_of("--methods", "original", "--budget-s", "5", "--preset", "smoke")


def test_the_budget_flag_and_sweep_key_check_their_values(calibrated, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["run", "--budget-s", "10,-3", "--dry-run"])
    assert "budget -3: expected a positive number of seconds" in capsys.readouterr().err
    f = write(tmp_path / "b.toml", 'methods = ["esd"]\npreset = "smoke"\nbudget_s = [3, 6.5]\n')
    assert sweep.load(f).values["budget_s"] == [3.0, 6.5]
    specs = specs_of("--sweep", str(f))
    assert [(s.budget_s, dict(s.overrides)) for s in specs] == [
        (3.0, {"iterations": 30}),
        (6.5, {"iterations": 65}),
    ]
    bad = write(tmp_path / "bad.toml", 'budget_s = ["ten"]\n')
    with pytest.raises(BenchError, match=r"budget_s = \['ten'\]: expected positive seconds"):
        sweep.load(bad)


def _budget_run(root, method, budget_s, forget, fd, seconds, iterations):
    run_id = f"{method}-fashion-mnist-class-0-s0-default-b{budget_s:g}"
    common = {"run_id": run_id, "method": method, "dataset": "fashion-mnist", "forget_set": "class-0", "seed": 0,
              "n": 100, "unit": "", "preset": "default", "condition": "guidance 3", "evaluator_version": "1",
              "method_version": "1", "budget_s": budget_s}  # fmt: skip
    rows = [{**common, "evaluator": "forget_accuracy", "metric": "accuracy", "subset": "forget", "value": forget,
             "higher_is_better": False, "ci_low": forget - 0.05, "ci_high": forget + 0.05},
            {**common, "evaluator": "fid", "metric": "fd_judge", "subset": "retain", "value": fd,
             "higher_is_better": False, "ci_low": fd - 0.5, "ci_high": fd + 0.5},
            {**common, "evaluator": "wallclock", "metric": "unlearn_s", "subset": "all", "value": seconds,
             "higher_is_better": False, "unit": "s", "ci_low": None, "ci_high": None}]  # fmt: skip
    d = store.run_dir(root, run_id)
    store.write_metrics(d / "metrics.jsonl", rows)
    (d / "spec.json").write_text(json.dumps({"overrides": {"iterations": iterations}, "budget_s": budget_s,
                                             "config": {"iterations": iterations}}))  # fmt: skip


def test_the_report_tabulates_and_plots_at_equal_unlearning_time(tmp_path):
    root = tmp_path / "sweep"
    for method, runs in {"sfd": [(15, 0.9, 1.0, 16.2, 20), (30, 0.2, 1.5, 31.0, 50)],
                         "esd": [(15, 0.95, 0.4, 14.1, 150), (30, 0.5, 0.6, 29.5, 300)]}.items():  # fmt: skip
        for b, af, fd, s, n in runs:
            _budget_run(root, method, float(b), af, fd, s, n)
    report = make_report(root, tmp_path / "out")
    out = tmp_path / "out"
    md = (out / "budgets.md").read_text()
    assert md in report.markdown and "guidance 3: at equal unlearning time" in md
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines()]
    lines = {c[0]: c[1:] for c in cells if c[0] in ("sfd", "esd")}
    # A row per method (not per iteration count), a forget/fd pair per budget.
    assert lines["sfd"] == [
        "90.0 [85.0, 95.0]",
        "1.00 [0.50, 1.50]",
        "20.0 [15.0, 25.0]",
        "1.50 [1.00, 2.00]",
    ]
    assert lines["esd"][0] == "95.0 [90.0, 100.0]"
    assert "15 s: sfd 16, esd 14; 30 s: sfd 31, esd 30" in md
    assert not (out / "table.md").exists()  # budgeted runs only: no main table averaging the budgets
    latex = (out / "budgets_0.tex").read_text()
    assert (
        r"\toprule" in latex and r"\multicolumn{2}{c}{15 s}" in latex and "sfd & 90.0 [85.0, 95.0]" in latex
    )
    csv = pd.read_csv(out / "budgets.csv")
    assert sorted(set(csv.budget_s)) == [15.0, 30.0] and set(csv.method) == {"sfd", "esd"}
    assert (out / "budgets.png").is_file() and (out / "budgets.pdf").is_file()


def test_a_text_sweep_takes_its_budgets_from_the_text_tiers_calibration(fmnist_dir, caplog):
    """On fashion-mnist-text the shipped `default/fashion-mnist-text` costs set each text method's iterations;
    the closed-form edit (text-uce) and the control are left out with why."""
    costs = budget.calibration("default", "fashion-mnist-text", budget.CALIBRATION)
    with caplog.at_level(logging.WARNING, logger="bench"):
        specs = specs_of("--datasets", "fashion-mnist-text", "--forget-sets", "concept-trouser", "--budget-s", "60",
                         "--data-dir", str(fmnist_dir.parent))  # fmt: skip
    got = {s.method: dict(s.overrides)["iterations"] for s in specs}
    assert set(got) == {"text-esd-u", "text-finetune", "text-salun"}  # the default text sweep's budgeted ones
    for m, n in got.items():
        assert n == math.floor((60 - costs[m]["fixed_s"]) / costs[m]["per_iteration_s"])
    assert (
        "text-uce left out: a closed-form edit" in caplog.text
        and "original left out: no unlearning" in caplog.text
    )
