"""Where runs execute: in this process (inline), in local processes (local) or as a SLURM job array (slurm)."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from tqdm.auto import tqdm

from bench import clusters, distributed, store
from bench.config import RunSpec
from bench.context import Runtime
from bench.errors import BenchError, unknown
from bench.status import (
    ATTEMPTS,
    ERROR,
    RunState,
    _me,
    _now,
    _proc_start,
    _read_job,
    _record,
    run_states,
)

log = logging.getLogger(__name__)

LAUNCHERS = ("inline", "local", "slurm")
STATE_DUMP = Path("state") / "state.pt"  # RunContext.state_path, relative to the run directory
# Passed to each job, for clusters that do not export the submitting shell's environment.
ENV_PREFIXES = ("BENCH_", "HF_", "TRANSFORMERS_", "TORCH_HOME")
LOCAL_TIMEOUT_MIN = 7 * 24 * 60  # submitit's local executor kills jobs after 2 min unless told otherwise


# The job ---------------------------------------------------------------------------------------------------


def _job_id_here() -> str | None:
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")


def run_one(spec: RunSpec, results: Path, runtime: Runtime, *, reraise: bool) -> str:
    """Execute one run unless it is done or held by another process; a failure leaves its traceback in error.txt.

    With several ranks (a multi-process job) rank 0 decides and keeps the records (lock, job.json, attempts,
    error.txt); the other ranks follow its decision and execute without writing anything."""
    from bench import runner

    world = distributed.current()
    if not world.is_main:
        decision = world.broadcast(None)
        if decision == "run":
            runner.execute(spec, results, runtime)
        return "done" if decision == "run" else decision
    d = store.run_dir(results, spec.run_id)
    # A finished run is never redone, whatever restarted this job (only evaluated again if its preset's
    # sampling conditions changed since: runner.evaluated_as_planned).
    if store.is_done(d) and runner.evaluated_as_planned(spec, d):
        return world.broadcast("done")
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("%s is being executed by another process; leaving it to that one", spec.run_id)
            return world.broadcast("busy")
        # Only the lock's holder says who runs the run: a process that finds it busy never touches job.json.
        job = {k: v for k, v in _read_job(d).items() if k != "ended"}
        _record(results, spec, holder=True, **{**job, **_me(), "started": _now()})
        removed = store.remove_temporaries(d)
        if removed:
            log.info("%s: removed %d files an interrupted attempt left: %s", spec.run_id, len(removed),
                     ", ".join(p.name for p in removed))  # fmt: skip
        attempt = {"start": _now(), "host": socket.gethostname(), "pid": os.getpid(), "job_id": _job_id_here(),
                   "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
                   "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                   "resumed_from_state": (d / STATE_DUMP).is_file(),
                   "model_saved": (d / "model" / "unlearn.json").is_file()}  # fmt: skip
        with open(d / ATTEMPTS, "a") as f:
            f.write(json.dumps(attempt) + "\n")
        (d / ERROR).unlink(missing_ok=True)
        try:
            world.broadcast("run")
            runner.execute(spec, results, runtime)
        except Exception:
            store.atomic_write_text(d / ERROR, traceback.format_exc())
            if reraise:
                raise
            return "failed"
        finally:  # this process no longer runs it, whatever it goes on to do
            _record(results, spec, holder=True, **{**_read_job(d), "ended": _now()})
    return "done"


class RunJob(submitit.helpers.Checkpointable):
    """One run as a submitit job. On a time limit or preemption submitit calls checkpoint(), which requeues the
    same call; the new start resumes from the run's last state dump (runner.execute picks up what the run
    directory holds), and `scontrol requeue` restarts it the same way."""

    def __call__(self, spec: RunSpec, results: str, runtime: Runtime, env: dict[str, str]) -> str:
        for key, value in env.items():  # for clusters that do not export the submitting shell's environment
            os.environ.setdefault(key, value)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        # torch would otherwise use every core of the node (SLURM) or of the machine (local workers side by side,
        # where oversubscribed OpenMP threads slow every run down many times).
        cpus = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("BENCH_THREADS")
        if cpus and "OMP_NUM_THREADS" not in os.environ:
            import torch

            torch.set_num_threads(int(cpus))
        # A job of several tasks (--nproc) is one data-parallel run: each task joins the others as a rank, on its
        # own GPU under CUDA.
        world = distributed.init_job(runtime.device)
        runtime = dataclasses.replace(runtime, device=distributed.rank_device(runtime.device, world))
        try:
            return run_one(spec, Path(results), runtime, reraise=True)
        finally:
            distributed.shutdown()

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        log.warning("time limit or preemption: requeueing; the run resumes from its last state dump")
        ignore_sigterm_for_requeue()
        return super().checkpoint(*args, **kwargs)


def ignore_sigterm_for_requeue() -> None:
    """submitit requeues next with `scontrol requeue`, and SLURM answers by sending SIGTERM to every process of the
    job, scontrol included: when that arrives before scontrol exits, the requeue counts as failed and the job with
    it. An ignored SIGTERM is inherited by scontrol across exec (a Python handler would not be)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# Launching -------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    todo: list[RunSpec]
    active: list[RunSpec]  # queued or running already: left alone
    done: list[RunSpec]


def plan(specs: list[RunSpec], results: Path, *, force: bool = False) -> Plan:
    """What to launch: runs never started, failed or incomplete (and with force, finished ones too)."""
    from bench import runner

    states = run_states(results, [s.run_id for s in specs])
    out = Plan([], [], [])
    for s in specs:
        st = states[s.run_id].state
        if not force:
            runner.check_config(s, store.run_dir(results, s.run_id))
        if st in ("pending", "running"):
            out.active.append(s)
        elif st == "done" and not force:
            d = store.run_dir(results, s.run_id)
            store.read_metrics(d / "metrics.jsonl")  # a broken results file raises here, naming itself
            # evaluated under other sampling conditions than its preset's now: evaluated again
            (out.done if runner.evaluated_as_planned(s, d) else out.todo).append(s)
        else:
            out.todo.append(s)
    return out


@dataclass
class Launched:
    launcher: str
    run_ids: list[str]
    job_ids: list[str]
    folder: Path  # where submitit keeps the jobs' pickles and logs
    # final states: inline and local run to the end; for slurm, follow() waits for them
    states: dict[str, RunState] | None = None
    prerequisites: list[str] = dataclasses.field(default_factory=list)  # jobs the array waits for (slurm)


def _job_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}


def _prepare(specs: list[RunSpec], results: Path, force: bool) -> None:
    for s in specs:
        d = store.run_dir(results, s.run_id)
        if force and store.is_done(d):
            shutil.rmtree(d)
        (d / ERROR).unlink(missing_ok=True)  # a resubmitted run is pending, not failed
        d.mkdir(parents=True, exist_ok=True)


def launch(specs: list[RunSpec], results: Path, runtime: Runtime, *, launcher: str = "inline",
           cluster: str | None = None, cluster_sets: list[str] = (), workers: int = 2, force: bool = False,
           poll_s: float = 5.0) -> Launched:  # fmt: skip
    """Launch `specs` (already planned) and, for inline and local, run them to the end; slurm returns after
    submitting one job array (follow() waits for it). Jobs get specs and paths, never models."""
    if launcher not in LAUNCHERS:
        raise unknown("launcher", launcher, LAUNCHERS)
    if launcher == "slurm" and cluster is None:
        raise BenchError(
            f"--launcher slurm needs --cluster NAME ({', '.join(clusters.cluster_names())}) or a .toml path"
        )
    if cluster_sets and launcher != "slurm":
        raise BenchError(f"--set {cluster_sets[0]}: slurm.* settings need --launcher slurm")
    if runtime.nproc > 1 and launcher == "inline":
        raise BenchError(f"--nproc {runtime.nproc} needs --launcher local or slurm (a process per rank)")
    results = Path(results).resolve()
    folder = results / "jobs"
    runtime = dataclasses.replace(runtime, progress=launcher == "inline" and runtime.progress,
                                  data_dir=Path(runtime.data_dir).resolve() if runtime.data_dir else None)  # fmt: skip
    cfg = clusters.load_cluster(cluster, cluster_sets) if launcher == "slurm" else {}
    _prepare(specs, results, force)
    ids = [s.run_id for s in specs]
    if launcher != "slurm":  # pending until a process takes them: another `bench run` leaves them alone
        for spec in specs:
            _record(results, spec, launcher=launcher, **_me())
    if launcher == "inline":
        return Launched("inline", ids, [], folder, _run_inline(specs, results, runtime))
    if launcher == "local":
        return Launched("local", ids, *_run_local(specs, results, runtime, folder, workers, poll_s))
    return _submit_slurm(specs, results, runtime, cfg, folder)


def _run_inline(specs: list[RunSpec], results: Path, runtime: Runtime) -> dict[str, RunState]:
    for i, spec in enumerate(specs, 1):
        log.info("[%d/%d] %s", i, len(specs), spec.run_id)
        if run_one(spec, results, runtime, reraise=False) == "failed":
            log.error("%s failed: traceback in %s", spec.run_id, store.run_dir(results, spec.run_id) / ERROR)
    return run_states(results, [s.run_id for s in specs])


def _run_local(specs, results, runtime, folder, workers, poll_s):
    ex = submitit.LocalExecutor(folder=folder)
    # One task per rank (--nproc), which submitit numbers; RunJob makes them one torch.distributed world.
    ex.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN, tasks_per_node=runtime.nproc)
    # The machine's cores shared among the workers' processes (BENCH_THREADS, read by RunJob; OMP_NUM_THREADS wins).
    threads = str(max(1, (os.cpu_count() or 1) // (max(1, workers) * runtime.nproc)))
    env, queue, running, job_ids = {**_job_env(), "BENCH_THREADS": threads}, list(specs), {}, []
    gpus, slots = _local_gpus(runtime, workers), {}  # GPUs of each worker slot; run id -> its slot
    bar = tqdm(total=len(specs), desc="runs", unit="run", disable=None)
    try:
        while queue or running:
            while queue and len(running) < max(1, workers):
                spec = queue.pop(0)
                if gpus:  # the LocalExecutor shows a job only the GPUs it is given (CUDA_VISIBLE_DEVICES)
                    slots[spec.run_id] = min(set(range(len(gpus))) - set(slots.values()))
                    ex.update_parameters(gpus_per_node=runtime.nproc, visible_gpus=gpus[slots[spec.run_id]])
                job = ex.submit(RunJob(), spec, str(results), runtime, env)
                pid = int(job.job_id)
                _record(results, spec, launcher="local", job_id=job.job_id, host=socket.gethostname(), pid=pid,
                        pid_start=_proc_start(pid), stdout=str(job.paths.stdout), stderr=str(job.paths.stderr))  # fmt: skip
                running[spec.run_id], job_ids = job, [*job_ids, job.job_id]
            time.sleep(min(poll_s, 0.5))
            for rid in [r for r, j in running.items() if j.done()]:
                del running[rid]
                slots.pop(rid, None)
                bar.update()
    except KeyboardInterrupt:
        for job in running.values():
            job.cancel()
        raise
    finally:
        bar.close()
    return job_ids, folder, run_states(results, [s.run_id for s in specs])


def _local_gpus(runtime: Runtime, workers: int) -> list[tuple[int, ...]]:
    """Under CUDA, the GPUs of each local worker slot: --nproc of them, in turn (slots share them when there are
    fewer GPUs than workers x processes); [] on the CPU."""
    import torch

    device = torch.device(runtime.device)
    if device.type != "cuda":
        return []
    if device.index is not None:
        raise BenchError(f"--device {runtime.device} with --launcher local: the launcher gives each worker its "
                         "own GPUs; use --device cuda")  # fmt: skip
    count, n = torch.cuda.device_count(), runtime.nproc
    if n > count:
        raise BenchError(f"--nproc {n} --device cuda: one GPU per process, and this machine has {count}")
    return [tuple((w * n + k) % count for k in range(n)) for w in range(max(1, workers))]


def _submit_slurm(specs, results, runtime, cfg, folder) -> Launched:
    ids = [s.run_id for s in specs]
    if not specs:
        return Launched("slurm", ids, [], folder)
    from bench import prerequisites

    # Teachers, judges and methods' caches that are missing get jobs of their own, and the array waits for them.
    needs = prerequisites.find_needs(specs, runtime)
    after = prerequisites.submit(needs, runtime, cfg, folder)
    ex = clusters.executor(cfg, folder)
    if runtime.nproc > 1:  # --nproc tasks (ranks) per run, one GPU each when the preset asks for GPUs
        ex.update_parameters(**clusters.rank_params(cfg, runtime.nproc))
    if after:
        # A failed prerequisite cancels the runs waiting for it, instead of leaving them pending for ever.
        extra = {**(cfg.get("additional") or {}), "dependency": "afterok:" + ":".join(after),
                 "kill-on-invalid-dep": "yes"}  # fmt: skip
        ex.update_parameters(slurm_additional_parameters=extra)
    n = len(specs)
    try:
        jobs = ex.map_array(RunJob(), specs, [str(results)] * n, [runtime] * n, [_job_env()] * n)
    except submitit.core.utils.FailedJobError as e:
        raise BenchError(f"sbatch refused the job array (cluster preset {cfg['name']!r}): {e}") from e
    for spec, job in zip(specs, jobs, strict=True):
        _record(results, spec, launcher="slurm", job_id=job.job_id, cluster=cfg["name"],
                stdout=str(job.paths.stdout), stderr=str(job.paths.stderr))  # fmt: skip
    return Launched("slurm", ids, [j.job_id for j in jobs], folder, prerequisites=after)


def print_launched(launched: Launched, results: Path) -> None:
    ids = launched.job_ids
    if launched.launcher == "slurm" and ids:
        what = (
            f"SLURM job array {ids[0].split('_')[0]} ({ids[0]} .. {ids[-1]})"
            if "_" in ids[0]
            else f"SLURM job {ids[0]}"
        )
        print(f"submitted {len(ids)} run{'s' * (len(ids) > 1)} as {what}; sweep folder {results}, job logs in "
              f"{launched.folder}")  # fmt: skip
        if launched.prerequisites:
            print(
                f"  after the jobs that train missing models or fill caches: {', '.join(launched.prerequisites)}"
            )
    elif launched.launcher == "local" and ids:
        print(f"ran {len(ids)} runs as local jobs {', '.join(ids)}; logs in {launched.folder}")
