"""Data-parallel runs on 2 CPU processes (gloo): the same experiment as on one process, resumable, rank 0 writes.

The ranks are forked from the test process (torch.multiprocessing, a free port); each writes what the test
compares into a file of the test's folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from bench import distributed, status, store
from bench.data.fashion_mnist import FashionMNIST
from bench.errors import BenchError
from bench.presets import get_preset
from methods.sfd import SFD, SFDConfig
from tests.helpers import TINY, Killed, kill_after_saves, tiny_context, tiny_teacher

SFD_CFG = dataclasses.replace(SFDConfig(), batch_size=4, iterations=1, anchor="random")  # 4 + 4, 2 per rank
TEACHER_PRESET = dataclasses.replace(get_preset("smoke"), image_size=8,
                                     teacher=dataclasses.replace(TINY, steps=1, batch_size=8, warmup_steps=1))  # fmt: skip


def on_ranks(fn, *args, nproc: int = 2) -> None:
    distributed.spawn(fn, nproc, *args, start_method="fork")


@contextlib.contextmanager
def patched(owner, name: str, wrap):
    """owner.name replaced by wrap(original) inside the block (the one-process references run in this process)."""
    real = getattr(owner, name)
    setattr(owner, name, wrap(real))
    try:
        yield
    finally:
        setattr(owner, name, real)


@contextlib.contextmanager
def one_thread():
    """One torch thread inside the block: the ranks and the reference compute alike, and the cores are not
    oversubscribed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def recording(optimiser: type, out: list):
    """Record the gradients each step of an `optimiser` (class) is taken with."""

    def wrap(real):
        def step(self, *a, **k):
            out.append([p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None])
            return real(self, *a, **k)

        return step

    return patched(optimiser, "step", wrap)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 rounding, judged on the whole tensor: a slice's gradient and the batch's sum their terms
    in another order, and SiD's loss (a difference of two nearly equal denoisers) magnifies that to about 1e-4 of a
    gradient's norm; a wrong split or a missing average would be off by the order of the gradient itself. (The
    floor is for gradients that are zero but for rounding: biases just before a GroupNorm.)"""
    return bool((a - b).norm() <= 2e-3 * a.norm() + 1e-6)


def sfd_iteration(world, run_dir: Path, data_dir: Path, out: Path) -> None:
    grads: list = []
    with one_thread(), recording(torch.optim.Adam, grads):
        ctx = tiny_context(run_dir, data_dir)
        ctx.world = world
        model = SFD(SFD_CFG).unlearn(tiny_teacher(), ctx.forget_set, ctx)
    torch.save({"grads": grads, "weights": model.unet.state_dict()}, out / f"sfd-rank{world.rank}.pt")


def test_one_sfd_iteration_on_two_ranks_is_the_one_process_iteration(tmp_path, fmnist_dir):
    sfd_iteration(distributed.SINGLE, tmp_path / "one", fmnist_dir.parent, tmp_path)
    one = torch.load(tmp_path / "sfd-rank0.pt")
    on_ranks(sfd_iteration, tmp_path / "two", fmnist_dir.parent, tmp_path)
    r0, r1 = torch.load(tmp_path / "sfd-rank0.pt"), torch.load(tmp_path / "sfd-rank1.pt")
    assert len(one["grads"]) == len(r0["grads"]) == 2  # the fake score's step, then the generator's
    for g1, g2, ga in zip(one["grads"], r0["grads"], r1["grads"], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(g2, ga, strict=True))  # the ranks agree exactly
        assert all(close(a, b) for a, b in zip(g1, g2, strict=True))
        assert sum(a.abs().sum() for a in g1) > 0
    # Adam (beta1 0) moves most weights by lr = 1e-5 in the gradient's sign
    for k, w in one["weights"].items():
        assert torch.equal(r0["weights"][k], r1["weights"][k])
        assert torch.allclose(w, r0["weights"][k], rtol=0, atol=1e-7), k
    # rank 0 logs the losses of the global batch (the mean of the ranks' slices)
    log1 = json.loads((tmp_path / "one" / "train_log.jsonl").read_text())
    log2 = json.loads((tmp_path / "two" / "train_log.jsonl").read_text())
    assert log1.keys() == log2.keys() and log1["step"] == log2["step"] == 1
    # (a missing average would be off by 2x; summation order alone moved loss_generator by 1.04e-5 on an Intel Xeon)
    for key in ("loss_fake", "loss_generator"):
        assert log2[key] == pytest.approx(log1[key], rel=1e-4)


def teacher_step(world, data_dir: Path, out: Path) -> None:
    from bench import pretrain

    grads, losses = [], []

    def wrap(real):
        def loss(*a, **k):
            value = real(*a, **k)
            losses.append(world.all_reduce_mean([value])[0].item())  # the global batch's loss
            return value

        return loss

    ds = FashionMNIST(data_dir=data_dir, image_size=8)
    with one_thread(), recording(torch.optim.AdamW, grads), patched(pretrain, "ddpm_loss", wrap):
        model = pretrain.train_teacher(ds, TEACHER_PRESET, seed=3, device=torch.device("cpu"),
                                       state_path=out / f"state{world.size}.pt", world=world)  # fmt: skip
    torch.save({"grads": grads, "losses": losses, "weights": model.unet.state_dict()},
               out / f"teacher{world.size}-rank{world.rank}.pt")  # fmt: skip


def test_one_teacher_step_on_two_ranks_is_the_one_process_step(tmp_path, fmnist_dir):
    teacher_step(distributed.SINGLE, fmnist_dir.parent, tmp_path)
    on_ranks(teacher_step, fmnist_dir.parent, tmp_path)
    one, r0, r1 = (torch.load(tmp_path / name) for name in ("teacher1-rank0.pt", "teacher2-rank0.pt",
                                                             "teacher2-rank1.pt"))  # fmt: skip
    assert r0["losses"] == r1["losses"] and r0["losses"][0] == pytest.approx(one["losses"][0], rel=1e-5)
    (g1,), (g2,), (ga,) = one["grads"], r0["grads"], r1["grads"]
    assert all(torch.equal(a, b) for a, b in zip(g2, ga, strict=True))
    assert all(close(a, b) for a, b in zip(g1, g2, strict=True))
    for k, w in one["weights"].items():
        assert torch.equal(r0["weights"][k], r1["weights"][k])
        assert torch.allclose(w, r0["weights"][k], rtol=0, atol=1e-6), k
    assert (tmp_path / "state1.pt").is_file() and (tmp_path / "state2.pt").is_file()  # rank 0 wrote its dump


def sfd_run(world, run_dir: Path, data_dir: Path, out: Path, kill_after: int) -> None:
    torch.set_num_threads(1)
    ctx = tiny_context(run_dir, data_dir, checkpoint_every=1 if kill_after else 100)  # dumps: to be killed
    ctx.world = world
    if kill_after:
        kill_after_saves(ctx, kill_after)
    cfg = dataclasses.replace(SFD_CFG, iterations=2)
    try:
        model = SFD(cfg).unlearn(tiny_teacher(), ctx.forget_set, ctx)
    except Killed:
        return
    torch.save(model.unet.state_dict(), out / f"rank{world.rank}.pt")


def test_a_two_rank_run_resumes_after_a_kill(tmp_path, fmnist_dir):
    data = fmnist_dir.parent
    on_ranks(sfd_run, tmp_path / "straight", data, tmp_path / "straight", 0)
    on_ranks(sfd_run, tmp_path / "killed", data, tmp_path / "killed", 1)  # both stop after step 1's dump
    assert not list((tmp_path / "killed").glob("rank*.pt"))
    assert torch.load(tmp_path / "killed" / "state" / "state.pt")["step"] == 1
    on_ranks(sfd_run, tmp_path / "killed", data, tmp_path / "killed", 0)  # a fresh start: both ranks resume
    for rank in (0, 1):
        a = torch.load(tmp_path / "straight" / f"rank{rank}.pt")
        b = torch.load(tmp_path / "killed" / f"rank{rank}.pt")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = (tmp_path / "killed" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2]  # rank 0 logged each step once


def run_one_rank(world, results: list[Path], spec, data_dir: Path, out: Path) -> None:
    """Each rank with a results folder of its own: rank 1's stays empty when it writes nothing."""
    import bench.runner
    from bench import launch
    from bench.context import Runtime

    torch.set_num_threads(1)
    teacher = tiny_teacher(image_size=16)  # forked: the patch stays in this rank
    bench.runner.load_models = lambda *a, **k: (teacher, None, {"path": "tiny"})
    runtime = Runtime(data_dir=data_dir, progress=False)
    (out / f"status{world.rank}").write_text(launch.run_one(spec, results[world.rank], runtime, reraise=True))


@pytest.mark.parametrize("method", ["sfd", "original"])  # data-parallel, and run by rank 0 alone
def test_only_rank_zero_writes(tmp_path, fmnist_dir, method):
    from bench.config import RunSpec
    from bench.registry import EVALUATORS, METHODS

    EVALUATORS.get("wallclock"), METHODS.get(method)  # imported here, once, rather than in each forked rank
    spec = RunSpec(method=method, dataset="fashion-mnist", forget_set="class-0", seed=0, preset="smoke",
                   overrides=(("iterations", 2),) if method == "sfd" else (), evaluators=("wallclock",))  # fmt: skip
    results = [tmp_path / "rank0", tmp_path / "rank1"]
    on_ranks(run_one_rank, results, spec, fmnist_dir.parent, tmp_path)
    assert (tmp_path / "status0").read_text() == (tmp_path / "status1").read_text() == "done"
    d = store.run_dir(results[0], spec.run_id)
    assert store.is_done(d) and (d / "job.json").is_file() and (d / "model" / "unlearn.json").is_file()
    assert len((d / "attempts.jsonl").read_text().splitlines()) == 1
    assert json.loads((d / "env.json").read_text())["ranks"] == 2
    if method == "sfd":
        assert len((d / "train_log.jsonl").read_text().splitlines()) == 2
    assert not results[1].exists()  # rank 1 made no folder and wrote no file


def global_generators(world, run_dir: Path, data_dir: Path, out: Path) -> None:
    torch.manual_seed(distributed.rank_seed(0, world))
    ctx = tiny_context(run_dir, data_dir)
    ctx.save_state({"step": 1})  # all ranks call it; rank 0 writes every rank's global generator
    saved = torch.get_rng_state()
    torch.rand(5)
    world.barrier()  # rank 0 has written the dump (a run reads it back only at its next start)
    ctx.load_state()
    (out / f"rng{world.rank}").write_text(str(torch.equal(torch.get_rng_state(), saved)))
    torch.save(saved, out / f"state{world.rank}.pt")


def test_each_rank_resumes_its_own_dropout_stream(tmp_path, fmnist_dir):
    on_ranks(global_generators, tmp_path / "run", fmnist_dir.parent, tmp_path)
    assert (tmp_path / "rng0").read_text() == (tmp_path / "rng1").read_text() == "True"
    assert not torch.equal(torch.load(tmp_path / "state0.pt"), torch.load(tmp_path / "state1.pt"))
    assert distributed.rank_seed(7, distributed.SINGLE) == 7  # rank 0 keeps the one-process stream


def test_a_global_batch_must_split_evenly():
    world = distributed.World(rank=1, size=2)
    assert world.shard(torch.arange(6)).tolist() == [3, 4, 5]
    with pytest.raises(BenchError, match="sfd.batch_size=3 does not split into 2 equal parts"):
        world.check_batch(3, "sfd.batch_size")
    x = torch.arange(3)
    assert distributed.SINGLE.shard(x) is x and distributed.SINGLE.all_reduce_mean([x])[0] is x


def test_the_launchers_ask_for_one_task_per_rank(tmp_path):
    from bench import clusters, launch
    from bench.config import RunSpec
    from bench.context import Runtime

    assert clusters.rank_params({"gpus_per_node": 1}, 4) == {"tasks_per_node": 4, "gpus_per_node": 4}
    assert clusters.rank_params({}, 2) == {"tasks_per_node": 2}
    spec = RunSpec(method="original", dataset="fashion-mnist", forget_set="class-0", seed=0, preset="smoke")
    with pytest.raises(BenchError, match="--nproc 2 needs --launcher local or slurm"):
        launch.launch([spec], tmp_path, Runtime(progress=False, nproc=2), launcher="inline")


def test_local_workers_get_gpus_of_their_own(monkeypatch):
    from bench import launch
    from bench.context import Runtime

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert launch._local_gpus(Runtime(device="cuda", nproc=2), workers=2) == [(0, 1), (2, 3)]
    assert launch._local_gpus(Runtime(device="cuda", nproc=3), workers=2) == [(0, 1, 2), (3, 0, 1)]  # shared
    assert launch._local_gpus(Runtime(device="cpu", nproc=2), workers=2) == []
    with pytest.raises(BenchError, match="one GPU per process, and this machine has 4"):
        launch._local_gpus(Runtime(device="cuda", nproc=5), workers=1)
    with pytest.raises(BenchError, match="use --device cuda"):
        launch._local_gpus(Runtime(device="cuda:1"), workers=1)


def test_pretrain_on_slurm_asks_for_one_task_per_rank(monkeypatch, tmp_path):
    """(tests/test_slurm.py runs it on a real cluster.)"""
    from bench import prerequisites
    from bench.cli import main

    asked = {}

    def submit(cfg, folder, name, fn, kwargs, *, after=(), params=None):
        asked.update(params or {})
        raise SystemExit(0)

    monkeypatch.setattr(prerequisites, "submit_call", submit)
    with pytest.raises(SystemExit):
        main(
            [
                "pretrain",
                "--launcher",
                "slurm",
                "--cluster",
                "example-gpu",
                "--nproc",
                "4",
                "--out",
                str(tmp_path),
            ]
        )
    assert asked == {"tasks_per_node": 4, "gpus_per_node": 4}


@pytest.mark.slow
def test_local_launcher_runs_a_run_on_two_ranks(tmp_path, fmnist_dir):
    """`bench run --launcher local --nproc 2`: one submitit job of 2 tasks that join as ranks (gloo)."""
    from bench import launch
    from bench.config import RunSpec
    from bench.context import Runtime

    spec = RunSpec(method="sfd", dataset="fashion-mnist", forget_set="class-0", seed=0, preset="smoke",
                   overrides=(("iterations", 2),), evaluators=("wallclock",))  # fmt: skip
    runtime = Runtime(data_dir=fmnist_dir.parent, progress=False, nproc=2)
    launched = launch.launch([spec], tmp_path, runtime, launcher="local", workers=1, poll_s=0.2)
    d = store.run_dir(tmp_path, spec.run_id)
    assert launched.states[spec.run_id].state == "done", (d / status.ERROR).read_text()
    assert json.loads((d / "env.json").read_text())["ranks"] == 2
    assert len((d / status.ATTEMPTS).read_text().splitlines()) == 1  # rank 0 alone keeps the records
    job = launched.job_ids[0]
    logs = {p.name for p in (tmp_path / "jobs").glob(f"{job}_*_log.err")}
    assert logs == {f"{job}_0_log.err", f"{job}_1_log.err"}  # one task per rank
