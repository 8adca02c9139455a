"""SLURM sweeps on a real one-node cluster (slurm/local-cluster.sh): arrays, failures, scancel, requeue, limits."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from bench import launch, status, store
from bench.cli import main

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parent.parent / "slurm" / "local-cluster.sh"
# wall-clock figures differ between any two runs
TIMINGS = {"unlearn_s", "sample_s", "images_per_s", "peak_mem_mb"}
TEST_LIMIT_S = 1500  # no test may hang on a stuck queue
LONG_S = 75  # seconds of unlearning in the runs that get requeued: more than a one-minute attempt gives


def _cannot_start(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"the SLURM test cluster must start in CI: {reason}")
    pytest.skip(f"no SLURM test cluster here: {reason}")


def _free_port_base() -> int:
    """A base port with the three ports above it free too (slurmctld, slurmd, slurmdbd, MariaDB)."""
    for base in range(26817, 40000, 10):
        try:
            for port in range(base, base + 4):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports")


@pytest.fixture(scope="module")
def cluster():
    """The cluster named by SLURM_CONF (e.g. started by .ci/run), else one started here and purged afterwards."""
    if os.environ.get("SLURM_CONF"):
        try:
            r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=60)
            said = r.stdout + r.stderr if r.returncode == 0 else f"exit {r.returncode}: {r.stderr}"
        except OSError as e:
            said = str(e)
        if not any(w in said for w in ("idle", "mix", "alloc")):
            _cannot_start(f"SLURM_CONF={os.environ['SLURM_CONF']} is set but sinfo says: {said}")
        yield Path(os.environ["SLURM_CONF"]).parent.parent
        return
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        _cannot_start("neither Slurm nor apt-get (Debian/Ubuntu) is available")
    d = Path(tempfile.mkdtemp(prefix="bench-slurm-", dir="/tmp"))
    env = {**os.environ, "SLURM_LOCAL_PORT_BASE": str(_free_port_base())}
    r = subprocess.run(
        ["bash", str(SCRIPT), "start", str(d)], env=env, capture_output=True, text=True, timeout=900
    )
    if r.returncode:
        subprocess.run(["bash", str(SCRIPT), "purge", str(d)], capture_output=True, timeout=300)
        _cannot_start(f"`slurm/local-cluster.sh start` failed:\n{r.stderr[-3000:]}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(d / "etc" / "slurm.conf"))
        try:
            yield d
        finally:
            subprocess.run(["bash", str(SCRIPT), "purge", str(d)], capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def env(cluster, tmp_path_factory):
    """What the jobs inherit through sbatch: a throwaway model store, one thread (CPU results then match the
    inline runs of this process bit for bit) and offline hubs."""
    import torch

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BENCH_MODEL_DIR", str(tmp_path_factory.mktemp("models")))
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # only a GPU request may set it in a job
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _time_limit():
    def hung(signum, frame):
        raise TimeoutError(f"test ran over {TEST_LIMIT_S}s: is the SLURM queue stuck? (squeue, sinfo)")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(TEST_LIMIT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def common(fmnist_dir) -> list[str]:
    return ["--preset", "smoke", "--data-dir", str(fmnist_dir.parent), "--evaluators", "forget_accuracy,fid,wallclock",
            "--checkpoint-every", "2"]  # fmt: skip


def rows(results: Path) -> dict:
    """(run, metric) -> (value, n) for everything but wall-clock timings."""
    out = {}
    for r in store.load_results(results).to_dict("records"):
        out[(r["run_id"], r["evaluator"], r["metric"], r["subset"])] = (
            None if r["metric"] in TIMINGS else (r["value"], r["n"])
        )
    return out


def run_dir_of(results: Path, prefix: str) -> Path:
    (d,) = [p for p in (results / "runs").iterdir() if p.name.startswith(prefix)]
    return d


def attempts(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / status.ATTEMPTS).read_text().splitlines()]


def wait_for(what: str, predicate, timeout: float = 600, every: float = 0.5):
    t0 = time.time()
    while not (value := predicate()):
        if time.time() - t0 > timeout:
            pytest.fail(f"gave up after {timeout}s waiting for {what}")
        time.sleep(every)
    return value


def settled(results: Path) -> bool:
    states = status.run_states(results)
    return bool(states) and all(s.state in ("done", "failed") for s in states.values())


@pytest.fixture(scope="module")
def inline_sweep(env, fmnist_dir, tmp_path_factory) -> Path:
    """2 methods x 2 seeds at the smoke preset, inline in this process (it also trains the store's models)."""
    out = tmp_path_factory.mktemp("inline")
    assert (
        main(
            ["run", "--methods", "sfd,finetune", "--seeds", "0,1", *common(fmnist_dir), "--results", str(out)]
        )
        == 0
    )
    return out


def unlearn_s(results: Path, prefix: str) -> float:
    rows = store.read_metrics(run_dir_of(results, prefix) / "metrics.jsonl")
    return next(r["value"] for r in rows if r["metric"] == "unlearn_s")


@pytest.fixture(scope="module")
def long_run(inline_sweep, fmnist_dir, tmp_path_factory) -> tuple[list[str], Path]:
    """An sfd run with at least LONG_S seconds of unlearning on this machine, and its inline result."""
    # Smoke sfd does 4 iterations; aim a little high, and retry longer when the machine was faster than that.
    per_iteration = min(unlearn_s(inline_sweep, f"sfd-fashion-mnist-class-0-s{seed}-") for seed in (0, 1)) / 4
    iterations = math.ceil(1.25 * LONG_S / per_iteration)
    for _ in range(3):
        args = ["--methods", "sfd", "--seeds", "0", "--set", f"sfd.iterations={iterations}", *common(fmnist_dir)]  # fmt: skip
        out = tmp_path_factory.mktemp("long-inline")
        assert main(["run", *args, "--results", str(out)]) == 0
        took = unlearn_s(out, "sfd-")
        if took >= LONG_S:
            return args, out
        iterations = math.ceil(iterations * 1.2 * LONG_S / took)
    pytest.fail(f"could not make an sfd run of {LONG_S}s: the last took {took:.0f}s")


def test_sweep_is_one_array_with_the_inline_rows_and_a_failure_is_kept(
    inline_sweep, fmnist_dir, tmp_path, capsys
):
    sweep = tmp_path / "sweep"
    args = ["run", "--methods", "sfd,finetune", "--seeds", "0,1", *common(fmnist_dir), "--results", str(sweep),
            "--launcher", "slurm", "--cluster", "local"]  # fmt: skip
    # One run fails at run time: its state dump is corrupt (as after a disk fault), so resuming from it raises.
    broken = store.run_dir(sweep, run_dir_of(inline_sweep, "finetune-fashion-mnist-class-0-s1-").name)
    (broken / "state").mkdir(parents=True)
    (broken / "state" / "state.pt").write_bytes(b"not a checkpoint")

    assert main([*args, "--wait"]) == 2  # some runs failed
    out = capsys.readouterr().out
    assert "4 runs, 4 to do" in out and "submitted 4 runs as SLURM job array" in out and str(sweep) in out
    job_ids = [json.loads((d / status.JOB).read_text())["job_id"] for d in (sweep / "runs").iterdir()]
    array = job_ids[0].split("_")[0]
    assert sorted(job_ids) == [f"{array}_{i}" for i in range(4)]  # one sbatch, four array tasks

    def jobs_ended():  # the jobs end a moment after their runs (result pickle, process exit)
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", array], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
        return None if any(s in out for s in ("RUNNING", "PENDING", "COMPLETING")) else out

    sacct = wait_for("the jobs to end", jobs_ended, timeout=120)
    assert sacct.count("COMPLETED") == 3 and sacct.count("FAILED") == 1, sacct

    states = status.run_states(sweep)
    assert sorted(s.state for s in states.values()) == ["done", "done", "done", "failed"]
    failed = states[broken.name]
    assert failed.log == str(broken / "error.txt") and "Traceback" in (broken / "error.txt").read_text()
    assert main(["status", "--results", str(sweep)]) == 0
    printed = capsys.readouterr().out
    assert (
        "4 runs: 0 new, 0 pending, 0 running, 3 done, 1 failed" in printed
        and str(broken / "error.txt") in printed
    )
    expected = rows(inline_sweep)
    assert rows(sweep) == {k: v for k, v in expected.items() if k[0] != broken.name}

    # The same command again submits only the failed run (repaired now), and nothing done is redone.
    (broken / "state" / "state.pt").unlink()
    assert main([*args, "--wait"]) == 0
    out = capsys.readouterr().out
    assert "4 runs, 1 to do" in out and "submitted 1 run as SLURM job" in out
    assert rows(sweep) == expected
    assert sorted(len(attempts(d)) for d in (sweep / "runs").iterdir()) == [1, 1, 1, 2]


def test_cancelled_run_is_reported_and_a_rerun_with_a_gpu_request_completes_it(env, inline_sweep, fmnist_dir,
                                                                               tmp_path, capsys):  # fmt: skip
    sweep = tmp_path / "sweep"
    args = ["run", "--methods", "finetune", "--seeds", "0", *common(fmnist_dir), "--results", str(sweep),
            "--launcher", "slurm", "--cluster", "local"]  # fmt: skip
    assert main(args) == 0
    assert "follow with: bench status" in capsys.readouterr().out
    d = run_dir_of(sweep, "finetune-")
    job_id = json.loads((d / status.JOB).read_text())["job_id"]
    wait_for("the job to start", lambda: status.run_states(sweep)[d.name].state == "running")
    subprocess.run(["scancel", job_id], check=True)  # while it starts up: far from finishing
    state = wait_for(
        "the cancellation", lambda: (s := status.run_states(sweep)[d.name]).state == "failed" and s
    )
    assert "CANCELLED" in state.detail
    assert main(["status", "--results", str(sweep)]) == 0
    assert "CANCELLED" in capsys.readouterr().out

    assert main([*args, "--set", "slurm.gpus_per_node=1", "--wait"]) == 0
    assert "1 runs, 1 to do" in capsys.readouterr().out
    assert status.run_states(sweep)[d.name].state == "done"
    *before, last = attempts(d)  # the cancelled job may have died before it recorded its attempt
    assert last["cuda_visible_devices"] == "0" and all(a["cuda_visible_devices"] is None for a in before)
    assert rows(sweep) == {k: v for k, v in rows(inline_sweep).items() if k[0] == d.name}


def test_requeued_run_resumes_from_its_state_dump(long_run, tmp_path, capsys):
    args, reference = long_run
    sweep = tmp_path / "sweep"
    assert main(["run", *args, "--results", str(sweep), "--launcher", "slurm", "--cluster", "local"]) == 0
    d = run_dir_of(sweep, "sfd-")
    job_id = json.loads((d / status.JOB).read_text())["job_id"]
    wait_for("a state dump", lambda: (d / launch.STATE_DUMP).is_file(), every=0.1)
    subprocess.run(["scontrol", "requeue", job_id], check=True)  # what preemption with requeue does
    wait_for("the requeued run to finish", lambda: settled(sweep), every=2)
    assert status.run_states(sweep)[d.name].state == "done"
    tries = attempts(d)
    assert len(tries) == 2 and tries[1]["resumed_from_state"] and tries[1]["restart_count"] == 1
    assert rows(sweep) == rows(reference)


def test_run_past_its_time_limit_is_requeued_and_finishes(long_run, tmp_path, capsys):
    args, reference = long_run
    sweep = tmp_path / "sweep"
    # Slurm checks time limits every 30 s and sends USR2 at the first check with at most signal_delay_s + 30 s
    # left: with a one-minute limit and a 1 s delay, 29-59 s into each attempt. That is less than the LONG_S
    # of unlearning plus start-up, so submitit must checkpoint and requeue, and the next attempt resumes.
    limits = ["--set", "slurm.time=1", "--set", "slurm.signal_delay_s=1", "--set", "slurm.max_requeues=15"]
    cmd = ["run", *args, "--results", str(sweep), "--launcher", "slurm", "--cluster", "local", *limits]
    assert main(cmd) == 0
    wait_for(
        "the run to finish across time limits", lambda: settled(sweep), timeout=TEST_LIMIT_S - 60, every=2
    )
    d = run_dir_of(sweep, "sfd-")
    assert status.run_states(sweep)[d.name].state == "done", (d / status.ERROR).read_text()
    tries = attempts(d)
    assert len(tries) >= 2 and any(t["resumed_from_state"] for t in tries[1:])
    log = Path(json.loads((d / status.JOB).read_text())["stderr"]).read_text()
    assert "this job is timed-out" in log and "time limit or preemption: requeueing" in log
    assert rows(sweep) == rows(reference)


def test_missing_models_and_caches_are_jobs_the_array_waits_for(env, tmp_path, capsys):
    """A dataset without a teacher (an image folder) and a method with a per-teacher cache (SA): the sweep submits
    the pretraining, then SA's cache after it, and the array after both; no array task trains or waits on a lock."""
    from tests.fixtures_real import write_imagefolder

    folder = write_imagefolder(tmp_path / "images", per_class=6)
    sweep = tmp_path / "sweep"
    args = ["run", "--methods", "original,sa", "--datasets", f"imagefolder:{folder}", "--preset", "smoke",
            "--results", str(sweep), "--launcher", "slurm", "--cluster", "local"]  # fmt: skip
    assert main([*args, "--wait"]) == 0
    out = capsys.readouterr().out
    assert "after the jobs that train missing models or fill caches:" in out
    pre = out.split("after the jobs that train missing models or fill caches:")[1].split()[0:2]
    pre = [p.strip(",") for p in pre]
    assert len(pre) == 2  # the teacher and judge, then SA's replay and Fisher
    deps = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(pre)],
                          capture_output=True, text=True).stdout  # fmt: skip
    assert deps.count("COMPLETED") == 2, deps
    for d in (sweep / "runs").iterdir():
        log = Path(json.loads((d / status.JOB).read_text())["stderr"]).read_text()
        assert "training them now" not in log and "sa fisher" not in log  # the runs only loaded
    assert main([*args, "--dry-run"]) == 0 and "2 runs, 0 to do" in capsys.readouterr().out


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_pretrain_on_slurm_is_a_job_of_its_own(env, tmp_path, capsys, nproc):
    from tests.fixtures_real import write_imagefolder

    folder = write_imagefolder(tmp_path / "images", per_class=6)
    store_root = tmp_path / "store"
    assert main(["pretrain", "--dataset", f"imagefolder:{folder}", "--preset", "smoke", "--out", str(store_root),
                 "--launcher", "slurm", "--cluster", "local", "--nproc", nproc, "--wait"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "submitted the pretraining as SLURM job" in out and "teacher and judge written to" in out
    assert list(store_root.rglob("MANIFEST.json"))
