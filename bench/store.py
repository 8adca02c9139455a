"""Results on disk: run directories, atomic writes, DONE markers, and loading rows into a DataFrame."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from bench.errors import BenchError

log = logging.getLogger(__name__)

DONE = "DONE"  # written last: the run finished (it holds the metrics' checksum)
COLUMNS = ("run_id", "method", "dataset", "forget_set", "seed", "evaluator", "metric", "subset",
           "value", "n", "higher_is_better", "unit")  # fmt: skip


def run_dir(results: Path, run_id: str) -> Path:
    return Path(results) / "runs" / run_id


def writable_dir(path: Path, flag: str) -> Path:
    """Create `path` if needed and check that a file can be written there, before any work starts."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BenchError(f"{flag} {path} is a file, not a folder")
    probe = path / f".write-test.{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise BenchError(f"{flag} {path}: cannot write there ({e.strerror or e})") from e
    return path


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename over it: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_temporaries(directory: Path) -> list[Path]:
    """Remove what interrupted writers left in a run folder: `.NAME.PID.tmp` files of processes that are gone and
    `NAME.tmp` files or folders. Call it holding the run's lock, so that no live writer of the run is among them."""
    removed = []
    for path in sorted(Path(directory).rglob("*.tmp"), key=lambda p: len(p.parts), reverse=True):
        m = re.fullmatch(r"\..+\.(\d+)\.tmp", path.name)
        if m and _alive(int(m.group(1))):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of one metrics.jsonl; an unreadable, undecodable, malformed, or (for a finished run) edited or truncated
    file raises a BenchError naming it."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise BenchError(f"cannot read {path}: {e.strerror or e}") from e
    done = _done_record(path.parent)
    if done.get("metrics_sha256") not in (None, hashlib.sha256(raw).hexdigest()):
        raise BenchError(
            f"broken results file {path}: it does not match the checksum its run recorded in "
            f"{path.parent / DONE} when it finished (edited, truncated or damaged); restore it, or redo the run "
            "with --force"
        )
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise BenchError(f"broken results file {path}: not UTF-8 text (byte {e.start})") from e
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError as e:
            raise BenchError(f"broken results file {path}, line {i}: {e}") from e
        if not isinstance(row, dict):
            raise BenchError(f"broken results file {path}, line {i}: not a JSON object")
        missing = [c for c in COLUMNS if c not in row]
        if missing:
            raise BenchError(f"broken results file {path}, line {i}: missing columns {', '.join(missing)}")
        if not isinstance(row["value"], int | float) or isinstance(row["value"], bool):
            raise BenchError(f"broken results file {path}, line {i}: value {row['value']!r} is not a number")
        if done and row["run_id"] != path.parent.name:
            raise BenchError(f"broken results file {path}, line {i}: a row of run {row['run_id']!r}, not of its "
                             f"folder's run {path.parent.name!r}")  # fmt: skip
        rows.append(row)
    if not rows:
        raise BenchError(f"broken results file {path}: it is empty")
    return rows


def _done_record(directory: Path) -> dict[str, Any]:
    """What DONE recorded when the run finished: the metrics' checksum and row count ({} for no DONE, or an empty
    one written before DONE held anything)."""
    try:
        text = (directory / DONE).read_text()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise BenchError(f"cannot read {directory / DONE}: {e}") from e
    if not text.strip():
        return {}
    try:
        record = json.loads(text)
    except ValueError as e:
        raise BenchError(f"broken {directory / DONE}: {e}; delete it to redo the run's evaluation") from e
    if not isinstance(record, dict):
        raise BenchError(
            f"broken {directory / DONE}: not a JSON object; delete it to redo the run's evaluation"
        )
    return record


def is_done(directory: Path) -> bool:
    """DONE is written after the metrics: a DONE whose metrics.jsonl is gone or empty is not done."""
    metrics = directory / "metrics.jsonl"
    return (directory / DONE).is_file() and metrics.is_file() and metrics.stat().st_size > 0


def mark_done(directory: Path) -> None:
    """Record the metrics' checksum and row count in DONE, so an edited or truncated file is noticed."""
    raw = (directory / "metrics.jsonl").read_bytes()
    write_json(
        directory / DONE, {"metrics_sha256": hashlib.sha256(raw).hexdigest(), "rows": raw.count(b"\n")}
    )


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
