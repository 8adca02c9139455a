"""The table across forget classes: the published protocols forget class 0 only, and this table says how much the
class forgotten matters. Per (dataset, preset) with several single-class forget sets (`class-K`), per method: the
mean over the forget classes of each class's mean over seeds, with a 95% Student-t interval over the classes, under
each preset's main sampling condition."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from scipy import stats

from bench.report.tables import (
    DISPLAY,
    column_decimals,
    fmt,
    is_oracle,
    latex_escape,
    main_rows,
    method_order,
    metric_key,
    natural_key,
    safe,
)
from bench.store import atomic_write_text

METRICS = ("accuracy[forget]", "accuracy[retain]", "fd_judge[retain]")
HIGHER_IS_BETTER = {"accuracy[forget]": False, "accuracy[retain]": True, "fd_judge[retain]": False}
CONFIDENCE = 0.95
GROUP = ["dataset", "preset"]
SINGLE_CLASS = r"class-\d+"


def summarize_across(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, preset, method, metric): over its forget classes, n, mean, the interval's bounds (NaN
    for one class). Each class weighs the same, whatever its number of seeds; groups with fewer than two
    single-class forget sets are left out."""
    columns = [*GROUP, "method", "column", "n", "mean", "std", "lo", "hi"]
    if df.empty or not {*GROUP, "forget_set", "method", "metric", "subset"} <= set(df.columns):
        return pd.DataFrame(columns=columns)
    df = main_rows(df)
    df = df[df["forget_set"].astype(str).str.fullmatch(SINGLE_CLASS)]
    df = df.assign(column=metric_key(df), value=df["value"].astype(float))
    df = df[df["column"].isin(METRICS)]
    classes = df.groupby(GROUP)["forget_set"].nunique()
    df = df.set_index(GROUP).loc[classes[classes >= 2].index].reset_index()
    if df.empty:
        return pd.DataFrame(columns=columns)
    keys = [*GROUP, "method", "column"]
    per_class = df.groupby([*keys, "forget_set"], sort=False)["value"].mean()
    out = per_class.groupby(level=keys, sort=False).agg(n="count", mean="mean", std="std")
    half = [interval_half_width(s, n) for s, n in zip(out["std"], out["n"], strict=True)]
    return out.assign(lo=out["mean"] - half, hi=out["mean"] + half).reset_index()[columns]


def interval_half_width(std: float, n: int) -> float:
    """Half-width of the CONFIDENCE Student-t interval of a mean of n values with sample std `std`."""
    if n < 2 or not math.isfinite(std):
        return math.nan
    return float(stats.t.ppf((1 + CONFIDENCE) / 2, n - 1)) * std / math.sqrt(n)


def groups(summary: pd.DataFrame) -> list[tuple[str, str]]:
    found = summary[GROUP].drop_duplicates().itertuples(index=False, name=None)
    return sorted(found, key=lambda g: [natural_key(v) for v in g])


def _cells(summary: pd.DataFrame, group: tuple[str, str]) -> tuple[list[str], list[str], dict, dict]:
    """Methods in table order, the metric columns present, per (method, column) its row, and per column its
    decimals (one precision per column, as in tables.py)."""
    part = summary[(summary["dataset"] == group[0]) & (summary["preset"] == group[1])]
    methods = method_order(part["method"])
    cols = [c for c in METRICS if c in set(part["column"])]
    rows = {(r.method, r.column): r for r in part.itertuples()}
    decimals = {}
    for c in cols:
        percent = DISPLAY[c].percent
        decimals[c] = column_decimals(part[part["column"] == c]["mean"] * (100 if percent else 1), percent)
    return methods, cols, rows, decimals


def _text(row, column: str, d: int) -> str:
    scale = 100 if DISPLAY[column].percent else 1
    if row is None:
        return "-"
    if math.isnan(row.lo):
        return fmt(row.mean * scale, d)
    return f"{fmt(row.mean * scale, d)} [{fmt(row.lo * scale, d)}, {fmt(row.hi * scale, d)}]"


def _classes(rows: dict, method: str, cols: list[str]) -> int:
    return max((int(rows[method, c].n) for c in cols if (method, c) in rows), default=0)


def _head(column: str) -> str:
    unit = " (%)" if DISPLAY[column].percent else ""
    return f"{DISPLAY[column].label}{unit} {'↑' if HIGHER_IS_BETTER[column] else '↓'}"


NOTE = (
    "mean over n forget classes (each one's mean over its seeds) [95% Student-t interval over the classes]; "
    "↓/↑ lower/higher is better"
)


def to_markdown(summary: pd.DataFrame, group: tuple[str, str]) -> str:
    methods, cols, rows, decimals = _cells(summary, group)
    lines = ["| method | n | " + " | ".join(_head(c) for c in cols) + " |", "|:--|--:|" + "--:|" * len(cols)]
    for m in methods:
        cells = [m + (" (oracle)" if is_oracle(m) else ""), str(_classes(rows, m, cols))]
        cells += [_text(rows.get((m, c)), c, decimals[c]) for c in cols]
        lines.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
    title = f"**{group[0]}, preset {group[1]}: across forget classes**"
    return f"{title}\n\n" + "\n".join(lines) + f"\n\n_{NOTE}_\n"


def to_latex(summary: pd.DataFrame, group: tuple[str, str]) -> str:
    """A booktabs `table` (pandas Styler), the interval in a smaller font, so the eye stays on the mean."""
    methods, cols, rows, decimals = _cells(summary, group)
    arrow = {True: r"$\uparrow$", False: r"$\downarrow$"}
    heads = ["Method", "$n$"] + [f"{latex_escape(_head(c)[:-2])} {arrow[HIGHER_IS_BETTER[c]]}" for c in cols]
    body = []
    for m in methods:
        cells = [latex_escape(m), str(_classes(rows, m, cols))]
        for c in cols:
            text = _text(rows.get((m, c)), c, decimals[c])
            mean, _, interval = text.partition(" ")
            cells.append(mean + (rf"\,{{\scriptsize{interval}}}" if interval else ""))
        body.append(cells)
    caption = (
        f"{latex_escape(group[0])}, preset {latex_escape(group[1])}: across forget classes. Mean over $n$ forget "
        r"classes (each one's mean over its seeds), in brackets the 95\% Student-$t$ interval over the classes; "
        r"$\downarrow$/$\uparrow$: lower/higher is better."
    )
    styler = pd.DataFrame(body, columns=heads).style.hide(axis="index")
    latex = styler.to_latex(hrules=True, caption=caption, label=f"tab:{name(group)}", position_float="centering",
                            column_format="lr" + "r" * len(cols), environment="table")  # fmt: skip
    return latex.replace("\\centering\n", "\\centering\n\\small\n", 1)


def name(group: tuple[str, str]) -> str:
    return "_".join(safe(v) for v in group) + "_across-classes"


def wide_csv(summary: pd.DataFrame) -> pd.DataFrame:
    """Raw values (fractions): per (dataset, preset, method), each metric's n, mean, lo and hi."""
    out = []
    for group in groups(summary):
        methods, cols, rows, _ = _cells(summary, group)
        for m in methods:
            record = {"dataset": group[0], "preset": group[1], "method": m}
            for c in cols:
                r = rows.get((m, c))
                for stat in ("n", "mean", "lo", "hi"):
                    record[f"{c}_{stat}"] = getattr(r, stat) if r is not None else math.nan
            out.append(record)
    return pd.DataFrame(out)


def write_across(df: pd.DataFrame, out: Path) -> tuple[str, list[Path]]:
    """across_classes.csv and .md, and one .tex per group; nothing when no group has two forget classes."""
    summary = summarize_across(df)
    if summary.empty:
        return "", []
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "across_classes.csv", out / "across_classes.md"]
    atomic_write_text(paths[0], wide_csv(summary).to_csv(index=False))
    markdown = "\n".join(to_markdown(summary, g) for g in groups(summary))
    atomic_write_text(paths[1], markdown)
    for g in groups(summary):
        paths.append(out / f"table_{name(g)}.tex")
        atomic_write_text(paths[-1], to_latex(summary, g))
    return markdown, paths


def extend(markdown: str, paths: list[Path], df: pd.DataFrame, out: Path) -> tuple[str, list[Path]]:
    """make_report's hook: the per-forget-set tables' Markdown and paths, with this table's added."""
    more, written = write_across(df, out)
    return (f"{markdown}\n{more}" if more else markdown), paths + written
