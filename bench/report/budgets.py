"""The table and figure "at equal unlearning time": runs made with `--budget-s` (sweeps/budgets.toml), each
method's forget accuracy and fd_judge at every budget, with the seconds its runs really took beside the budget.
Per (dataset, forget set, preset, condition); the main tables leave these runs out (a budget is a protocol of
its own)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from bench.report.tables import GROUP, fmt, group_order, is_oracle, latex_escape, method_order, summarize
from bench.store import atomic_write_text

BUDGET = "budget_s"
COLUMNS = {"accuracy[forget]": ("Acc. forget (%) ↓", True, 1), "fd_judge[retain]": ("fd_judge ↓", False, 2)}
MEASURED = "unlearn_s[all]"
SEP = " @budget "  # method label and budget, while summarize() groups them


def split(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows of runs without a budget, rows of budgeted runs)."""
    if BUDGET not in df.columns:
        return df, df.iloc[0:0]
    budgeted = df[BUDGET].notna()
    return df[~budgeted].drop(columns=BUDGET), df[budgeted]


def summarize_budgets(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (group, method, budget, metric): mean and 95% interval as summarize() gives them."""
    keep = df[(df["metric"] + "[" + df["subset"] + "]").isin([*COLUMNS, MEASURED])]
    if keep.empty:
        return pd.DataFrame()
    tagged = keep.assign(method=keep["method"] + SEP + keep[BUDGET].astype(float).map(repr))
    summary = summarize(tagged)
    parts = summary["method"].str.rpartition(SEP)
    return summary.assign(method=parts[0], budget=parts[2].astype(float))


def to_markdown(part: pd.DataFrame, group: tuple) -> str:
    budgets = sorted(part["budget"].unique())
    heads = ["method"] + [f"{COLUMNS[c][0]} at {b:g} s" for b in budgets for c in COLUMNS]
    lines = ["| " + " | ".join(heads) + " |", "|:--|" + "--:|" * (len(heads) - 1)]
    cells = {(r.method, r.column, r.budget): r for r in part.itertuples()}
    for method in method_order(part["method"].unique()):
        row = [method]
        for b in budgets:
            for c, (_, percent, d) in COLUMNS.items():
                r = cells.get((method, c, b))
                row.append("-" if r is None else _cell(r, 100 if percent else 1, d))
        lines.append("| " + " | ".join(row) + " |")
    measured = [f"{b:g} s: " + ", ".join(f"{m} {cells[m, MEASURED, b].mean:.0f}"
                                         for m in method_order(part["method"].unique()) if (m, MEASURED, b) in cells)
                for b in budgets]  # fmt: skip
    dataset, forget_set, preset, condition = group
    sampled = f", {condition}" if condition else ""
    title = f"**{dataset}, forget set {forget_set}, preset {preset}{sampled}: at equal unlearning time**"
    note = ("_every method unlearns for the budget in reference seconds (its iterations from the shipped "
            "calibration, bench/budget.py; learning rates and batches as the preset's, the EMA half-life the same "
            "share of training); mean [95% interval] as in the main table. Seconds these runs took here: "
            + "; ".join(measured) + "_")  # fmt: skip
    return f"{title}\n\n" + "\n".join(lines) + f"\n\n{note}\n"


def to_latex(part: pd.DataFrame, group: tuple) -> str:
    """The same table in booktabs LaTeX: a column pair per budget."""
    budgets = sorted(part["budget"].unique())
    cells = {(r.method, r.column, r.budget): r for r in part.itertuples()}
    k = len(COLUMNS)
    heads = " & ".join(rf"\multicolumn{{{k}}}{{c}}{{{b:g} s}}" for b in budgets)
    rules = " ".join(rf"\cmidrule(lr){{{2 + k * i}-{1 + k * (i + 1)}}}" for i in range(len(budgets)))
    sub = " & ".join(["Acc. forget (\\%)", "fd\\_judge"] * len(budgets))
    lines = [rf"\begin{{tabular}}{{l{'r' * k * len(budgets)}}}", r"\toprule", rf"Method & {heads} \\", rules,
             rf" & {sub} \\", r"\midrule"]  # fmt: skip
    for method in method_order(part["method"].unique()):
        row = [latex_escape(method)]
        for b in budgets:
            for c, (_, percent, d) in COLUMNS.items():
                r = cells.get((method, c, b))
                row.append("--" if r is None else _cell(r, 100 if percent else 1, d))
        lines.append(" & ".join(row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    dataset, forget_set, preset, condition = group
    caption = latex_escape(f"{dataset}, forget set {forget_set}, preset {preset}"
                           f"{f', {condition}' if condition else ''}: at equal unlearning time")  # fmt: skip
    return (
        "\n".join([r"\begin{table}[t]", r"\centering", rf"\caption{{{caption}}}", *lines, r"\end{table}"])
        + "\n"
    )


def _cell(r, scale: float, d: int) -> str:
    text = fmt(scale * r.mean, d)
    if not (math.isnan(r.ci_low) or math.isnan(r.ci_high)):
        text += f" [{fmt(scale * r.ci_low, d)}, {fmt(scale * r.ci_high, d)}]"
    return text


def figure(part: pd.DataFrame, title: str):
    """Forget accuracy and fd_judge against the budget, a line per method with its 95% intervals."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    from bench.report.plots import error_bar, method_style, new_figure

    fig = new_figure(10, 3.8)
    axes = dict(zip(COLUMNS, fig.subplots(1, 2, sharex=True), strict=True))
    for method in method_order(part["method"].unique()):
        color, marker = method_style(method)
        label = f"{method} (oracle)" if is_oracle(method) else method
        for column, ax in axes.items():
            rows = part[(part["method"] == method) & (part["column"] == column)].sort_values("budget")
            scale = 100 if COLUMNS[column][1] else 1
            for r in rows.itertuples():
                bar = error_bar((r.mean, r.ci_low, r.ci_high), scale)
                if bar is not None:
                    ax.errorbar([r.budget], [scale * r.mean], yerr=bar, color=color, capsize=2, linewidth=0.8)
            ax.plot(rows["budget"], scale * rows["mean"], color=color, marker=marker, markersize=5, linewidth=1.5,
                    label=label)  # fmt: skip
    acc, fd = axes.values()
    acc.set_ylabel("forget accuracy, % (lower is better)")
    acc.set_ylim(-5, 105)
    fd.set_ylabel("fd_judge on retained classes (lower is better)")
    fd.set_yscale("log")  # a collapsed method (ga) sits ten times above the rest
    fd.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    fd.yaxis.set_major_formatter(ScalarFormatter())
    fd.yaxis.set_minor_formatter(NullFormatter())
    for ax in axes.values():
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(part["budget"].unique()), [f"{b:g}" for b in sorted(part["budget"].unique())])
        ax.set_xlabel("unlearning budget, reference seconds")
        ax.grid(alpha=0.3)
    fig.legend(*acc.get_legend_handles_labels(), loc="outside right upper", fontsize=9, title="method")
    fig.suptitle(title, fontsize=11)
    return fig


def extend(markdown: str, paths: list[Path], df: pd.DataFrame, out: Path) -> tuple[str, list[Path]]:
    """make_report's hook: budgets.md, budgets.csv, a LaTeX table and a figure per group when there are budgeted runs."""
    from bench.report.plots import save

    summary = summarize_budgets(df) if not df.empty else pd.DataFrame()
    if summary.empty:
        return markdown, paths
    parts, written = [], [out / "budgets.md", out / "budgets.csv"]
    out.mkdir(parents=True, exist_ok=True)
    for i, g in enumerate(group_order(summary)):  # the main sampling condition first, as in the main tables
        part = summary[(summary[GROUP] == pd.Series(g, index=GROUP)).all(axis=1)]
        parts.append(to_markdown(part, g))
        written.append(out / f"budgets_{i}.tex")
        atomic_write_text(written[-1], to_latex(part, g))
        dataset, forget_set, preset, condition = g
        title = f"At equal unlearning time: {dataset}, {forget_set}, {preset}{f', {condition}' if condition else ''}"
        written += save(figure(part, title), out, f"budgets_{i}" if i else "budgets")
    atomic_write_text(written[0], "\n".join(parts))
    cols = [*GROUP, "method", "budget", "column", "mean", "ci_low", "ci_high", "count"]
    atomic_write_text(written[1], summary[cols].rename(columns={"budget": BUDGET}).to_csv(index=False))
    return markdown + "\n" + "\n".join(parts), paths + written
