"""Results on disk: run directories, atomic writes, DONE markers, and loading rows into a DataFrame."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd

from bench.errors import BenchError

log = logging.getLogger(__name__)

COLUMNS = ("run_id", "method", "dataset", "forget_set", "seed", "evaluator", "metric", "subset",
           "value", "n", "higher_is_better", "unit")  # fmt: skip


def run_dir(results: Path, run_id: str) -> Path:
    return Path(results) / "runs" / run_id


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename over it: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of one metrics.jsonl; a malformed file raises a BenchError naming it."""
    rows = []
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise BenchError(f"cannot read {path}: {e}") from e
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError as e:
            raise BenchError(f"broken results file {path}, line {i}: {e}") from e
        missing = [c for c in COLUMNS if c not in row]
        if missing:
            raise BenchError(f"broken results file {path}, line {i}: missing columns {', '.join(missing)}")
        rows.append(row)
    if not rows:
        raise BenchError(f"broken results file {path}: it is empty")
    return rows


def is_done(directory: Path) -> bool:
    return (directory / "DONE").is_file()


def mark_done(directory: Path) -> None:
    atomic_write_text(directory / "DONE", "")


def load_results(results: Path, *, strict: bool = True) -> pd.DataFrame:
    """Every metrics.jsonl under `results` as one tidy DataFrame (COLUMNS first)."""
    frames = []
    for path in sorted(Path(results).rglob("metrics.jsonl")):
        try:
            frames.append(pd.DataFrame(read_metrics(path)))
        except BenchError as e:
            if strict:
                raise
            log.warning("skipped: %s", e)  # the message names the file and the line
    if not frames:
        return pd.DataFrame(columns=list(COLUMNS))
    return pd.concat(frames, ignore_index=True)
