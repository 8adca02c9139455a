"""The state of each run of a sweep (new, pending, running, done, failed) from its folder, the job record that
launchers and the run's lock holder write there (job.json), and SLURM's queue."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from bench import store
from bench.config import RunSpec
from bench.errors import BenchError

log = logging.getLogger(__name__)

JOB = "job.json"  # how and when the run was last launched (launcher, job id, log paths), and who holds it
ERROR = "error.txt"  # traceback of the run's last failed attempt
ATTEMPTS = "attempts.jsonl"  # one line per start of the run: requeues and resubmissions show up here
STATES = ("new", "pending", "running", "done", "failed")  # new: never started, and nothing queued to start it
SUBMIT_GRACE_S = 300  # a job sacct does not know yet counts as pending for this long after submission


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (with the pid it identifies a process uniquely)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else fields[19]


# States ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunState:
    run_id: str
    state: str  # one of STATES
    detail: str = ""
    log: str = ""


def _other_conditions(d: Path) -> str:
    """For a finished run evaluated under other sampling conditions than its preset's now, say so."""
    from bench import runner

    try:
        spec = RunSpec.from_dict(json.loads((d / "spec.json").read_text()))
        if runner.evaluated_as_planned(spec, d):
            return ""
    except (OSError, ValueError, KeyError, TypeError, BenchError):
        return ""  # a broken record is for `bench run` and `bench report` to name
    return "evaluated under other sampling conditions than its preset's now: the next `bench run` evaluates it again"


def _expand_ids(job_id: str) -> list[str]:
    """sacct's `123_[0-2,5%2]` (pending array tasks) -> 123_0, 123_1, 123_2, 123_5."""
    m = re.fullmatch(r"(\d+)_\[([\d,\-]+)(?:%\d+)?\]", job_id)
    if not m:
        return [job_id]
    out = []
    for part in m.group(2).split(","):
        lo, _, hi = part.partition("-")
        out += [f"{m.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """SLURM job id -> state, from sacct (finished and active) and squeue (active, works without accounting)."""
    bases = sorted({j.split("_")[0] for j in job_ids})
    states: dict[str, str] = {}
    if bases and shutil.which("sacct"):
        sacct = _run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(bases)])
        for line in sacct.splitlines():
            jid, _, state = line.partition("|")
            for j in _expand_ids(jid.strip()):
                states[j] = state.strip()
    if bases and shutil.which("squeue"):
        for line in _run(["squeue", "-h", "-r", "-o", "%i|%T", "-u", str(os.getuid())]).splitlines():
            jid, _, state = line.partition("|")
            if jid.split("_")[0] in bases:
                states[jid.strip()] = state.strip()
    return states


_PENDING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "CONFIGURING"}
_RUNNING = {"RUNNING", "COMPLETING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "RESIZING"}


def _active(job: dict, queue: dict[str, str]) -> tuple[str, str] | None:
    """("pending"|"running", detail) while a job is queued or running the run, else None."""
    if job.get("launcher") == "slurm":
        state = queue.get(job["job_id"], "")
        word = state.split()[0] if state else ""
        if word in _PENDING:
            return "pending", f"SLURM job {job['job_id']} {state}"
        if word in _RUNNING:
            return "running", f"SLURM job {job['job_id']} {state}"
        age = time.time() - dt.datetime.fromisoformat(job["launched"]).timestamp()
        if not state and age < SUBMIT_GRACE_S:
            return "pending", f"SLURM job {job['job_id']} submitted {age:.0f}s ago"
        return None
    if _alive(job) and not job.get("ended"):
        if job.get("started"):
            return "running", f"{job['launcher']} process {job['pid']}"
        return "pending", f"queued in {job['launcher']} process {job['pid']}"
    return None


def _alive(job: dict) -> bool:
    """Whether the local process a job record names still runs (the pid with its start time, on this host)."""
    if job.get("host") != socket.gethostname() or not job.get("pid"):
        return False
    start = _proc_start(job["pid"])
    return start is not None and start == job.get("pid_start")


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _proc_start(os.getpid())}


def _read_job(d: Path) -> dict:
    try:
        return json.loads((d / JOB).read_text())
    except (OSError, ValueError):
        return {}


def run_states(results: Path, run_ids: list[str] | None = None) -> dict[str, RunState]:
    """The state of each run (all runs under `results` when run_ids is None), queried in one go."""
    root = Path(results) / "runs"
    if run_ids is None:
        run_ids = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    jobs = {rid: _read_job(root / rid) for rid in run_ids}
    slurm_ids = [j["job_id"] for j in jobs.values() if j.get("launcher") == "slurm"]
    queue = slurm_states(slurm_ids) if slurm_ids else {}
    return {rid: _state(rid, root / rid, jobs[rid], queue) for rid in run_ids}


def _state(rid: str, d: Path, job: dict, queue: dict[str, str]) -> RunState:
    if not d.is_dir():
        return RunState(rid, "new")
    if store.is_done(d):
        return RunState(rid, "done", _other_conditions(d), log=str(d))
    log_path = job.get("stderr") or str(d)
    if (d / ERROR).is_file():  # written by the last attempt (launching and starting a run delete it)
        lines = [ln for ln in (d / ERROR).read_text().splitlines() if ln.strip()]
        return RunState(rid, "failed", lines[-1] if lines else "failed", str(d / ERROR))
    if active := _active(job, queue):
        return RunState(rid, active[0], active[1], log_path)
    if job.get("launcher") == "slurm":
        state = queue.get(job["job_id"]) or "no record in sacct/squeue"
        return RunState(rid, "failed", f"SLURM job {job['job_id']} {state}, run not finished", log_path)
    if not (d / ATTEMPTS).is_file():
        why = f"its {job['launcher']} process {job.get('pid')} ended first" if job else "nothing launched it"
        return RunState(rid, "new", f"not started ({why}): the same command starts it", log_path)
    if job:
        return RunState(rid, "failed", f"{job['launcher']} process ended before the run finished", log_path)
    return RunState(rid, "failed", "incomplete, and no job is running it", log_path)


def _record(results: Path, spec: RunSpec, *, holder: bool = False, **info: Any) -> None:
    """Write the run's job.json: the lock's `holder` always does; a launcher does unless a live local process
    other than this one has started the run."""
    path = store.run_dir(results, spec.run_id) / JOB
    held = _read_job(path.parent)
    if not holder and held.get("started") and held.get("pid") != os.getpid() and _alive(held):
        return
    store.write_json(path, {"launched": _now(), **info})


def follow(results: Path, run_ids: list[str], *, poll_s: float = 5.0) -> dict[str, RunState]:
    """Poll until every run is done or failed, with a progress bar; returns the final states."""
    last = None
    with tqdm(total=len(run_ids), desc="runs", unit="run", disable=None) as bar:
        while True:
            states = run_states(results, run_ids)
            counts = {k: sum(s.state == k for s in states.values()) for k in STATES}
            bar.n = counts["done"] + counts["failed"]
            bar.set_postfix(counts, refresh=True)
            if bar.disable and counts != last:  # no terminal: a log line per change instead of a bar
                log.info("runs: %s", ", ".join(f"{v} {k}" for k, v in counts.items()))
                last = counts
            if bar.n >= len(run_ids):
                return states
            time.sleep(poll_s)


def format_states(states: dict[str, RunState]) -> str:
    """One line per run (state, run id, detail, log) and the counts per state."""
    lines = [f"{s.state:<8} {s.run_id}  {s.detail}{'  log: ' + s.log if s.log and s.state != 'done' else ''}".rstrip()
             for s in states.values()]  # fmt: skip
    counts = {k: sum(s.state == k for s in states.values()) for k in STATES}
    lines.append(f"{len(states)} runs: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return "\n".join(lines)
