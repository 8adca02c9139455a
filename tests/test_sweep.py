"""Sweep files (`bench run --sweep`), list values that expand into runs, `all-classes`, the resolved sweep record,
report labels for swept settings and the table across forget classes (issue 15, items 2 and 4)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest

from bench import store, sweep
from bench.cli import RUN_DEFAULTS, build_parser, main, make_specs
from bench.config import cli_choices, expand_sets
from bench.data import forget_set_names
from bench.errors import BenchError
from bench.registry import METHODS
from bench.report import across, load, make_report
from tests.test_report import write_run

SWEEPS = Path(__file__).resolve().parent.parent / "sweeps"


def specs_of(*argv: str):
    """The run specs `bench run ARGV` would run (make_specs, as --dry-run lists them)."""
    args = build_parser().parse_args(["run", "--dry-run", *argv])
    sweep.resolve_args(args, RUN_DEFAULTS)
    return make_specs(args)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# Parsing -------------------------------------------------------------------------------------------------------


def test_a_sweep_file_is_read_and_typed(tmp_path):
    f = write(tmp_path / "mine.toml", """
methods = ["sfd", "esd"]
datasets = "fashion-mnist"
forget_sets = ["class-0", "all-classes"]
seeds = [0, 1, 0]
preset = "smoke"
launcher = "local"
workers = 3
amp = true
[set]
sfd.lr_generator = [1e-5, 1e-4]
[set.esd]
iterations = 7
""")  # fmt: skip
    s = sweep.load(f)
    assert s.values == {"methods": ["sfd", "esd"], "datasets": ["fashion-mnist"], "seeds": [0, 1],
                        "forget_sets": ["class-0", "all-classes"], "preset": "smoke", "launcher": "local",
                        "workers": 3, "amp": True, "results": Path("results") / "mine"}  # fmt: skip
    assert s.sets == {"sfd": {"lr_generator": [1e-5, 1e-4]}, "esd": {"iterations": 7}}


def test_a_sweep_file_asks_for_attacks_as_the_command_line_does(tmp_path):
    f = write(tmp_path / "attacked.toml", 'evaluators = ["+robustness", "+kshot", "fid"]\n')
    assert sweep.load(f).values["evaluators"] == ["+robustness", "+kshot", "fid"]


def test_command_line_flags_win_over_the_file_and_sets_combine(tmp_path, fmnist_dir):
    f = write(tmp_path / "s.toml", 'methods = ["sfd", "esd"]\nseeds = [0, 1]\npreset = "smoke"\n'
                                   '[set]\nsfd.lr_generator = [1e-5, 1e-4]\nsfd.iterations = 3\n')  # fmt: skip
    specs = specs_of("--sweep", str(f), "--seeds", "5", "--set", "sfd.lr_generator=2e-5",
                     "--data-dir", str(fmnist_dir))  # fmt: skip
    assert {s.seed for s in specs} == {5} and {s.preset for s in specs} == {"smoke"}
    sfd = [s.overrides for s in specs if s.method == "sfd"]
    assert sfd == [(("iterations", 3), ("lr_generator", 2e-5))]
    assert [s.overrides for s in specs if s.method == "esd"] == [()]
    # --methods leaves out the file's sfd: its settings are then not an error
    only = specs_of("--sweep", str(f), "--methods", "esd", "--data-dir", str(fmnist_dir))
    assert {s.method for s in only} == {"esd"}


@pytest.mark.parametrize(("text", "says"), [
    ('metods = ["sfd"]', "unknown key 'metods'; valid keys: methods, datasets, forget_sets, seeds, preset"),
    ('methods = ["sfd", "nope"]', "unknown method 'nope'; valid methods: .*esd.*sfd"),
    ('evaluators = ["+robustnes"]', "unknown evaluator 'robustnes'; valid evaluators"),
    ('preset = "huge"', "unknown preset 'huge'; valid presets: default, paper, smoke"),
    ("seeds = [0, 1.5]", "seeds = .*expected a non-empty list of integers"),
    ("methods = []", "methods = \\[\\]: expected a non-empty list of names"),
    ('launcher = "cloud"', "expected one of inline, local, slurm"),
    ("[set]\nnope.lr = 1", r"\[set\]: unknown method 'nope'; valid methods"),
    ("[set]\nsfd.itrations = [1, 2]", "sfd has no field 'itrations'; fields: .*iterations"),
    ("[set]\nslurm.time = 5", "slurm settings belong in the cluster file"),
    ('[set]\nsfd.iterations = ["many"]', "sfd.iterations=many: expected a int"),
    ("methods = [", "cannot read it"),
])  # fmt: skip
def test_bad_sweep_files_exit_2_naming_the_file(tmp_path, fmnist_dir, capsys, text, says):
    f = write(tmp_path / "bad.toml", text + "\n")
    argv = ["run", "--sweep", str(f), "--data-dir", str(fmnist_dir), "--results", str(tmp_path / "r")]
    assert main([*argv, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert pytest.importorskip("re").search(says, err) and str(f) in err
    assert not (tmp_path / "r").exists()


# Expansion -----------------------------------------------------------------------------------------------------


def test_list_values_expand_into_distinct_runs_per_method(tmp_path, fmnist_dir):
    f = write(tmp_path / "grid.toml", 'methods = ["sfd", "esd"]\npreset = "smoke"\n'
                                      "[set]\nsfd.lr_generator = [1e-5, 1e-4]\nesd.lr = [1e-5, 2e-5]\n")  # fmt: skip
    specs = specs_of("--sweep", str(f), "--data-dir", str(fmnist_dir))
    assert sorted((s.method, s.overrides) for s in specs) == [
        ("esd", (("lr", 1e-5),)), ("esd", (("lr", 2e-5),)),
        ("sfd", (("lr_generator", 1e-5),)), ("sfd", (("lr_generator", 1e-4),)),
    ]  # fmt: skip
    ids = [s.run_id for s in specs]
    assert len(set(ids)) == 4 and all(i.startswith(("sfd-fashion-mnist-class-0-s0-smoke-",
                                                    "esd-fashion-mnist-class-0-s0-smoke-")) for i in ids)  # fmt: skip
    # The command line's v1,v2 is the same grid: the same run ids
    cli = specs_of("--methods", "sfd,esd", "--preset", "smoke", "--set", "sfd.lr_generator=1e-5,1e-4",
                   "--set", "esd.lr=1e-5,2e-5", "--data-dir", str(fmnist_dir))  # fmt: skip
    assert sorted(s.run_id for s in cli) == sorted(ids)
    # Two settings of one method: their cartesian product; a value written twice is one run
    grid = specs_of("--methods", "sfd", "--preset", "smoke", "--set", "sfd.lr_generator=1e-5,1e-4,1e-05",
                    "--set", "sfd.iterations=2,3", "--data-dir", str(fmnist_dir))  # fmt: skip
    assert len(grid) == 4 and len({s.run_id for s in grid}) == 4


@dataclass(frozen=True)
class TupleConfig:
    widths: tuple = field(default=(8, 16))
    lr: float = 1e-3


def test_a_tuple_valued_field_keeps_its_commas():
    """No shipped method has a tuple-valued setting today; coerce reads one from "8,16", so on the command line a
    comma stays inside the value, and a sweep file gives several tuples as a list of lists."""
    configs = {"m": TupleConfig}
    assert expand_sets(cli_choices(["m.widths=8,16", "m.lr=1,2"], configs), configs) == {
        "m": [{"widths": (8, 16), "lr": 1.0}, {"widths": (8, 16), "lr": 2.0}]
    }
    s = sweep.Sweep(path=Path("f.toml"), text="", sets={"m": {"widths": [[8, 16], [4, 8]]}})
    assert expand_sets(s.choices(configs), configs) == {"m": [{"widths": (8, 16)}, {"widths": (4, 8)}]}
    s.sets = {"m": {"widths": [8, 16]}}
    assert expand_sets(s.choices(configs), configs) == {"m": [{"widths": (8, 16)}]}


def test_all_classes_is_every_single_class_forget_set(fmnist_dir):
    specs = specs_of("--methods", "sfd", "--preset", "smoke", "--forget-sets", "all-classes,class-3",
                     "--data-dir", str(fmnist_dir))  # fmt: skip
    assert [s.forget_set for s in specs] == [f"class-{k}" for k in range(10)]


def test_all_classes_of_a_dataset_without_class_forget_sets_is_an_error():
    class NoClasses:
        name = "faces"

        def forget_set(self, name):
            raise BenchError(f"unknown forget set {name!r}")

        def forget_sets(self):
            return ["id-<number>"]

    assert forget_set_names(NoClasses(), ["id-1"]) == ["id-1"]
    with pytest.raises(BenchError, match="dataset faces has no class-K forget sets; valid: id-<number>"):
        forget_set_names(NoClasses(), ["all-classes"])


def test_the_shipped_sweeps(tmp_path, fmnist_dir):
    # default.toml is what `bench run` does with no flags: the same runs
    default = specs_of("--sweep", str(SWEEPS / "default.toml"), "--data-dir", str(fmnist_dir))
    assert [s.run_id for s in default] == [s.run_id for s in specs_of("--data-dir", str(fmnist_dir))]
    assert len(default) == len(
        [m for m in METHODS if not METHODS.get(m).oracle and METHODS.get(m).default_sweep and
         METHODS.get(m).tier != "text"]
    )  # fmt: skip
    # paper-cifar10.toml: all 14 methods x 10 classes x 3 seeds at the paper preset, on CIFAR-10
    from tests.fixtures_real import write_cifar10

    write_cifar10(tmp_path)
    paper = specs_of("--sweep", str(SWEEPS / "paper-cifar10.toml"), "--data-dir", str(tmp_path))
    assert len(paper) == len([m for m in METHODS if METHODS.get(m).tier != "text"]) * 10 * 3 == 420
    assert {s.dataset for s in paper} == {"cifar10"} and {s.preset for s in paper} == {"paper"}
    assert {s.forget_set for s in paper} == {f"class-{k}" for k in range(10)}
    assert {"retrain", "sfd-2stage"} <= {s.method for s in paper}


# A smoke sweep, run twice; its record and its report ---------------------------------------------------------


@pytest.mark.slow  # moved out of the fast suite (its 3-minute limit); runs in CI
def test_a_smoke_sweep_runs_once_records_itself_and_reports_a_row_per_value(tmp_path, fmnist_dir, capsys):
    results = tmp_path / "r"
    f = write(tmp_path / "smoke.toml", f'methods = ["finetune"]\npreset = "smoke"\nresults = "{results}"\n'
                                       "[set]\nfinetune.iterations = [1, 2]\n")  # fmt: skip
    argv = ["run", "--sweep", str(f), "--data-dir", str(fmnist_dir)]
    assert main(argv) == 0
    assert "2 runs, 2 to do" in capsys.readouterr().out
    record = json.loads((results / "sweep.json").read_text())
    assert record["sweep"] == str(f.resolve()) and record["text"] == f.read_text()
    assert sorted(r["overrides"]["iterations"] for r in record["runs"]) == [1, 2]
    assert {r["run_id"] for r in record["runs"]} == {p.name for p in (results / "runs").iterdir()}
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file()}
    assert main(argv) == 0  # the second time: nothing to do, nothing written
    assert "2 runs, 0 to do" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file()}
    report = make_report(results)
    assert "| finetune[iterations=1] |" in report.markdown and "| finetune[iterations=2] |" in report.markdown


# Report labels and the table across forget classes --------------------------------------------------------------


def with_spec(d: Path, overrides: dict, config: dict) -> None:
    store.write_json(d / "spec.json", {"overrides": overrides, "config": config})


def test_report_labels_only_the_settings_that_vary(tmp_path):
    root = tmp_path / "sweep"
    values = {"accuracy[forget]": 0.1, "accuracy[retain]": 0.9}
    for seed, lr in ((0, 1e-5), (1, 1e-5), (0, 1e-4)):
        d = write_run(root, f"sfd-{lr}", seed, values)
        with_spec(d, {"lr_generator": lr, "iterations": 5}, {"lr_generator": lr, "iterations": 5})
    with_spec(write_run(root, "sfd-default", 0, values), {}, {"lr_generator": 3e-5, "iterations": 5})
    with_spec(write_run(root, "esd-plain", 0, values), {"iterations": 5}, {"iterations": 5})
    df = load(root)
    df = df.assign(method=df["run_id"].str.split("-").str[0])  # write_run names the method by its run id
    labels = sweep.label_swept(df, {rid: store.run_dir(root, rid) for rid in df["run_id"].unique()})
    runs = labels.drop_duplicates("run_id").set_index("run_id")["method"]
    assert runs["sfd-1e-05-fashion-mnist-class-0-s0-default"] == "sfd[lr_generator=1e-05]"
    assert runs["sfd-1e-05-fashion-mnist-class-0-s1-default"] == "sfd[lr_generator=1e-05]"
    assert runs["sfd-0.0001-fashion-mnist-class-0-s0-default"] == "sfd[lr_generator=0.0001]"
    assert runs["sfd-default-fashion-mnist-class-0-s0-default"] == "sfd[lr_generator=3e-05]"  # its config's
    assert runs["esd-plain-fashion-mnist-class-0-s0-default"] == "esd"  # the same for all its runs: no label


def hand_rows(per_class: dict[str, dict[str, list[float]]], *, dataset="fashion-mnist", preset="default"):
    """Tidy rows: method -> forget set -> accuracy[forget] of each seed (accuracy[retain] = 1 - it)."""
    rows = []
    for method, classes in per_class.items():
        for fs, seeds in classes.items():
            for seed, v in enumerate(seeds):
                for metric, subset, value in (("accuracy", "forget", v), ("accuracy", "retain", 1 - v)):
                    rows.append({"run_id": f"{method}-{fs}-{seed}", "method": method, "dataset": dataset,
                                 "forget_set": fs, "seed": seed, "preset": preset, "metric": metric,
                                 "subset": subset, "value": value, "evaluator": "forget_accuracy"})  # fmt: skip
    return pd.DataFrame(rows)


T_2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom


def test_the_table_across_forget_classes(tmp_path):
    df = hand_rows({
        "sfd": {"class-0": [0.0, 0.2], "class-1": [0.2], "class-2": [0.3]},  # class means 0.1, 0.2, 0.3
        "finetune": {"class-0": [0.5], "class-1": [0.5], "class-2": [0.5]},
    })  # fmt: skip
    df = pd.concat([df, hand_rows({"sfd": {"class-0": [0.9]}}, preset="paper"),  # one class only: no table
                    hand_rows({"sfd": {"classes-1-2": [0.4]}})])  # fmt: skip  # not a single class: left out
    summary = across.summarize_across(df).set_index(["preset", "method", "column"])
    sfd = summary.loc[("default", "sfd", "accuracy[forget]")]
    half = T_2 * 0.1 / math.sqrt(3)
    assert sfd["n"] == 3 and sfd["mean"] == pytest.approx(0.2)
    assert (sfd["lo"], sfd["hi"]) == (pytest.approx(0.2 - half), pytest.approx(0.2 + half))
    ft = summary.loc[("default", "finetune", "accuracy[retain]")]
    assert ft["mean"] == pytest.approx(0.5) and ft["lo"] == pytest.approx(0.5) == ft["hi"]
    assert "paper" not in summary.index.get_level_values("preset")

    markdown, paths = across.write_across(df, tmp_path / "report")
    assert [p.name for p in paths] == ["across_classes.csv", "across_classes.md",
                                       "table_fashion-mnist_default_across-classes.tex"]  # fmt: skip
    assert "**fashion-mnist, preset default: across forget classes**" in markdown
    assert f"| sfd | 3 | 20.0 [{100 * (0.2 - half):.1f}, {100 * (0.2 + half):.1f}] |" in markdown
    assert markdown.index("| sfd |") < markdown.index("| finetune |")  # the reference method first
    csv = pd.read_csv(paths[0]).set_index("method")
    assert csv.at["sfd", "accuracy[forget]_mean"] == pytest.approx(0.2)
    assert csv.at["sfd", "accuracy[forget]_n"] == 3
    tex = paths[2].read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex and "Student-$t$" in tex and "\\scriptsize" in tex
    assert across.write_across(df[df["forget_set"] == "class-0"], tmp_path / "none") == ("", [])


def test_lr_scale_multiplies_every_learning_rate_of_every_method(tmp_path, fmnist_dir):
    """Issue 15.5: all.lr_scale scales each method's learning rates (SFD's two together); scale 1 is the
    unscaled run itself, and a method without a learning rate is left alone."""
    from bench.config import resolve_config

    specs = specs_of("--methods", "original,sfd,esd", "--set", "all.lr_scale=0.1,1,10", "--data-dir",
                     str(fmnist_dir))  # fmt: skip
    plain = {
        s.method: s.run_id for s in specs_of("--methods", "original,sfd,esd", "--data-dir", str(fmnist_dir))
    }
    by = {}
    for s in specs:
        by.setdefault(s.method, []).append(s)
    assert len(by["original"]) == 1 and len(by["sfd"]) == len(by["esd"]) == 3
    for method, runs in by.items():
        assert plain[method] in {s.run_id for s in runs}  # scale 1: the default run, not a copy of it
    sfd = {dict(s.overrides).get("lr_scale", 1.0): resolve_config(METHODS.get("sfd"), "default", dict(s.overrides))
           for s in by["sfd"]}  # fmt: skip
    assert sfd[10.0].lr_fake == pytest.approx(10 * sfd[1.0].lr_fake) and sfd[
        0.1
    ].lr_generator == pytest.approx(0.1 * sfd[1.0].lr_generator)
    assert sfd[10.0].iterations == sfd[1.0].iterations  # nothing but the learning rates
    # the shipped sensitivity sweep: 11 methods x 3 scales, the scale-1 runs the default sweep's
    sens = specs_of("--sweep", str(SWEEPS / "lr-sensitivity.toml"), "--data-dir", str(fmnist_dir))
    assert len(sens) == 11 * 3
    default = {s.run_id for s in specs_of("--data-dir", str(fmnist_dir))}
    assert len({s.run_id for s in sens} & default) == 11
    for bad, says in (("original.lr_scale=2", "original has no field 'lr_scale'"),
                      ("all.nope=1", "no method in --methods .* has a field 'nope'"),
                      ("sfd.lr_scale=-1", "sfd.lr_scale=-1.0: must be a positive number")):  # fmt: skip
        with pytest.raises(BenchError, match=says):
            for s in specs_of("--methods", "original,sfd", "--set", bad, "--data-dir", str(fmnist_dir)):
                resolve_config(METHODS.get(s.method), s.preset, dict(s.overrides))
