"""`bench report`: tables (CSV, Markdown, booktabs LaTeX) and figures, on hand-written metrics and a smoke sweep."""

import json
import logging
import re

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib import image as mpimg
from safetensors.numpy import save_file
from scipy import stats as scipy_stats

from bench import stats, store
from bench.cli import main
from bench.errors import BenchError
from bench.registry import METHODS
from bench.report import load, make_report, plots, tables

# metric -> (subset, evaluator, higher_is_better, unit)
SPECS = {
    "accuracy[forget]": ("forget_accuracy", False, ""),
    "accuracy[retain]": ("forget_accuracy", True, ""),
    "fd_judge[retain]": ("fid", False, ""),
    "unlearn_s[all]": ("wallclock", False, "s"),
    "sample_s[all]": ("wallclock", False, "s"),
    "nfe[all]": ("wallclock", False, "evals/img"),
}
ORACLE = next((m for m in METHODS if METHODS.get(m).oracle), None)


def write_run(root, method, seed, values, *, forget_set="class-0", dataset="fashion-mnist", preset="default"):
    """A run directory with a hand-written metrics.jsonl (the runner's row format)."""
    run_id = f"{method}-{dataset}-{forget_set}-s{seed}-{preset}"
    rows = []
    for key, value in values.items():
        metric, subset = key[:-1].split("[")
        evaluator, hib, unit = SPECS[key]
        rows.append({"run_id": run_id, "method": method, "dataset": dataset, "forget_set": forget_set,
                     "seed": seed, "evaluator": evaluator, "metric": metric, "subset": subset, "value": value,
                     "n": 100, "higher_is_better": hib, "unit": unit, "preset": preset, "evaluator_version": "1",
                     "method_version": "1"})  # fmt: skip
    d = store.run_dir(root, run_id)
    store.write_metrics(d / "metrics.jsonl", rows)
    return d


# Per method: (accuracy[forget], accuracy[retain], fd_judge, unlearn_s) for seed 0; seed 1 adds small offsets.
HAND = {
    "original": (0.98, 0.99, 1.0, 0.002),
    "sfd": (0.01, 0.90, 2.5, 300.0),
    "finetune": (0.50, 0.95, 4.0, 40.0),
    "my_method": (0.20, 0.80, 3.0, 10.0),
}


@pytest.fixture
def hand(tmp_path):
    root = tmp_path / "sweep"
    methods = {**HAND, **({ORACLE: (0.0, 0.97, 0.5, 900.0)} if ORACLE else {})}
    for method, (af, ar, fd, us) in methods.items():
        for seed in (0, 1):
            write_run(root, method, seed, {"accuracy[forget]": af + 0.01 * seed, "accuracy[retain]": ar - 0.01 * seed,
                                           "fd_judge[retain]": fd + 0.1 * seed, "unlearn_s[all]": us * (1 + seed),
                                           "sample_s[all]": 2.0 + seed, "nfe[all]": 10.0})  # fmt: skip
    # a partial sweep: finetune's third seed has only the forget accuracy
    write_run(root, "finetune", 2, {"accuracy[forget]": 0.6})
    return root


def latex_rows(latex: str) -> dict[str, list[str]]:
    """Body rows of a booktabs table: method -> cells."""
    body = latex.split(r"\midrule", 1)[1].split(r"\bottomrule")[0]
    rows = [line.rstrip(" \\").split(" & ") for line in body.splitlines() if " & " in line]
    return {r[0]: r[1:] for r in rows}


def test_method_order_original_reference_registry_then_oracles():
    order = tables.method_order(["zeta", *([ORACLE] if ORACLE else []), "finetune", "sfd", "original"])
    assert order[:3] == ["original", "sfd", "finetune"]
    assert order[-1] == (ORACLE or "zeta")
    assert "zeta" in order


def test_latex_has_booktabs_bold_best_and_escapes(hand):
    df = store.load_results(hand)
    t = next(t for t in tables.build_tables(tables.summarize(df)) if t.kind == "unlearning")
    latex = tables.to_latex(t)
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\caption{", r"\label{tab:"):
        assert rule in latex
    assert "my\\_method" in latex and "fd\\_judge" in latex and "my_method" not in latex
    rows = latex_rows(latex)
    keys = [c.key for c in t.columns]
    acc_f = 1 + keys.index("accuracy[forget]")  # cells start with the n column
    acc_r = 1 + keys.index("accuracy[retain]")
    # lower is better: sfd forgets best; higher is better: finetune keeps most (original and oracle are
    # references, not competitors, so their better values are not bold)
    assert [m for m, cells in rows.items() if cells[acc_f].startswith(r"\textbf{")] == ["sfd"]
    assert [m for m, cells in rows.items() if cells[acc_r].startswith(r"\textbf{")] == ["finetune"]
    assert rows["sfd"][acc_f].startswith(r"\textbf{1.5\,")  # percent: mean of 1% and 2%
    # 2 of 3 runs: 95% and 94%, mean 94.5, t-interval 94.5 -+ t(0.975, 1) * 0.707 / sqrt(2) = -+ 6.35
    assert rows["finetune"][acc_r] == r"\textbf{94.5\,{\scriptsize[88.1, 100.9]}\,{\scriptsize($n$=2)}}"
    assert list(rows) == tables.method_order(rows)  # fixed order, and rules set off original and the oracle
    assert latex.count(r"\midrule") == 2 + (1 if ORACLE else 0)


def test_markdown_and_csv_agree_with_pandas(hand, tmp_path):
    df = store.load_results(hand)
    md, paths = tables.write_tables(df, tmp_path / "out")
    csv = pd.read_csv(paths[0]).set_index("method")
    direct = df.assign(key=df.metric + "[" + df.subset + "]").groupby(["method", "key"])["value"]
    mean, std, count = direct.mean(), direct.std(), direct.count()
    for (method, key), value in mean.items():
        assert csv.at[method, f"{key}_mean"] == pytest.approx(value)  # raw fractions, not percentages
        assert csv.at[method, f"{key}_n"] == count[(method, key)]
        if count[(method, key)] > 1:
            assert csv.at[method, f"{key}_std"] == pytest.approx(std[(method, key)])
            half = (
                scipy_stats.t.ppf(0.975, count[(method, key)] - 1)
                * std[(method, key)]
                / count[(method, key)] ** 0.5
            )
            assert csv.at[method, f"{key}_ci_low"] == pytest.approx(value - half)
            assert csv.at[method, f"{key}_ci_high"] == pytest.approx(value + half)
    assert list(csv.index) == tables.method_order(csv.index)
    # Markdown: percentages with one decimal, mean [t-interval over seeds], the cell count when it differs from
    # the row's
    line = next(row for row in md.splitlines() if row.startswith("| finetune |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    heads = [c.strip() for c in md.splitlines()[2].strip("|").split("|")]
    acc_f = heads.index("Acc. forget (%) ↓")

    def text(key):
        m, s, n = mean[("finetune", key)], std[("finetune", key)], count[("finetune", key)]
        half = scipy_stats.t.ppf(0.975, n - 1) * s / n**0.5
        return f"{100 * m:.1f} [{100 * (m - half):.1f}, {100 * (m + half):.1f}]"

    assert cells[1] == "3" and cells[acc_f] == text("accuracy[forget]")
    assert cells[heads.index("Acc. retain (%) ↑")] == f"**{text('accuracy[retain]')} (n=2)**"
    assert "| original | 2 |" in md and "Unlearn (s) ↓" in md and "NFE ↓" in md
    assert (tmp_path / "out" / "table.md").read_text() == md


def test_one_seed_shows_no_spread_and_counts_no_decimals(tmp_path):
    write_run(tmp_path, "sfd", 0, {"accuracy[forget]": 0.125, "nfe[all]": 1.0, "unlearn_s[all]": 2.3456})
    write_run(tmp_path, "original", 0, {"accuracy[forget]": 0.9, "nfe[all]": 25.0, "unlearn_s[all]": 0.0004})
    md, _ = tables.write_tables(store.load_results(tmp_path), tmp_path / "out")
    assert "| sfd | 1 | **12.5** |" in md
    assert "| sfd | 1 | **2.35** | **1** |" in md  # seconds get three significant digits, NFE is a count
    assert "| original | 1 | 0.00040 | 25 |" in md  # far below the column's scale: two significant digits


def test_partial_sweep_gives_rows_only_for_runs_that_exist(tmp_path):
    write_run(tmp_path, "sfd", 0, {"accuracy[forget]": 0.1})
    write_run(tmp_path, "original", 0, {"accuracy[forget]": 0.9, "nfe[all]": 10.0}, forget_set="class-3")
    write_run(tmp_path, "finetune", 0, {"nfe[all]": 10.0}, forget_set="class-3", preset="smoke")
    md, paths = tables.write_tables(store.load_results(tmp_path), tmp_path / "out")
    csv = pd.read_csv(paths[0])
    assert list(zip(csv.forget_set, csv.preset, csv.method, strict=True)) == [
        ("class-0", "default", "sfd"), ("class-3", "default", "original"), ("class-3", "smoke", "finetune")
    ]  # fmt: skip
    assert csv["nfe[all]_n"].isna().tolist() == [True, False, False]
    assert md.count("preset default: unlearning") == 2 and "preset smoke: cost" in md
    assert "preset smoke: unlearning" not in md and len(paths) == 2 + 4  # csv, md and 4 LaTeX tables


@pytest.mark.slow
def test_report_writes_figures_of_the_expected_size(hand, tmp_path, caplog):
    k = 10
    grid = np.zeros((k, 8, 1, 16, 16), dtype=np.uint8)
    grid[:, :, :, 4:12, 4:12] = np.arange(k, dtype=np.uint8)[:, None, None, None, None] * 25
    for d in (hand / "runs").iterdir():
        if d.name.endswith("-s0-default"):
            save_file({"images": grid}, str(d / "samples.safetensors"))
    corrupt = hand / "runs" / "sfd-fashion-mnist-class-0-s1-default" / "samples.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING):
        report = make_report(hand, tmp_path / "out")
    assert f"cannot read sample grid {corrupt}" in caplog.text  # named and skipped, the report goes on
    names = {p.name for p in report.paths}
    assert {"tradeoff_fashion-mnist_default.png", "wallclock_fashion-mnist_default.pdf",
            "samples_fashion-mnist_class-0_default_s0.png", "table.csv", "table.md"} <= names  # fmt: skip
    assert not any(n.startswith("samples_") and "_s1." in n for n in names)  # seed 1 kept no samples
    df = store.load_results(hand)
    grids = {d.name.split("-")[0]: grid for d in (hand / "runs").iterdir() if d.name.endswith("-s0-default")}
    expected = {
        "tradeoff_fashion-mnist_default.png": plots.tradeoff_figure(df, "fashion-mnist", "default"),
        "wallclock_fashion-mnist_default.png": plots.wallclock_figure(df, "fashion-mnist", "default"),
        "samples_fashion-mnist_class-0_default_s0.png": plots.sample_grid_figure(
            grids, class_names=[str(c) for c in range(k)], forget=[0], title="t"
        ),
    }
    for name, fig in expected.items():
        img = mpimg.imread(tmp_path / "out" / name)
        w, h = fig.get_size_inches() * plots.DPI
        assert img.shape[:2] == (round(h), round(w)), name
        assert img.shape[1] >= 800 and img[..., :3].std() > 0.05, name  # readable size, not blank
        assert (tmp_path / "out" / name.replace(".png", ".pdf")).stat().st_size > 1000
    # the forgotten class is framed in red; the samples themselves are drawn
    img = mpimg.imread(tmp_path / "out" / "samples_fashion-mnist_class-0_default_s0.png")[..., :3]
    red = np.array([0xD6, 0x27, 0x28]) / 255
    assert (np.abs(img - red).max(-1) < 0.05).sum() > 100
    assert len(np.unique(img.round(2).reshape(-1, 3), axis=0)) > k


def test_method_styles_are_fixed_across_figures():
    a = plots.method_style("sfd")
    assert plots.method_style("sfd") == a and plots.method_style("finetune") != a
    if ORACLE:
        assert plots.method_style(ORACLE) == plots.ORACLE_STYLE
    styles = {plots.method_style(m) for m in METHODS}
    assert len(styles) == len(METHODS.names())  # every registered method looks different


def test_time_to_forget_plot(tmp_path):
    points = pd.DataFrame({"method": ["sfd"] * 4 + ["finetune"] * 4, "seconds": [0, 10, 20, 40] * 2,
                           "accuracy_forget": [0.95, 0.4, 0.05, 0.01, 0.95, 0.9, 0.8, 0.7],
                           "fd_judge": [1.0, 3.0, 2.5, 2.2, 1.0, 1.2, 1.3, 1.4]})  # fmt: skip
    fig = plots.time_to_forget_figure(points)
    paths = plots.save(fig, tmp_path, "ttf")
    img = mpimg.imread(paths[0])
    w, h = fig.get_size_inches() * plots.DPI
    assert img.shape[:2] == (round(h), round(w))
    assert img[..., :3].std() > 0.05
    ax_acc, ax_fd = fig.axes[:2]
    assert [line.get_label() for line in ax_acc.lines] == ["sfd", "finetune"]
    np.testing.assert_allclose(ax_acc.lines[0].get_ydata(), [95, 40, 5, 1])
    np.testing.assert_allclose(ax_fd.lines[1].get_ydata(), [1.0, 1.2, 1.3, 1.4])
    with pytest.raises(BenchError, match="missing fd_judge"):
        plots.time_to_forget_figure(points.drop(columns="fd_judge"))


def test_report_draws_time_to_forget_beside_the_sweep(tmp_path):
    sweep = tmp_path / "results" / "default"
    write_run(sweep, "sfd", 0, {"accuracy[forget]": 0.1, "fd_judge[retain]": 2.0})
    bench_dir = tmp_path / "results" / "benchmarks"
    bench_dir.mkdir()
    points = [
        {"method": "sfd", "seconds": s, "accuracy_forget": a, "fd_judge": 2.0}
        for s, a in ((1, 0.9), (5, 0.1))
    ]
    (bench_dir / "time_to_forget.json").write_text(json.dumps({"points": points}))
    names = {p.name for p in make_report(sweep).paths}
    assert {"time_to_forget.png", "time_to_forget.pdf"} <= names


def test_broken_metrics_file_is_named(hand, tmp_path, caplog, capsys):
    broken = hand / "runs" / "broken-run" / "metrics.jsonl"
    broken.parent.mkdir()
    broken.write_text('{"run_id": "broken-run", "value": \n')
    with caplog.at_level(logging.WARNING):
        df = load(hand, strict=False)
    assert str(broken) in caplog.text and "line 1" in caplog.text
    assert "broken-run" not in set(df["run_id"]) and "sfd" in set(df["method"])
    assert main(["report", "--results", str(hand), "--out", str(tmp_path / "out"), "--strict"]) == 2
    assert str(broken) in capsys.readouterr().err
    broken.write_text(json.dumps({c: ("x" if c != "value" else None) for c in store.COLUMNS}) + "\n")
    with pytest.raises(BenchError, match=r"metrics.jsonl, line 1: value None is not a number"):
        load(hand, strict=True)
    broken.write_text(json.dumps({c: ("x" if c != "value" else float("nan")) for c in store.COLUMNS}) + "\n")
    with pytest.raises(BenchError, match=r"non-numeric or non-finite values in x \(x\[x\]\)"):
        load(hand, strict=True)
    assert "x" not in set(load(hand)["run_id"])


def test_empty_or_missing_folder_gives_a_clear_message(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", "--results", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"no results in .*empty: no metrics.jsonl under it; run `python -m bench run", err)
    assert main(["report", "--results", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---- on a real smoke sweep ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory, fmnist_dir):
    results = tmp_path_factory.mktemp("results")
    args = ["run", "--methods", "original,finetune,sfd", "--preset", "smoke", "--results", str(results),
            "--data-dir", str(fmnist_dir.parent)]  # fmt: skip
    assert main(args) == 0
    return results


@pytest.mark.slow  # the sweep takes 25-60 s on the shared 2-core CPU
def test_report_on_a_smoke_sweep(smoke_report, capsys):
    results = smoke_report
    assert main(["report", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    report = results / "report"
    md = (report / "table.md").read_text()
    assert md in out and str(report / "table.csv") in out
    for kind in ("unlearning", "cost"):
        latex = (report / f"table_fashion-mnist_class-0_smoke_guidance-1_{kind}.tex").read_text()
        assert all(rule in latex for rule in (r"\toprule", r"\midrule", r"\bottomrule"))
        assert list(latex_rows(latex)) == ["original", "sfd", "finetune"]
    # one seed: the CSV holds the raw values of the runs
    df = store.load_results(results)
    csv = pd.read_csv(report / "table.csv").set_index("method")
    for row in df.itertuples():
        assert csv.at[row.method, f"{row.metric}[{row.subset}]_mean"] == pytest.approx(row.value)
        if row.evaluator != "wallclock":  # and the run's own interval
            assert csv.at[row.method, f"{row.metric}[{row.subset}]_ci_low"] == pytest.approx(row.ci_low)
    acc = df[(df.metric == "accuracy") & (df.subset == "forget")].set_index("method")
    tests = pd.read_csv(report / "pairwise.csv")
    assert set(tests.method_a) | set(tests.method_b) == {"original", "sfd", "finetune"}
    assert set(tests[tests.metric == "accuracy[forget]"].n_pairs) == {20}  # 20 forgotten-class images paired
    assert set(tests.test) == {"mcnemar", "wilcoxon", "bootstrap"}
    (pair,) = tests[(tests.metric == "accuracy[forget]") & (tests.method_a == "sfd")
                    & (tests.method_b == "finetune")].itertuples()  # fmt: skip
    bold = acc.at["sfd", "value"] <= acc.at["finetune", "value"] or not pair.significant
    lo, hi = 100 * acc.at["sfd", "ci_low"], 100 * acc.at["sfd", "ci_high"]
    cell = f"{100 * acc.at['sfd', 'value']:.1f} [{lo:.1f}, {hi:.1f}]"
    assert f"| sfd | 1 | {'**' if bold else ''}{cell}{'**' if bold else ''} |" in md
    for name in ("tradeoff_fashion-mnist_smoke", "wallclock_fashion-mnist_smoke",
                 "samples_fashion-mnist_class-0_smoke_s0"):  # fmt: skip
        img = mpimg.imread(report / f"{name}.png")
        assert img.shape[0] >= 300 and img.shape[1] >= 800 and img[..., :3].std() > 0.02, name
        assert (report / f"{name}.pdf").stat().st_size > 1000


# ---- intervals and paired tests on hand-made runs ----------------------------------------------------------


def write_paired_run(root, method, forget_set, hits, fd=None, *, seed=0):
    """A finished run whose rows carry their intervals (as the evaluators compute them) and whose outcomes file
    holds the per-image hits of accuracy[forget] (and fd_judge replicates), checksummed in DONE."""
    from bench import stats

    hits = np.asarray(hits, dtype=bool)
    k, n = int(hits.sum()), len(hits)
    d = write_run(root, method, seed, {"accuracy[forget]": k / n, **({"fd_judge[retain]": fd[0]} if fd else {})},
                  forget_set=forget_set)  # fmt: skip
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    outcomes = {"accuracy[forget]": (hits.astype(np.uint8), stats.MCNEMAR)}
    rows[0] |= dict(zip(("ci_low", "ci_high"), stats.wilson_interval(k, n), strict=True), ci_method="wilson")
    if fd:
        rows[1] |= {"ci_low": fd[0] - 0.1, "ci_high": fd[0] + 0.1, "ci_method": "bootstrap-1000-shifted"}
        outcomes["fd_judge[retain]"] = (fd[1], stats.BOOTSTRAP)
    store.write_metrics(d / "metrics.jsonl", rows)
    store.write_outcomes(d, {key: (torch.as_tensor(v), test) for key, (v, test) in outcomes.items()})
    store.mark_done(d)
    return d


def first_hits(k, n=100):
    return np.arange(n) < k  # image i hit for i < k: two such runs disagree only on the images between


@pytest.fixture
def paired_runs(tmp_path):
    root = tmp_path / "sweep"
    noise = np.random.default_rng(0).normal(0, 0.05, 1000)  # the replicates' shared resampling noise
    # class-0: 20% against 25% on the same 100 images (5 discordant pairs, p = 2 / 2^5): not significant
    write_paired_run(root, "sfd", "class-0", first_hits(20), fd=(1.25, 1.45 + noise))
    write_paired_run(root, "finetune", "class-0", first_hits(25), fd=(2.5, 2.7 + noise * 1.1))
    write_paired_run(root, "original", "class-0", first_hits(85))
    # class-1: 20% against 80% (60 discordant pairs): significant
    write_paired_run(root, "sfd", "class-1", first_hits(20))
    write_paired_run(root, "finetune", "class-1", first_hits(80))
    return root


def md_cells(md: str, title: str) -> dict[str, list[str]]:
    block = md.split(f"**{title}**", 1)[1].split("\n\n")[1]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()[2:]]
    return {r[0]: r[1:] for r in rows}


def test_report_shows_intervals_and_marks_what_is_not_significant(paired_runs, tmp_path):
    out = tmp_path / "out"
    report = make_report(paired_runs, out)
    md = report.markdown
    near = md_cells(md, "fashion-mnist, forget set class-0, preset default: unlearning and quality")
    far = md_cells(md, "fashion-mnist, forget set class-1, preset default: unlearning and quality")
    # one run per method: its own Wilson interval (scipy proportion_ci: 85/100 [76.7, 90.7], 20/100 [13.3, 28.9],
    # 25/100 [17.5, 34.3], 80/100 [71.1, 86.7])
    assert near["original"][1] == "85.0 [76.7, 90.7]"
    # 5 points apart on 100 paired images: finetune is not told apart from the best (bold too) ...
    assert near["sfd"][1] == "**20.0 [13.3, 28.9]**" and near["finetune"][1] == "**25.0 [17.5, 34.3]**"
    # ... 60 points apart: it is (only the best is bold)
    assert far["sfd"][1] == "**20.0 [13.3, 28.9]**" and far["finetune"][1] == "80.0 [71.1, 86.7]"
    # fd_judge 1.25 against 2.5, the replicates' difference -1.25 -+ 0.01: significant
    assert near["sfd"][2] == "**1.25 [1.15, 1.35]**" and near["finetune"][2] == "2.50 [2.40, 2.60]"
    assert "exact McNemar for Acc. forget; paired bootstrap for fd_judge" in md
    tests = pd.read_csv(out / "pairwise.csv")
    assert out / "pairwise.csv" in report.paths
    row = tests[(tests.forget_set == "class-0") & (tests.metric == "accuracy[forget]")
                & (tests.method_a == "sfd") & (tests.method_b == "finetune")].iloc[0]  # fmt: skip
    assert row.test == "mcnemar" and row.p_value == pytest.approx(2 / 32) and not row.significant
    assert row.n_pairs == 100 and row.seeds == 1 and row.difference == pytest.approx(-0.05)
    row = tests[(tests.forget_set == "class-1") & (tests.method_a == "sfd")].iloc[0]
    assert row.p_value == pytest.approx(2 * 0.5**60) and row.significant and row.statistic == 0
    row = tests[(tests.metric == "fd_judge[retain]")].iloc[0]
    assert row.test == "bootstrap" and row.p_value == pytest.approx(2 / 1001) and row.difference == -1.25
    # the original is compared too (in the CSV), though never bold
    assert {"original"} <= set(tests.method_a) | set(tests.method_b)
    # LaTeX: the same intervals, smaller, booktabs, bold where Markdown is, and the test named in the caption
    latex = (out / "table_fashion-mnist_class-0_default_unlearning.tex").read_text()
    rows = latex_rows(latex)
    assert rows["finetune"][1] == r"\textbf{25.0\,{\scriptsize[17.5, 34.3]}}"
    assert r"\toprule" in latex and "exact McNemar for Acc. forget" in latex and r"Fr\'echet" in latex
    # the CSV keeps raw fractions and the intervals
    csv = pd.read_csv(out / "table.csv").set_index(["forget_set", "method"])
    assert csv.at[("class-0", "original"), "accuracy[forget]_ci_low"] == pytest.approx(0.7671644, abs=1e-7)


def test_seeds_pool_their_pairs(tmp_path):
    # each seed alone: 4 discordant pairs all one way, p = 2 / 2^4 = 0.125; both seeds pooled: 2 / 2^8
    for seed in (0, 1):
        write_paired_run(tmp_path, "sfd", "class-0", first_hits(20), seed=seed)
        write_paired_run(tmp_path, "finetune", "class-0", first_hits(24), seed=seed)
    df = load(tmp_path)
    from bench.report import paired, run_dirs

    tests = paired.pairwise(df, paired.load_outcomes(df["run_id"].unique(), run_dirs(tmp_path)))
    (row,) = tests.itertuples()
    assert row.seeds == 2 and row.n_pairs == 200 and row.p_value == pytest.approx(2 / 256)
    md, _ = tables.write_tables(df, tmp_path / "out", run_dirs(tmp_path))
    # two seeds: the t-interval over the seeds (both 20%: zero width), and a significant difference
    assert "| sfd | 2 | **20.0 [20.0, 20.0]** |" in md and "| finetune | 2 | 24.0 [24.0, 24.0] |" in md


def test_rows_without_intervals_still_load(tmp_path):
    write_run(tmp_path, "sfd", 0, {"accuracy[forget]": 0.1})  # an old run: no ci columns, no outcomes
    df = load(tmp_path)
    assert df["ci_low"].isna().all() and df["ci_high"].isna().all() and df["ci_method"].isna().all()
    md, paths = tables.write_tables(df, tmp_path / "out")
    assert "| sfd | 1 | **10.0** |" in md and "best unlearning method in bold" in md
    assert not any(p.name == "pairwise.csv" for p in paths)
    d = next((tmp_path / "runs").iterdir())
    store.mark_done(d)  # finished before outcomes existed: DONE records none, and there are none
    assert "outcomes_sha256" not in json.loads((d / "DONE").read_text()) and store.read_outcomes(d) == {}
    row = json.loads((d / "metrics.jsonl").read_text())
    (d / "DONE").unlink()
    store.write_metrics(d / "metrics.jsonl", [row | {"ci_low": "low", "ci_high": None}])
    with pytest.raises(BenchError, match="line 1: ci_low 'low' is not a number"):
        store.read_metrics(d / "metrics.jsonl")


def test_a_damaged_outcomes_file_is_named(paired_runs, tmp_path, caplog):
    d = next(
        p for p in (paired_runs / "runs").iterdir() if p.name.startswith("finetune-") and "class-1" in p.name
    )
    path = d / store.OUTCOMES
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(BenchError, match=rf"{re.escape(str(path))} does not match its checksum in .*DONE"):
        store.read_outcomes(d)
    with pytest.raises(BenchError, match="does not match its checksum"):
        store.read_metrics(d / "metrics.jsonl")  # a finished run is checked whole: `bench run` stops on it
    with caplog.at_level(logging.WARNING):
        report = make_report(paired_runs, tmp_path / "out")
    assert str(path) in caplog.text  # named, and that run left out
    title = "fashion-mnist, forget set class-1, preset default: unlearning and quality"
    assert list(md_cells(report.markdown, title)) == ["sfd"]
    path.unlink()
    with pytest.raises(BenchError, match=rf"{re.escape(str(path))} is missing"):
        store.read_outcomes(d)
    # a file the run did not record is refused, not trusted
    other = next(
        p for p in (paired_runs / "runs").iterdir() if p.name.startswith("sfd-") and "class-1" in p.name
    )
    (other / "DONE").write_text(json.dumps({k: v for k, v in json.loads((other / "DONE").read_text()).items()
                                            if k != "outcomes_sha256"}))  # fmt: skip
    with pytest.raises(BenchError, match="is not recorded in"):
        store.read_outcomes(other)


def test_tradeoff_figure_draws_the_intervals_as_error_bars(paired_runs):
    fig = plots.tradeoff_figure(load(paired_runs), "fashion-mnist", "default")
    ax = fig.axes[0]  # forget set class-0
    bars = {c.get_label(): c for c in ax.containers}
    _, _, (xbar, ybar) = bars["sfd"].lines
    (x_segment,), (y_segment,) = xbar.get_segments(), ybar.get_segments()
    lo, hi = (100 * b for b in stats.wilson_interval(20, 100))  # 20 of 100 images: Wilson, in percent
    np.testing.assert_allclose(y_segment[:, 1], [lo, hi])
    np.testing.assert_allclose(x_segment[:, 0], [1.15, 1.35])  # fd_judge's own interval
    assert "95%" in fig.legends[0].get_title().get_text()


def test_a_swept_oracle_is_still_the_oracle():
    """bench/sweep.py labels runs that differ by a setting `retrain[lr=1e-04]`; they keep their place and role."""
    assert tables.is_oracle("retrain[lr=1e-04]") and not tables.is_oracle("sfd[lr_generator=1e-05]")
    order = tables.method_order(["retrain[lr=1e-04]", "esd[lr=1e-05]", "sfd[lr_generator=1e-05]", "original"])
    assert order == ["original", "sfd[lr_generator=1e-05]", "esd[lr=1e-05]", "retrain[lr=1e-04]"]


def test_each_sampling_condition_is_a_table_of_its_own_the_papers_protocol_first(tmp_path):
    """Issue 12.4: rows sampled at guidance 3 and at guidance 1 are never averaged together; the preset's main
    condition (the papers' guidance 3) comes first and alone feeds the figures; paired tests stay within one."""
    root = tmp_path / "sweep"
    figures = {"sfd": {"guidance 3": (0.01, 0.9), "guidance 1": (0.01, 0.9)},  # one-step: the same images
               "esd": {"guidance 3": (0.91, 0.98), "guidance 1": (0.39, 0.77)}}  # fmt: skip
    for method, by_condition in figures.items():
        d = write_run(root, method, 0, {"accuracy[forget]": 0.0, "accuracy[retain]": 0.0})
        rows = []
        outcomes = {}
        for condition, (af, ar) in by_condition.items():
            for r in (json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()):
                value = af if r["subset"] == "forget" else ar
                guidance = None if method == "sfd" else float(condition.split()[1])
                rows.append(r | {"value": value, "condition": condition, "guidance": guidance})
            hits = np.arange(100) < round(100 * af)
            outcomes[store.outcome_key("accuracy[forget]", condition)] = (
                torch.as_tensor(hits),
                stats.MCNEMAR,
            )
        store.write_metrics(d / "metrics.jsonl", rows)
        store.write_outcomes(d, outcomes)
        store.mark_done(d, conditions=["guidance 3", "guidance 1"])
    report = make_report(root, tmp_path / "out")
    title = (
        "fashion-mnist, forget set class-0, preset default, multi-step models sampled at {} (one-step: none)"
    )
    first, second = title.format("guidance 3"), title.format("guidance 1")
    assert report.markdown.index(first) < report.markdown.index(second)
    at3, at1 = (md_cells(report.markdown, f"{t}: unlearning and quality") for t in (first, second))
    assert at3["esd"][1] == "91.0" and at1["esd"][1] == "39.0"  # not their mean, 65
    assert at3["sfd"][1] == at1["sfd"][1] == "**1.0**"
    tests = pd.read_csv(tmp_path / "out" / "pairwise.csv")
    assert sorted(tests.condition) == ["guidance 1", "guidance 3"]  # sfd against esd, once per condition
    assert tests.set_index("condition").at["guidance 1", "n_pairs"] == 100
    assert {p.name for p in (tmp_path / "out").glob("table_*guidance-1*.tex")} == {
        "table_fashion-mnist_class-0_default_guidance-1_unlearning.tex"
    }
    main = tables.main_rows(load(root))
    assert set(main["condition"]) == {"guidance 3"} and len(main) == 4


def test_runs_that_differ_by_lr_scale_get_a_sensitivity_table(tmp_path):
    """Issue 15.5: a method at several lr_scale values is one row of the sensitivity table, a column per scale;
    the unscaled run (no override) is scale 1."""
    root = tmp_path / "sweep"
    figures = {("sa", None): (0.98, 0.99), ("sa", 0.1): (0.99, 0.99), ("sa", 10.0): (0.10, 0.95),
               ("sfd", None): (0.01, 0.86), ("sfd", 10.0): (0.50, 0.20), ("original", None): (0.99, 0.996)}  # fmt: skip
    for (method, scale), (af, ar) in figures.items():
        run_id = f"{method}-fashion-mnist-class-0-s0-default-{scale}"
        rows = [{"run_id": run_id, "method": method, "dataset": "fashion-mnist", "forget_set": "class-0", "seed": 0,
                 "evaluator": "forget_accuracy", "metric": "accuracy", "subset": subset, "value": value, "n": 100,
                 "higher_is_better": subset == "retain", "unit": "", "preset": "default", "condition": "guidance 3",
                 "evaluator_version": "1", "method_version": "1", "ci_low": value - 0.05, "ci_high": value + 0.01}
                for subset, value in (("forget", af), ("retain", ar))]  # fmt: skip
        d = store.run_dir(root, run_id)
        store.write_metrics(d / "metrics.jsonl", rows)
        (d / "spec.json").write_text(
            json.dumps({"overrides": {"lr_scale": scale} if scale else {}, "config": {}})
        )
    report = make_report(root, tmp_path / "out")
    md = (tmp_path / "out" / "lr_sensitivity.md").read_text()
    assert md in report.markdown and "guidance 3: learning-rate sensitivity" in md
    cells = md_cells(
        md, "fashion-mnist, forget set class-0, preset default, guidance 3: learning-rate sensitivity"
    )
    assert set(cells) == {"sfd", "sa"}  # original was not swept
    assert cells["sa"][:3] == ["99.0 [94.0, 100.0]", "98.0 [93.0, 99.0]", "10.0 [5.0, 11.0]"]  # x0.1, x1, x10
    assert cells["sfd"][:3] == ["-", "1.0 [-4.0, 2.0]", "50.0 [45.0, 51.0]"]
    csv = pd.read_csv(tmp_path / "out" / "lr_sensitivity.csv")
    assert sorted(set(csv.scale)) == [0.1, 1.0, 10.0] and set(csv.method) == {"sa", "sfd"}
