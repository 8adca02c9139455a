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

import numpy as np
import pandas as pd

from bench.errors import BenchError
from bench.files import check_file, sha256, share

log = logging.getLogger(__name__)

DONE = "DONE"  # written last: the run finished (it holds the metrics' and the outcomes' checksums)
OUTCOMES = "outcomes.safetensors"  # per-image outcomes (or bootstrap replicates) per metric, for paired tests
COLUMNS = ("run_id", "method", "dataset", "forget_set", "seed", "evaluator", "metric", "subset",
           "value", "n", "higher_is_better", "unit")  # fmt: skip
# The value's 95% interval (null where it has none) and how it was computed; rows written before they existed
# lack them and load as NaN.
INTERVAL = ("ci_low", "ci_high", "ci_method")


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
        for col in ("value", "ci_low", "ci_high"):
            v = row.get(col)
            if (v is None and col != "value") or (isinstance(v, int | float) and not isinstance(v, bool)):
                continue
            raise BenchError(f"broken results file {path}, line {i}: {col} {v!r} is not a number")
        if done and row["run_id"] != path.parent.name:
            raise BenchError(f"broken results file {path}, line {i}: a row of run {row['run_id']!r}, not of its "
                             f"folder's run {path.parent.name!r}")  # fmt: skip
        rows.append(row)
    if not rows:
        raise BenchError(f"broken results file {path}: it is empty")
    if done:
        check_outcomes(path.parent, done)
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


def mark_done(directory: Path, *, conditions: list[str] | None = None) -> None:
    """Record the checksums of the metrics (with their row count) and of the outcomes in DONE, so an edited or
    truncated file is noticed, and the sampling conditions the run was evaluated under."""
    raw = (directory / "metrics.jsonl").read_bytes()
    record = {"metrics_sha256": hashlib.sha256(raw).hexdigest(), "rows": raw.count(b"\n")}
    if conditions is not None:
        record["conditions"] = list(conditions)
    if (directory / OUTCOMES).is_file():
        record["outcomes_sha256"] = sha256(directory / OUTCOMES)
    write_json(directory / DONE, record)


def done_conditions(directory: Path) -> list[str] | None:
    """The sampling conditions a finished run was evaluated under (None for a run finished before they existed)."""
    return _done_record(directory).get("conditions")


def reopen(directory: Path) -> None:
    """Make a finished run unfinished again, keeping its saved model: its evaluation is redone."""
    (Path(directory) / DONE).unlink(missing_ok=True)


def outcome_key(metric_key: str, condition: str = "") -> str:
    """The key of a metric's per-image outcomes in outcomes.safetensors: `accuracy[forget]`, and with a sampling
    condition `accuracy[forget] @ guidance 3` (runs made before conditions have the bare key)."""
    return f"{metric_key} @ {condition}" if condition else metric_key


def write_outcomes(directory: Path, outcomes: dict[str, tuple[Any, str]]) -> None:
    """Write {metric[subset]: (1-d values, test)} atomically as safetensors (binary outcomes as uint8, the others
    float64; the test names in its metadata), readable by the user's umask like the run's other files."""
    import torch
    from safetensors.torch import save_file

    def tensor(v) -> torch.Tensor:
        t = torch.as_tensor(v).detach().cpu()
        # a copy each: a one-step generator's outcomes serve every sampling condition, one tensor under two keys
        return (
            (t.to(torch.uint8) if t.dtype in (torch.bool, torch.uint8) else t.double()).contiguous().clone()
        )

    tensors = {k: tensor(v) for k, (v, _) in outcomes.items()}
    tests = {k: test for k, (_, test) in outcomes.items()}
    path = Path(directory) / OUTCOMES
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"tests": json.dumps(tests)})
    share(tmp)
    os.replace(tmp, path)


def check_outcomes(directory: Path, done: dict[str, Any] | None = None) -> Path | None:
    """The outcomes file of a finished run, checked against the checksum DONE recorded (None when the run wrote
    none, as runs made before they existed); a missing, changed or unrecorded file raises a BenchError naming it."""
    directory = Path(directory)
    done = _done_record(directory) if done is None else done
    path, digest = directory / OUTCOMES, done.get("outcomes_sha256")
    if digest is None:
        if path.is_file():
            raise BenchError(f"{path} is not recorded in {directory / DONE}: the harness did not write it there "
                             "when the run finished; delete it, or redo the run with --force")  # fmt: skip
        return None
    check_file(path, digest, record=directory / DONE, remedy="restore it, or redo the run with --force")
    return path


def read_outcomes(directory: Path) -> dict[str, tuple[np.ndarray, str]]:
    """{metric[subset]: (values, test)} of a finished run, checked ({} for a run without outcomes or not done);
    read by safetensors, which never unpickles."""
    from safetensors import SafetensorError, safe_open

    if not (Path(directory) / DONE).is_file() or (path := check_outcomes(directory)) is None:
        return {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            tests = json.loads((f.metadata() or {}).get("tests", "{}"))
            values = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)
    except (OSError, ValueError, SafetensorError) as e:
        raise BenchError(f"cannot read {path}: {e}") from e
    if not isinstance(tests, dict) or set(tests) != set(values) or any(v.ndim != 1 for v in values.values()):
        raise BenchError(f"broken {path}: expected 1-d outcomes, each with its test named in the metadata")
    return {k: (values[k], str(tests[k])) for k in values}


def load_results(results: Path, *, strict: bool = True) -> pd.DataFrame:
    """Every metrics.jsonl under `results` as one tidy DataFrame: COLUMNS, and INTERVAL (NaN where rows lack it)."""
    frames = []
    for path in sorted(Path(results).rglob("metrics.jsonl")):
        try:
            frames.append(pd.DataFrame(read_metrics(path)))
        except BenchError as e:
            if strict:
                raise
            log.warning("skipped: %s", e)  # the message names the file and the line
    if not frames:
        return pd.DataFrame(columns=[*COLUMNS, *INTERVAL])
    df = pd.concat(frames, ignore_index=True)
    for col in INTERVAL:  # rows made before intervals existed have none: NaN
        if col not in df.columns:
            df[col] = None
    return df.assign(ci_low=pd.to_numeric(df["ci_low"]), ci_high=pd.to_numeric(df["ci_high"]))
