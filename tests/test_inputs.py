"""The fault review's bad inputs, results-file damage, status and leftovers (issue 18, items 4, 6, 7, 9, 10, 11):
each one gets a clear exit-2 message naming the key, flag or file, and nothing earlier is touched."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bench import launch, status, store
from bench.api import Range
from bench.cli import main
from bench.config import RunSpec, resolve_config
from bench.context import Runtime
from bench.data.idx import write_idx
from bench.errors import BenchError
from bench.registry import METHODS
from tests.conftest import fixture_images
from tests.helpers import tiny_context

SMOKE = ["--preset", "smoke"]


def run_args(tmp_path, fmnist_dir, *extra):
    return ["run", "--methods", "sfd", *SMOKE, "--results", str(tmp_path / "r"), "--data-dir", str(fmnist_dir),
            *extra]  # fmt: skip


# Config values and CLI values (item 6, item 10) ---------------------------------------------------------------


@pytest.mark.parametrize(("setting", "says"), [
    ("sfd.iterations=-5", "sfd.iterations=-5: must be in (0, inf)"),
    ("sfd.ema_decay=2", "sfd.ema_decay=2.0: must be in [0, 1)"),
    ("sfd.lr_generator=nan", "sfd.lr_generator=nan: must be a finite number"),
    ("sfd.lr_fake=-1", "sfd.lr_fake=-1.0: must be in (0, inf)"),
    ("sfd.batch_size=0", "sfd.batch_size=0: must be in (0, inf)"),
    ("sfd.t_init=5000", "sfd.t_init=5000: must be in [0, 999]"),
    ("sfd.t_min=800", "sfd.t_min=800 must be below sfd.t_max=712"),
    ("sfd.lr_generator=inf", "must be a finite number"),
])  # fmt: skip
def test_bad_config_values_fail_before_anything_runs(tmp_path, fmnist_dir, capsys, setting, says):
    assert main(run_args(tmp_path, fmnist_dir, "--set", setting)) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_every_numeric_config_field_declares_its_valid_range():
    for name in METHODS:
        for f in dataclasses.fields(METHODS.get(name).Config):
            if isinstance(f.default, int | float) and not isinstance(f.default, bool):
                assert isinstance(f.metadata.get("valid"), Range), f"{name}.{f.name} has no valid=Range(...)"
                for preset in ("smoke", "default", "paper"):  # every preset's scaling is itself valid
                    resolve_config(METHODS.get(name), preset, {})


@pytest.mark.parametrize(("args", "says"), [
    (["--checkpoint-every", "0"], "--checkpoint-every: '0': expected a whole number of at least 1"),
    (["--seeds", "a,b"], "--seeds: 'a,b': expected comma-separated integers"),
    (["--seeds", "99999999999999999999"], "seed 99999999999999999999 is out of range"),
    (["--seeds", ""], "--seeds: empty list"),
    (["--methods", ""], "--methods: empty list"),
    (["--evaluators", ","], "--evaluators: empty list"),
    (["--forget-sets", ""], "--forget-sets: empty list"),
    (["--datasets", ""], "--datasets: empty list"),
])  # fmt: skip
def test_bad_cli_values_are_argparse_errors(tmp_path, fmnist_dir, capsys, args, says):
    with pytest.raises(SystemExit) as e:
        main(run_args(tmp_path, fmnist_dir, *args))
    assert e.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(("args", "says"), [
    (["--forget-sets", "classes-0-1-2-3-4-5-6-7-8-9"], "forgets every class of fashion-mnist"),
    (["--device", "banana"], "--device 'banana': expected cpu, cuda or cuda:N"),
    (["--device", "tpu"], "--device 'tpu': expected cpu, cuda or cuda:N"),
])  # fmt: skip
def test_bad_names_get_a_message_not_a_traceback(tmp_path, fmnist_dir, capsys, args, says):
    assert main(run_args(tmp_path, fmnist_dir, *args)) == 2
    assert says in capsys.readouterr().err


def test_results_pointing_at_a_file_or_below_one(tmp_path, fmnist_dir, capsys):
    (tmp_path / "a_file").write_text("x")
    argv = run_args(tmp_path, fmnist_dir)
    argv[argv.index("--results") + 1] = str(tmp_path / "a_file")
    assert main(argv) == 2 and "is a file, not a sweep folder" in capsys.readouterr().err
    argv[argv.index("--results") + 1] = str(tmp_path / "a_file" / "below")
    assert main(argv) == 2 and "cannot write there" in capsys.readouterr().err
    assert main(["report", "--results", str(tmp_path / "a_file")]) == 2
    assert main(["status", "--results", str(tmp_path / "a_file")]) == 2
    assert (tmp_path / "a_file").read_text() == "x"


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("setpriv") or os.geteuid() != 0, reason="needs root and setpriv")
def test_read_only_folders_give_a_message(tmp_path, fmnist_dir):
    """As root without the capability to override file permissions, like any user on a 0555 folder."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all", sys.executable, "-m",
            "bench"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([*drop, *run_args(tmp_path, fmnist_dir)[:-4], "--results", str(ro / "sweep"),
                          "--data-dir", str(fmnist_dir)], capture_output=True, text=True, env=env)  # fmt: skip
    assert run.returncode == 2 and "cannot write there (Permission denied)" in run.stderr, run.stderr
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "runs" / "r1").mkdir(parents=True)
    (sweep / "runs" / "r1" / "metrics.jsonl").write_text(
        json.dumps({c: 0 for c in store.COLUMNS} | {"preset": "x"}) + "\n"
    )
    rep = subprocess.run([*drop, "report", "--results", str(sweep), "--out", str(ro / "report")],
                         capture_output=True, text=True, env=env)  # fmt: skip
    assert rep.returncode == 2 and "Permission denied" in rep.stderr and "Traceback" not in rep.stderr


def test_aliases_of_a_forget_set_are_the_same_run(tmp_path, fmnist_dir, capsys):
    assert (
        main([*run_args(tmp_path, fmnist_dir, "--forget-sets", "class-0,class-00,classes-0-0"), "--dry-run"])
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("1 runs, 1 to do") and "sfd-fashion-mnist-class-0-s0-smoke-" in out
    assert (
        main([*run_args(tmp_path, fmnist_dir, "--forget-sets", "classes-2-1,classes-1-2-2"), "--dry-run"])
        == 0
    )
    assert "1 runs" in capsys.readouterr().out


# --data-dir is authoritative (item 7) ---------------------------------------------------------------------------


def write_fmnist(d, *, splits=("train", "t10k"), labels_shift=0, garbage=False):
    d.mkdir(parents=True)
    images, labels = fixture_images()
    for prefix in splits:
        write_idx(d / f"{prefix}-images-idx3-ubyte.gz", images[:100] if prefix == "t10k" else images)
        write_idx(
            d / f"{prefix}-labels-idx1-ubyte.gz",
            (labels[:100] if prefix == "t10k" else labels) + labels_shift,
        )
    if garbage:
        (d / "train-images-idx3-ubyte.gz").write_bytes(np.random.default_rng(0).bytes(5000))
    return d


def test_a_missing_data_folder_or_a_file_is_an_error_not_a_fall_back(
    tmp_path, fmnist_dir, capsys, monkeypatch
):
    for where in (tmp_path / "does-not-exist", fmnist_dir / "train-images-idx3-ubyte.gz"):
        argv = run_args(tmp_path, fmnist_dir)
        argv[-1] = str(where)
        assert main([*argv, "--dry-run"]) == 2
        assert f"--data-dir {where}: " in capsys.readouterr().err
    monkeypatch.setenv("BENCH_DATA_DIR", str(tmp_path / "nowhere"))
    assert main([*run_args(tmp_path, fmnist_dir)[:-2], "--dry-run"]) == 2
    assert f"BENCH_DATA_DIR {tmp_path / 'nowhere'}: no such folder" in capsys.readouterr().err


@pytest.mark.parametrize(("kind", "says"), [
    ({"splits": ("train",)}, "lacks t10k-images-idx3-ubyte(.gz), t10k-labels-idx1-ubyte(.gz)"),
    ({"garbage": True}, "train-images-idx3-ubyte.gz"),
    ({"labels_shift": 20}, "lie outside 0..9"),
])  # fmt: skip
def test_broken_data_fails_up_front(tmp_path, capsys, kind, says):
    d = write_fmnist(tmp_path / "data", **kind)
    argv = ["run", "--methods", "original", *SMOKE, "--results", str(tmp_path / "r"), "--data-dir", str(d)]
    assert main(argv) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "r" / "runs").exists() or not any((tmp_path / "r" / "runs").iterdir())


def test_other_data_gets_another_run_id(tmp_path, fmnist_dir, capsys):
    other = write_fmnist(tmp_path / "other")
    ids = []
    for d in (fmnist_dir, other, fmnist_dir):
        argv = run_args(tmp_path, fmnist_dir)
        argv[-1] = str(d)
        assert main([*argv, "--dry-run"]) == 0
        ids.append(capsys.readouterr().out.split()[-1])
    assert ids[0] == ids[2] != ids[1]


# Results files (item 4) -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory, fmnist_dir):
    results = tmp_path_factory.mktemp("finished")
    argv = ["run", "--methods", "original", *SMOKE, "--results", str(results), "--data-dir", str(fmnist_dir)]
    assert main(argv) == 0
    return results, argv


def copy_of(finished, tmp_path):
    results, argv = finished
    shutil.copytree(results, tmp_path / "copy")
    argv = [*argv]
    argv[argv.index("--results") + 1] = str(tmp_path / "copy")
    return tmp_path / "copy", argv, next((tmp_path / "copy" / "runs").iterdir())


@pytest.mark.parametrize("damage", ["non-utf8", "truncated-at-a-line", "edited-value", "foreign-row"])
def test_damaged_results_are_named_and_skipped(finished, tmp_path, capsys, damage):
    results, argv, run = copy_of(finished, tmp_path)
    path = run / "metrics.jsonl"
    raw = path.read_bytes()
    if damage == "non-utf8":
        path.write_bytes(b"\x84" + raw[1:])
    elif damage == "truncated-at-a-line":
        path.write_bytes(b"".join(raw.splitlines(keepends=True)[:3]))
    elif damage == "edited-value":
        rows = [json.loads(line) for line in raw.splitlines()]
        rows[0]["value"] = 0.123
        store.write_metrics(path, rows)
    else:
        rows = [json.loads(line) for line in raw.splitlines()]
        rows[0]["run_id"] = "someone-else"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        store.mark_done(run)  # even with a matching checksum, a row of another run is inconsistent
    assert main(argv) == 2 and str(path) in capsys.readouterr().err
    assert main(["report", "--results", str(results), "--strict"]) == 2
    assert str(path) in capsys.readouterr().err
    with pytest.raises(BenchError, match="none of the 1 metrics.jsonl"):  # non-strict: skipped, and named
        from bench.report import load

        load(results)


def test_a_done_run_without_metrics_is_not_done(finished, tmp_path, capsys):
    results, argv, run = copy_of(finished, tmp_path)
    before = {
        r["metric"]: r["value"]
        for r in store.read_metrics(run / "metrics.jsonl")
        if r["evaluator"] != "wallclock"
    }
    (run / "metrics.jsonl").unlink()
    assert not store.is_done(run)
    assert status.run_states(results)[run.name].state != "done"
    assert main(argv) == 0 and "1 runs, 1 to do" in capsys.readouterr().out
    after = {
        r["metric"]: r["value"]
        for r in store.read_metrics(run / "metrics.jsonl")
        if r["evaluator"] != "wallclock"
    }
    assert after == before  # evaluated again from the saved model


def test_a_broken_spec_json_is_an_error(finished, tmp_path, capsys):
    _, argv, run = copy_of(finished, tmp_path)
    (run / "spec.json").write_text((run / "spec.json").read_text()[:40])
    assert main(argv) == 2 and "broken run record" in capsys.readouterr().err
    shutil.copy(finished[0] / "runs" / run.name / "spec.json", run / "spec.json")
    record = json.loads((run / "spec.json").read_text())
    (run / "spec.json").write_text(json.dumps({**record, "forget_set": "class-3"}))
    assert main(argv) == 2 and "describes another run" in capsys.readouterr().err


# Status and concurrency (item 9) ----------------------------------------------------------------------------------


def spec(seed=0):
    return RunSpec(
        method="original", dataset="fashion-mnist", forget_set="class-0", seed=seed, preset="smoke"
    )


def test_runs_of_a_killed_sweep_that_never_started_are_new_not_failed(tmp_path):
    specs = [spec(0), spec(1)]
    for s in specs:
        d = store.run_dir(tmp_path, s.run_id)
        d.mkdir(parents=True)
        store.write_json(d / status.JOB, {"launched": status._now(), "launcher": "inline", "host": "h", "pid": 1,
                                          "pid_start": "0"})  # fmt: skip
    (store.run_dir(tmp_path, specs[0].run_id) / status.ATTEMPTS).write_text("{}\n")
    states = status.run_states(tmp_path)
    assert states[specs[0].run_id].state == "failed"  # started, then killed: resumable
    assert states[specs[1].run_id].state == "new" and "not started" in states[specs[1].run_id].detail
    assert launch.plan(specs, tmp_path).todo == specs


HOLD = """
import fcntl, sys, time
from pathlib import Path
from bench import status
from bench.config import RunSpec
spec = RunSpec(method="original", dataset="fashion-mnist", forget_set="class-0", seed=0, preset="smoke")
d = Path(sys.argv[1]) / "runs" / spec.run_id
d.mkdir(parents=True, exist_ok=True)
lock = open(d / ".lock", "w")
fcntl.flock(lock, fcntl.LOCK_EX)
status._record(Path(sys.argv[1]), spec, holder=True, launcher="inline", started=status._now(), **status._me())
print("holding", flush=True)
time.sleep(60)
"""


def test_a_run_held_by_another_process_names_that_process(tmp_path, monkeypatch, capsys):
    import bench.runner

    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        monkeypatch.setattr(bench.runner, "execute", lambda *a, **k: pytest.fail("ran a held run"))
        plan = launch.plan([spec(0)], tmp_path)
        assert plan.active == [spec(0)]  # another `bench run` leaves it alone
        launched = launch.launch([spec(0)], tmp_path, Runtime(progress=False))  # even when told to run it
        state = launched.states[spec(0).run_id]
        assert state.state == "running" and f"process {holder.pid}" in state.detail
        job = json.loads((store.run_dir(tmp_path, spec(0).run_id) / status.JOB).read_text())
        assert job["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_queued_run_of_a_live_sweep_is_pending(tmp_path):
    d = store.run_dir(tmp_path, spec(0).run_id)
    d.mkdir(parents=True)
    status._record(tmp_path, spec(0), launcher="inline", **status._me())
    state = status.run_states(tmp_path)[spec(0).run_id]
    assert state.state == "pending" and state.detail == f"queued in inline process {os.getpid()}"


# Leftovers after a kill (item 11) --------------------------------------------------------------------------------


def test_resume_cuts_the_log_back_to_the_dumped_step(tmp_path, fmnist_dir):
    ctx = tiny_context(tmp_path / "run", fmnist_dir)
    for step in range(1, 6):
        ctx.log(step, loss=step)
        if step == 3:
            ctx.save_state({"step": 3})
    with open(tmp_path / "run" / "train_log.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # the interrupted write
    resumed = tiny_context(tmp_path / "run", fmnist_dir)
    assert resumed.load_state()["step"] == 3
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3]
    shutil.rmtree(tmp_path / "run" / "state")
    assert tiny_context(tmp_path / "run", fmnist_dir).load_state() is None  # a fresh start keeps no old steps
    assert (tmp_path / "run" / "train_log.jsonl").read_text() == ""


def test_a_dead_process_temporaries_are_removed_on_the_next_start(tmp_path, monkeypatch):
    import bench.runner

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    d = store.run_dir(tmp_path, spec(0).run_id)
    (d / "model.tmp").mkdir(parents=True)
    for name in (f".metrics.jsonl.{dead.pid}.tmp", f".DONE.{dead.pid}.tmp", f".x.{os.getpid()}.tmp"):
        (d / name).write_text("half")
    (d / "state").mkdir()
    (d / "state" / "state.pt.tmp").write_text("half")
    job = store.run_dir(tmp_path, spec(0).run_id) / status.JOB
    store.write_json(job, {"launcher": "inline", "ended": "earlier attempt"})

    def execute(*args, **kwargs):  # while it runs, its record says so
        assert status.run_states(tmp_path)[spec(0).run_id].state == "running"

    monkeypatch.setattr(bench.runner, "execute", execute)
    assert launch.run_one(spec(0), tmp_path, Runtime(progress=False), reraise=True) == "done"
    assert json.loads(job.read_text())["ended"] != "earlier attempt"
    left = sorted(p.name for p in d.rglob("*.tmp"))
    assert left == [f".x.{os.getpid()}.tmp"]  # a live process's file stays
