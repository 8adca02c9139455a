"""`bench report`: tables (CSV, Markdown, LaTeX) and figures (PNG, PDF) from a folder of tidy results."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bench import store
from bench.errors import BenchError
from bench.sweep import label_swept

log = logging.getLogger(__name__)

TIME_TO_FORGET = Path("benchmarks") / "time_to_forget.json"


@dataclass
class Report:
    markdown: str
    paths: list[Path]


def load(results: Path, *, strict: bool = False) -> pd.DataFrame:
    """Every metrics.jsonl under `results`, checked: a broken file is named and skipped (or raises if strict)."""
    results = Path(results)
    if not results.is_dir():
        raise BenchError(f"results folder {results} does not exist; pass the folder given to "
                         "`python -m bench run --results`")  # fmt: skip
    files = sorted(results.rglob("metrics.jsonl"))
    if not files:
        raise BenchError(f"no results in {results}: no metrics.jsonl under it; run "
                         f"`python -m bench run --results {results}` first")  # fmt: skip
    df = store.load_results(results, strict=strict)
    if df.empty:
        raise BenchError(f"none of the {len(files)} metrics.jsonl files under {results} could be read (see the "
                         "warnings above)")  # fmt: skip
    value = pd.to_numeric(df["value"], errors="coerce")
    bad = df[~value.map(lambda v: math.isfinite(v) if pd.notna(v) else False)]
    if not bad.empty:
        where = ", ".join(sorted({f"{r.run_id} ({r.metric}[{r.subset}])" for r in bad.itertuples()})[:5])
        if strict:
            raise BenchError(f"non-numeric or non-finite values in {where}")
        log.warning("skipping rows with non-numeric or non-finite values: %s", where)
    df = label_swept(df.assign(value=value).drop(index=bad.index), run_dirs(results))  # sfd[lr=...] per value
    same = [c for c in ("method", "dataset", "forget_set", "preset", "seed", "budget_s") if c in df.columns]
    dupes = df.drop_duplicates("run_id").duplicated(same)
    if dupes.any():
        log.warning("%d runs share a (method, dataset, forget set, preset, seed) with another run (different "
                    "--set overrides?); the tables average them together", int(dupes.sum()))  # fmt: skip
    return df


def run_dirs(results: Path) -> dict[str, Path]:
    """run_id -> its directory (a run directory is named by its run_id)."""
    return {p.parent.name: p.parent for p in Path(results).rglob("metrics.jsonl")}


def read_time_to_forget(path: Path) -> tuple[pd.DataFrame, dict | None] | None:
    """The time-to-forget benchmark's points: a JSON list of {method, seconds, accuracy_forget, fd_judge}
    records, or an object holding that list under "points" (and the teacher's figures under "reference"), with
    that reference; anything else is skipped with a warning."""
    from bench.report.plots import TIME_TO_FORGET_COLUMNS

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("skipping %s: %s", path, e)
        return None
    records = data.get("points") if isinstance(data, dict) else data
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
        log.warning('skipping %s: expected a list of points (or {"points": [...]})', path)
        return None
    points = pd.DataFrame(records)
    if missing := [c for c in TIME_TO_FORGET_COLUMNS if c not in points.columns]:
        log.warning("skipping %s: its points lack %s", path, ", ".join(missing))
        return None
    reference = data.get("reference") if isinstance(data, dict) else None
    return points, reference if isinstance(reference, dict) else None


def make_report(results: Path, out: Path | None = None, *, strict: bool = False) -> Report:
    """Load, tabulate and plot; `out` defaults to RESULTS/report."""
    from bench.report import across, budgets, plots, robustness, sensitivity, tables

    results = Path(results)
    df = load(results, strict=strict)
    out = Path(out) if out is not None else results / "report"
    df, budgeted = budgets.split(df)  # --budget-s runs: a table of their own
    markdown, paths = "", []
    if not df.empty:
        markdown, paths = tables.write_tables(
            df, out, run_dirs(results), strict=strict
        )  # tests read the runs
        markdown, paths = across.extend(
            markdown, paths, df, out
        )  # across forget classes, when there are several
        markdown, paths = sensitivity.extend(markdown, paths, df, out)  # lr_scale sweeps
        paths += plots.write_figures(df, out, run_dirs(results))
    markdown, paths = budgets.extend(markdown, paths, budgeted, out)
    markdown, paths = robustness.extend(markdown, paths, df, results, out)  # attacked runs (bench attack)
    # Issue 8's benchmark writes results/benchmarks/; a sweep folder is results/<sweep>, so look beside it too.
    for candidate in (results / TIME_TO_FORGET, results.parent / TIME_TO_FORGET):
        if candidate.is_file() and (found := read_time_to_forget(candidate)) is not None:
            points, reference = found
            figure = plots.time_to_forget_figure(points, reference=reference)
            paths += plots.save(figure, out, "time_to_forget")
            break
    return Report(markdown, paths)
