"""RunContext: a method's only window on the world (device, seeds, progress, logs, resume, data)."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from bench import distributed
from bench.api import Dataset, ForgetSet
from bench.errors import BenchError
from bench.presets import Preset
from bench.store import atomic_write_text
from bench.training import global_rng_state, load_state, save_state, set_global_rng_state

if TYPE_CHECKING:
    from bench.sampling import Sampler

# A probe looks at the model being trained: (step, unlearning seconds so far, the model as a sampler).
Probe = Callable[[int, float, "Sampler"], None]


@dataclass
class Runtime:
    """Where and how runs execute; none of it changes what a run computes, so none of it is in the run id."""

    device: str = "cpu"
    amp: bool = False  # bf16 autocast
    data_dir: Path | None = None
    checkpoint_every: int = 50  # steps between state dumps
    # Processes (ranks) per run for the local and slurm launchers: data-parallel over them (bench/distributed.py),
    # the same experiment as on one.
    nproc: int = 1
    progress: bool = True
    # Benchmarks (time to forget) watch training: `probe` is called every `probe_every` steps. It samples with its
    # own seeds and restores train mode, so it changes nothing a run computes, and its time is not unlearning time.
    probe: Probe | None = None
    probe_every: int = 0

    def check(self) -> None:
        """Fail early on an unavailable device."""
        _ = self.torch_device

    @property
    def torch_device(self) -> torch.device:
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise BenchError(f"--device {self.device!r}: expected cpu, cuda or cuda:N") from None
        if device.type not in ("cpu", "cuda"):
            raise BenchError(f"--device {self.device!r}: expected cpu, cuda or cuda:N")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BenchError(
                f"--device {self.device}: CUDA is not available on this machine; use --device cpu"
            )
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise BenchError(
                f"--device {self.device}: this machine has {torch.cuda.device_count()} CUDA devices"
            )
        return device


@dataclass
class RunContext:
    """Seeds, progress, scalar logs, state dumps for resume, and the real data a method `requires`."""

    run_dir: Path
    seed: int
    preset: Preset
    dataset: Dataset
    forget_set: ForgetSet
    requires: frozenset[str]
    runtime: Runtime = field(default_factory=Runtime)
    _generators: dict[str, torch.Generator] = field(default_factory=dict)
    _started: float = field(default_factory=time.perf_counter)
    elapsed_before: float = 0.0  # unlearning seconds spent in earlier, interrupted attempts
    # This attempt's seconds in the harness's services (logs, state dumps, data) and in probes (not in elapsed()).
    service_s: float = 0.0
    probe_s: float = 0.0
    # This process's rank among the run's data-parallel processes (bench/distributed.py): only rank 0 writes.
    world: distributed.World = field(default_factory=distributed.current)
    # What the method took from a cache instead of computing it (a stored oracle, sid's stage 1): {what, path, seconds it took
    # when it was computed}; the run's unlearning seconds are this run's own, and its rows say what was reused.
    reused: dict | None = None

    @property
    def device(self) -> torch.device:
        return self.runtime.torch_device

    @property
    def amp(self) -> bool:
        return self.runtime.amp

    def generator(self, name: str) -> torch.Generator:
        """A CPU generator derived from the run seed and `name`; its state is part of every state dump."""
        if name not in self._generators:
            sub = int(hashlib.sha256(f"{self.seed}/{name}".encode()).hexdigest()[:15], 16)
            self._generators[name] = torch.Generator().manual_seed(sub)
        return self._generators[name]

    def progress(self, total: int, desc: str, initial: int = 0):
        return tqdm(total=total, initial=initial, desc=desc, unit="step", mininterval=2,
                    disable=not self.runtime.progress or not self.world.is_main, leave=False)  # fmt: skip

    @contextmanager
    def _service(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.service_s += time.perf_counter() - t0

    def log(self, step: int, **scalars: float) -> None:
        if not self.world.is_main:
            return
        with self._service(), open(self.run_dir / "train_log.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}) + "\n")

    def probe(self, step: int, model: Callable[[], Sampler]) -> None:
        """Show the model after `step` to the runtime's probe, if any (`model` builds the sampler only then)."""
        every = self.runtime.probe_every
        if self.runtime.probe is None or every <= 0 or step % every or not self.world.is_main:
            return
        if self.device.type == "cuda":  # the clock must include the work queued on the GPU
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        sampler = model()
        training = sampler.unet.training
        self.runtime.probe(step, self.elapsed(), sampler)
        sampler.unet.train(training)
        self.probe_s += time.perf_counter() - t0

    # Resume: a method dumps its state every `checkpoint_every` steps and loads it at the start.
    @property
    def state_path(self) -> Path:
        return self.run_dir / "state" / "state.pt"

    def should_save(self, step: int) -> bool:
        return step % self.runtime.checkpoint_every == 0

    def save_state(self, state: dict) -> None:
        """Dump a resumable state (rank 0 writes it; the ranks hold the same state, and all read it back)."""
        global_rng = self.world.pack(global_rng_state())  # each rank's (its own dropout masks)
        if not self.world.is_main:
            return
        with self._service():
            extra = {"_generators": {k: g.get_state() for k, g in self._generators.items()},
                     "_elapsed": self.elapsed(), "_global_rng": global_rng}  # fmt: skip
            save_state(self.state_path, {**state, **extra})

    def clear_state(self) -> None:
        """Delete the state dumps (a method whose next stage must not resume from this stage's last dump)."""
        if self.world.is_main:
            shutil.rmtree(self.state_path.parent, ignore_errors=True)
        self.world.barrier()

    def load_state(self) -> dict | None:
        """The last dumped state (restoring the generators), or None on a fresh start. The scalar log is cut back
        to the step the training resumes from, so an interrupted attempt's later steps are not logged twice."""
        if not self.state_path.is_file():
            self._truncate_log(0)
            return None
        with self._service():
            state = load_state(self.state_path, remedy=(
                f"delete the folder {self.state_path.parent} to unlearn again from the first step, or rerun the "
                "run with --force (replaces the whole run)"))  # fmt: skip
        for name, s in state.pop("_generators").items():
            self.generator(name).set_state(s)
        set_global_rng_state(self.world.unpack(state.pop("_global_rng", None)))
        self.elapsed_before = state.pop("_elapsed")
        self._started, self.probe_s = time.perf_counter(), 0.0
        if isinstance(state.get("step"), int):  # methods log step k after k steps, and dump "step": k
            self._truncate_log(state["step"])
        return state

    def _truncate_log(self, step: int) -> None:
        path = self.run_dir / "train_log.jsonl"
        if not self.world.is_main or not path.is_file():
            return
        kept = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                break  # a line cut by the interruption, and everything after it
        atomic_write_text(path, "".join(kept))

    def reuse(self, what: str, path: Path, seconds: float) -> None:
        """Record that `what` came from the cache at `path` (it took `seconds` when it was computed)."""
        self.reused = {"what": what, "path": str(path), "seconds": float(seconds)}

    def elapsed(self) -> float:
        """Unlearning seconds over all attempts (probes excluded)."""
        return self.elapsed_before + time.perf_counter() - self._started - self.probe_s

    def data(self, which: str, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """Real images of the forgotten ('forget') or retained ('retain') classes, if the method requires them."""
        if which not in self.requires:
            raise BenchError(
                f"this method declares requires={sorted(self.requires)} but asked for {which!r} data"
            )
        classes = self.forget_set.forget if which == "forget" else self.forget_set.retain
        with self._service():
            return self.dataset.images(split, classes)
