"""The learning-rate sensitivity table: for runs that differ only by `lr_scale` (sweeps/lr-sensitivity.toml), each
method's forget and retained accuracy at each scale of its learning rates, so that a method that fails at its
default rate can be told from one that fails at every rate. Per (dataset, forget set, preset, condition)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from bench.report.tables import GROUP, fmt, group_order, method_order, summarize
from bench.store import atomic_write_text

LABEL = re.compile(r"(?P<method>[^\[]+)\[lr_scale=(?P<scale>[^\],]+)\]")  # sweep.label_swept's label
COLUMNS = {"accuracy[forget]": "Acc. forget (%) ↓", "accuracy[retain]": "Acc. retain (%) ↑"}


def summarize_scales(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (group, method, scale, metric): the mean and interval of summarize(), for labels that vary
    lr_scale alone; empty when no method has two scales."""
    summary = summarize(df)
    found = summary["method"].str.extract(LABEL)
    summary = summary.assign(base=found["method"], scale=pd.to_numeric(found["scale"], errors="coerce"))
    summary = summary[summary["scale"].notna() & summary["column"].isin(list(COLUMNS))]
    scales = summary.groupby([*GROUP, "base"])["scale"].nunique()
    keep = scales[scales >= 2].index
    return summary.set_index([*GROUP, "base"]).loc[keep].reset_index() if len(keep) else summary.iloc[0:0]


def to_markdown(part: pd.DataFrame, group: tuple) -> str:
    scales = sorted(part["scale"].unique())
    heads = ["method"] + [f"{COLUMNS[c]} x{s:g}" for c in COLUMNS for s in scales]
    lines = ["| " + " | ".join(heads) + " |", "|:--|" + "--:|" * (len(heads) - 1)]
    cells = {(r.base, r.column, r.scale): r for r in part.itertuples()}
    for method in method_order(part["base"].unique()):
        row = [method]
        for c in COLUMNS:
            for s in scales:
                r = cells.get((method, c, s))
                if r is None:
                    row.append("-")
                    continue
                text = fmt(100 * r.mean, 1)
                if not (math.isnan(r.ci_low) or math.isnan(r.ci_high)):
                    text += f" [{fmt(100 * r.ci_low, 1)}, {fmt(100 * r.ci_high, 1)}]"
                row.append(text)
        lines.append("| " + " | ".join(row) + " |")
    dataset, forget_set, preset, condition = group
    sampled = f", {condition}" if condition else ""
    title = f"**{dataset}, forget set {forget_set}, preset {preset}{sampled}: learning-rate sensitivity**"
    note = ("_each method's learning rates (all of them, after the preset's scaling) times the scale; mean "
            "[95% interval] as in the main table_")  # fmt: skip
    return f"{title}\n\n" + "\n".join(lines) + f"\n\n{note}\n"


def extend(markdown: str, paths: list[Path], df: pd.DataFrame, out: Path) -> tuple[str, list[Path]]:
    """make_report's hook: lr_sensitivity.md and .csv when the sweep varies lr_scale."""
    summary = summarize_scales(df)
    if summary.empty:
        return markdown, paths
    parts = [
        to_markdown(summary[(summary[GROUP] == pd.Series(g, index=GROUP)).all(axis=1)], g)
        for g in group_order(summary)
    ]  # the main sampling condition first, as in the main tables
    written = [out / "lr_sensitivity.md", out / "lr_sensitivity.csv"]
    atomic_write_text(written[0], "\n".join(parts))
    cols = [*GROUP, "base", "scale", "column", "mean", "ci_low", "ci_high", "count"]
    atomic_write_text(written[1], summary[cols].rename(columns={"base": "method"}).to_csv(index=False))
    return markdown + "\n" + "\n".join(parts), paths + written
