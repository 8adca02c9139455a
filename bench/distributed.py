"""Data-parallel execution of one run over several processes (ranks) with torch.distributed.

Every rank draws the same global batch from the same seeded generators (RunContext's generators are derived
from the run seed, so they agree across ranks) and computes on its contiguous slice of it (`World.shard`). The
losses are batch means over equal slices, so the mean of the ranks' gradients (`World.average_gradients`) is
the gradient of the global batch, and every rank takes the same optimiser step from the same weights: the
random streams, and so the experiment, do not depend on the number of ranks, only the split of the work.

The ranks come from the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, as torchrun and
submitit's `TorchDistributedEnvironment().export()` set them); `init` joins their process group (NCCL on
GPUs, gloo on CPUs). On one process the `World` is `SINGLE` and every call returns its input unchanged, so the
code paths are the same on one rank and on many, and a one-rank run computes exactly what it did before.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from bench.errors import BenchError


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a run; `SINGLE` when it runs alone."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    # Where the collectives run: the rank's GPU under NCCL, the CPU under gloo.
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that writes (results, logs, state dumps, models)."""
        return self.rank == 0

    def check_batch(self, n: int, what: str) -> None:
        """Refuse a global batch that does not split into equal slices (unequal slices would weight the ranks'
        gradients unequally, and the run would no longer be the one-process experiment)."""
        if n % self.size:
            raise BenchError(f"{what}={n} does not split into {self.size} equal parts, one per rank: choose a "
                             f"multiple of {self.size} or another number of processes (--nproc)")  # fmt: skip

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch (dimension 0); the batch itself on one rank."""
        if self.size == 1:
            return x
        self.check_batch(len(x), "the global batch")
        k = len(x) // self.size
        return x[self.rank * k : (self.rank + 1) * k]

    def all_reduce_mean(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The mean over ranks of each tensor (detached, in float64 while reduced); the tensors on one rank."""
        if self.size == 1:
            return list(tensors)
        flat = torch.cat([t.detach().reshape(-1).to(self.device, torch.float64) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.size
        out, i = [], 0
        for t in tensors:
            out.append(flat[i : i + t.numel()].view(t.shape).to(t.device, t.dtype))
            i += t.numel()
        return out

    def average_gradients(self, module: nn.Module) -> None:
        """Replace the .grad of every parameter of `module` by its mean over ranks (one all-reduce of one flat
        buffer): the global batch's gradient when each rank's loss is the mean over its equal slice."""
        if self.size == 1:
            return
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1).to(self.device) for g in grads])
        dist.all_reduce(flat)
        flat /= self.size
        i = 0
        for g in grads:
            g.copy_(flat[i : i + g.numel()].view(g.shape))
            i += g.numel()

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def pack(self, value):
        """Every rank's `value` as a list, on every rank (a collective: all ranks call it); the value itself on one
        rank. For what differs between ranks and must survive a resume: torch's global generators."""
        if self.size == 1:
            return value
        out = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def unpack(self, packed):
        """This rank's entry of what `pack` gave (None when it has none: resumed on more ranks, or a one-rank
        value on a rank other than 0)."""
        if isinstance(packed, list):
            return packed[self.rank] if self.rank < len(packed) else None
        return packed if self.rank == 0 else None

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (a small picklable value, e.g. a decision)."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]


def rank_seed(seed: int, world: World) -> int:
    """The seed of torch's global generators (which UNet dropout draws from) on this rank: the run's own on rank 0,
    one derived from it on each other rank, so that the ranks draw independent dropout masks for their slices (the
    official DDP code seeds rank r's CUDA generator with seed + r)."""
    if world.rank == 0:
        return seed
    return int(hashlib.sha256(f"{seed}/rank{world.rank}".encode()).hexdigest()[:15], 16)


SINGLE = World()
_current = SINGLE


def current() -> World:
    """The world `init` joined in this process (SINGLE before, or when the environment names one rank)."""
    return _current


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: str | torch.device = "cpu") -> World:
    """Join the process group the environment describes, when it has several ranks, and return this rank's World.

    On CUDA each rank takes GPU `LOCAL_RANK` of those it sees (modulo their number, for clusters that bind one
    GPU per task) as its current device, and the collectives run on NCCL; on the CPU they run on gloo.
    """
    global _current
    size = env_world_size()
    if size == 1:
        _current = SINGLE
        return _current
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchError(f"--device {device}: CUDA is not available to rank {rank}")
        dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=size)
    _current = World(rank=rank, size=size, local_rank=local, device=dev)
    return _current


def init_job(device: str | torch.device = "cpu") -> World:
    """The world of this process: the one `init` joined already, else, in a submitit job of several tasks (SLURM's
    tasks_per_node, or the LocalExecutor's), those tasks, exported as torch.distributed's environment by
    `submitit.helpers.TorchDistributedEnvironment` and joined; else what the environment says (torchrun), or
    SINGLE."""
    if dist.is_initialized():
        return _current
    import submitit

    try:
        tasks = submitit.JobEnvironment().num_tasks
    except RuntimeError:  # not in a submitit job
        tasks = 1
    if tasks > 1:
        # Each rank picks its GPU by LOCAL_RANK among those the job sees (init), so CUDA_VISIBLE_DEVICES stays.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return init(device)


def shutdown() -> None:
    """Leave the process group (if any); the process is SINGLE again."""
    global _current
    if dist.is_initialized():
        dist.destroy_process_group()
    _current = SINGLE


def rank_device(device: str, world: World) -> str:
    """The run's --device as seen by this rank: its own GPU under several ranks."""
    if world.size > 1 and torch.device(device).type == "cuda":
        return str(world.device)
    return device


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn: Callable[..., object], nproc: int, *args, device: str = "cpu", start_method: str = "spawn"):
    """Run fn(world, *args) in `nproc` local processes that form one world (MASTER_ADDR 127.0.0.1, a free port)
    and return rank 0's result (picklable); when one of them raises, the others are ended and this raises."""
    import pickle
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="bench-spawn-") as tmp:
        result = Path(tmp) / "rank0.pkl"
        mp.start_processes(_entry, args=(fn, nproc, free_port(), str(device), str(result), args), nprocs=nproc,
                           start_method=start_method)  # fmt: skip
        return pickle.loads(result.read_bytes())


def _entry(rank: int, fn, nproc: int, port: int, device: str, result: str, args) -> None:
    import pickle

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(nproc),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc))  # fmt: skip
    world = init(device)
    try:
        out = fn(world, *args)
    finally:
        shutdown()
    if rank == 0:
        Path(result).write_bytes(pickle.dumps(out))
