"""Without a cluster: cluster presets, run states, and the inline and local launchers' failure handling."""

from __future__ import annotations

import json
import os
import time

import pytest
import submitit

from bench import clusters, launch, runner, status, store
from bench.config import RunSpec
from bench.context import Runtime
from bench.errors import BenchError
from bench.presets import get_preset


def spec(seed: int = 0, **kw) -> RunSpec:
    return RunSpec(**{"method": "original", "dataset": "fashion-mnist", "forget_set": "class-0", "seed": seed,
                      "preset": "smoke", **kw})  # fmt: skip


def finish(results, s: RunSpec) -> None:
    """Make `s` look finished, as runner.execute leaves it."""
    d = store.run_dir(results, s.run_id)
    d.mkdir(parents=True, exist_ok=True)
    row = {c: 0 for c in store.COLUMNS} | {
        "run_id": s.run_id,
        "method": s.method,
        "metric": "m",
        "subset": "all",
    }
    store.write_metrics(d / "metrics.jsonl", [row])
    store.mark_done(d, conditions=runner.condition_names(get_preset(s.preset)))


@pytest.mark.parametrize(("value", "minutes"), [(90, 90), ("90", 90), ("4:00:00", 240), ("1-0", 1440),
                                                ("1-2:30", 1590), ("0:30", 1), ("10:01", 11)])  # fmt: skip
def test_time_limits_in_sbatch_formats(value, minutes):
    assert clusters.time_minutes(value) == minutes


def test_bad_time_limit_names_the_format():
    with pytest.raises(BenchError, match=r"\[D-\]HH:MM:SS"):
        clusters.load_cluster("local", ["slurm.time=4h"])


def test_presets_load_and_overrides_are_typed():
    assert {"local", "example-gpu"} <= set(clusters.cluster_names())
    cfg = clusters.load_cluster("example-gpu", ["slurm.time=2:00:00", "slurm.gpus_per_node=2", "slurm.mem_gb=40.5",
                                              "slurm.additional.reservation=paper", "slurm.setup=module load cuda;nvidia-smi"])  # fmt: skip
    params = clusters.executor_params(cfg)
    assert params["timeout_min"] == 120 and params["gpus_per_node"] == 2 and params["mem_gb"] == 40.5
    assert params["slurm_additional_parameters"]["reservation"] == "paper"
    assert params["slurm_setup"] == ["module load cuda", "nvidia-smi"]
    assert "slurm_account" not in params  # an empty account in the preset means "none"


def test_preset_reaches_the_sbatch_script(tmp_path):
    cfg = clusters.load_cluster("example-gpu", ["slurm.account=proj42", "slurm.qos=high"])
    ex = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    ex.update_parameters(**clusters.executor_params(cfg))
    script = ex._executor._make_submission_file_text("python job.py", "uid")  # what sbatch receives
    for line in ("--gpus-per-node=1", "--cpus-per-task=8", "--time=240", "--partition=gpu", "--account=proj42",
                 "--qos=high", "--signal=USR2@120", "--mem=32GB"):  # fmt: skip
        assert f"#SBATCH {line}\n" in script, line


def test_zero_gpus_is_left_out():
    # submitit would write --gpus-per-node=0, which cancels a GPU request made through `additional` (gres).
    cfg = clusters.load_cluster("local", ["slurm.gpus_per_node=0", "slurm.additional.gres=gpu:fake:2"])
    assert "gpus_per_node" not in clusters.executor_params(cfg)


@pytest.mark.parametrize(
    "item", ["slurm.partitoin=gpu", "slurm.gpus_per_node=two", "slurm=1", "slurm.a.b.c=1"]
)
def test_bad_overrides_are_named(item):
    with pytest.raises(BenchError, match="--set"):
        clusters.load_cluster("local", [item])


def test_unknown_cluster_lists_the_presets():
    with pytest.raises(BenchError, match="example-gpu"):
        clusters.load_cluster("nope")


def test_slurm_needs_a_cluster(tmp_path):
    with pytest.raises(BenchError, match="--cluster"):
        launch.launch([spec()], tmp_path, Runtime(), launcher="slurm")


def test_pending_array_tasks_are_expanded():
    assert status._expand_ids("12_[0-2,5%2]") == ["12_0", "12_1", "12_2", "12_5"]
    assert status._expand_ids("12_3") == ["12_3"] and status._expand_ids("7") == ["7"]


def test_states_from_disk_and_queue(tmp_path, monkeypatch):
    specs = [spec(seed) for seed in range(6)]
    root = tmp_path
    finish(root, specs[0])
    for s, job_id in zip(specs[1:5], ("9_1", "9_2", "9_3", "9_4"), strict=True):
        d = store.run_dir(root, s.run_id)
        d.mkdir(parents=True)
        store.write_json(d / status.JOB, {"launched": status._now(), "launcher": "slurm", "job_id": job_id,
                                          "stderr": f"/logs/{job_id}.err"})  # fmt: skip
    store.atomic_write_text(
        store.run_dir(root, specs[3].run_id) / status.ERROR, "Traceback\nValueError: boom\n"
    )
    queue = {"9_1": "PENDING", "9_2": "RUNNING", "9_3": "FAILED", "9_4": "CANCELLED by 0"}
    monkeypatch.setattr(status, "slurm_states", lambda ids: queue)
    states = status.run_states(root, [s.run_id for s in specs])
    got = [(states[s.run_id].state, states[s.run_id].detail) for s in specs]
    assert got[0] == ("done", "")
    assert got[1] == ("pending", "SLURM job 9_1 PENDING") and got[2] == ("running", "SLURM job 9_2 RUNNING")
    assert got[3] == ("failed", "ValueError: boom")
    assert states[specs[3].run_id].log.endswith("error.txt")
    assert (
        got[4][0] == "failed"
        and "CANCELLED by 0" in got[4][1]
        and states[specs[4].run_id].log == "/logs/9_4.err"
    )
    assert got[5][0] == "new"
    # rerunning the sweep launches only what never ran or did not finish
    p = launch.plan(specs, root)
    assert p.todo == [specs[3], specs[4], specs[5]] and p.active == specs[1:3] and p.done == [specs[0]]
    assert "6 runs: 1 new, 1 pending, 1 running, 1 done, 2 failed" in status.format_states(states)


def test_a_job_sacct_does_not_know_yet_is_pending_then_failed(tmp_path, monkeypatch):
    s = spec()
    d = store.run_dir(tmp_path, s.run_id)
    d.mkdir(parents=True)
    monkeypatch.setattr(status, "slurm_states", lambda ids: {})
    record = {"launched": status._now(), "launcher": "slurm", "job_id": "5"}
    store.write_json(d / status.JOB, record)
    assert status.run_states(tmp_path)[s.run_id].state == "pending"
    old = time.time() - status.SUBMIT_GRACE_S - 1
    store.write_json(
        d / status.JOB,
        record | {"launched": status.dt.datetime.fromtimestamp(old, status.dt.UTC).isoformat()},
    )
    assert status.run_states(tmp_path)[s.run_id].state == "failed"


def test_a_live_process_is_running_and_a_dead_one_failed(tmp_path):
    s = spec()
    d = store.run_dir(tmp_path, s.run_id)
    d.mkdir(parents=True)
    me = {
        "launched": status._now(),
        "launcher": "inline",
        "host": status.socket.gethostname(),
        "pid": os.getpid(),
    }
    alive = me | {"pid_start": status._proc_start(os.getpid())}
    store.write_json(d / status.JOB, alive)  # queued by a live sweep, not taken yet
    state = status.run_states(tmp_path)[s.run_id]
    assert (state.state, state.detail) == ("pending", f"queued in inline process {os.getpid()}")
    store.write_json(d / status.JOB, alive | {"started": status._now()})
    assert status.run_states(tmp_path)[s.run_id].state == "running"
    store.write_json(d / status.JOB, me | {"pid_start": "0"})  # same pid, another process (pid reuse)
    state = status.run_states(tmp_path)[s.run_id]
    assert state.state == "new" and "not started" in state.detail  # it never started: nothing to resume
    (d / status.ATTEMPTS).write_text("{}\n")
    assert status.run_states(tmp_path)[s.run_id].state == "failed"  # started, then its process ended


def test_inline_failure_is_kept_and_does_not_stop_the_others(tmp_path, monkeypatch):
    import bench.runner

    specs = [spec(0), spec(1), spec(2)]

    def execute(s, results, runtime):
        if s.seed == 1:
            raise RuntimeError("run 1 broke")
        finish(results, s)

    monkeypatch.setattr(bench.runner, "execute", execute)
    launched = launch.launch(specs, tmp_path, Runtime(progress=False))
    states = launched.states
    assert [states[s.run_id].state for s in specs] == ["done", "failed", "done"]
    error = (store.run_dir(tmp_path, specs[1].run_id) / status.ERROR).read_text()
    assert "Traceback" in error and "RuntimeError: run 1 broke" in error
    assert states[specs[1].run_id].detail == "RuntimeError: run 1 broke"

    # rerun: only the failed run executes again, and its old traceback goes away once it succeeds
    monkeypatch.setattr(bench.runner, "execute", lambda s, r, rt: finish(r, s))
    p = launch.plan(specs, tmp_path)
    assert p.todo == [specs[1]]
    launch.launch(p.todo, tmp_path, Runtime(progress=False))
    assert not (store.run_dir(tmp_path, specs[1].run_id) / status.ERROR).exists()
    attempts = [
        len((store.run_dir(tmp_path, s.run_id) / status.ATTEMPTS).read_text().splitlines()) for s in specs
    ]
    assert attempts == [1, 2, 1]


@pytest.mark.slow
def test_local_launcher_runs_jobs_in_processes_and_keeps_failures(tmp_path):
    # Cheap jobs, side by side in two worker processes: a finished run (the job must not redo it) and one that fails
    # at run time in its own process (an unknown dataset only fails where the run executes).
    done, bad = spec(0), spec(1, dataset="no-such-dataset")
    finish(tmp_path, done)
    before = (store.run_dir(tmp_path, done.run_id) / "metrics.jsonl").stat().st_mtime_ns
    launched = launch.launch(
        [done, bad], tmp_path, Runtime(progress=False), launcher="local", workers=2, poll_s=0.2
    )
    assert len(launched.job_ids) == 2
    states = launched.states
    assert states[done.run_id].state == "done"
    assert (store.run_dir(tmp_path, done.run_id) / "metrics.jsonl").stat().st_mtime_ns == before  # not redone
    assert not (store.run_dir(tmp_path, done.run_id) / status.ATTEMPTS).exists()
    d = store.run_dir(tmp_path, bad.run_id)
    assert states[bad.run_id].state == "failed" and "no-such-dataset" in states[bad.run_id].detail
    assert "Traceback" in (d / status.ERROR).read_text()
    job = json.loads((d / status.JOB).read_text())
    assert job["launcher"] == "local" and os.path.exists(job["stderr"])
    attempt = json.loads((d / status.ATTEMPTS).read_text())
    assert attempt["pid"] != os.getpid() and attempt["job_id"] == job["job_id"]


def test_run_job_shares_the_cores_among_local_workers(tmp_path, monkeypatch):
    # Local workers side by side would each start as many OpenMP threads as the machine has cores; the launcher
    # gives each its share (BENCH_THREADS), which RunJob applies unless the user set OMP_NUM_THREADS.
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setenv("BENCH_THREADS", "1")
    seen = []
    monkeypatch.setattr(launch, "run_one", lambda *a, **k: seen.append(torch.get_num_threads()) or "done")
    before = torch.get_num_threads()
    try:
        launch.RunJob()(spec(0), str(tmp_path), Runtime(progress=False), {})
    finally:
        torch.set_num_threads(before)
    assert seen == [1]
