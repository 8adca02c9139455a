"""Per-teacher caches in the model store (SA's replay and Fisher, SFD-Two-Stage's first stage): computed once,
written atomically with a checksum record beside them, checked on every load, shared by parallel runs.

The shipped store (bench/assets/models) holds those of the shipped teacher at the default preset, in the user
store's layout, so that the default sweep does not compute them: a cache is read from there first, and written
to the user store."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bench.errors import BenchError
from bench.files import check_file, sha256, share
from bench.models import store
from bench.store import atomic_write_text


def teacher_digest(unet: nn.Module, start: nn.Module | None = None) -> str:
    """sha256 of the teacher's weights (names and bytes), and of the weights a method starts from when they are
    others (its raw weights), so a different teacher never reuses a cache."""
    h = hashlib.sha256()
    for net in (unet,) if start is None or start is unet else (unet, start):
        for name, tensor in sorted(net.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_record(path: Path) -> Path:
    """The checksum record beside a cache file (replay-....safetensors -> replay-....safetensors.json)."""
    return path.with_name(path.name + ".json")


def read_record(path: Path) -> dict:
    """A cache file's record ({} when it has none)."""
    try:
        record = json.loads(cache_record(path).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def shipped_copy(path: Path) -> Path | None:
    """The shipped store's copy of a user-store cache path, where it ships one (None otherwise)."""
    try:
        relative = path.relative_to(store.user_store())
    except ValueError:
        return None
    shipped = store.SHIPPED / relative
    return shipped if cache_record(shipped).is_file() else None


def is_cached(path: Path) -> bool:
    """Whether the cache at `path` (a user-store path) exists, shipped or in the user store."""
    found = shipped_copy(path) or path
    return found.is_file() and cache_record(found).is_file()


def load_cached(path: Path, *, what: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """A cache file's tensors and record (its shipped copy's if there is one), checked against the sha256 recorded
    when it was written; None when there is none (or it has no record: an older version wrote it, so it is
    computed again)."""
    shipped = shipped_copy(path)
    path = shipped or path
    record = cache_record(path)
    remedy = (f"restore it (git checkout {path}), or delete it and {record.name} beside it (the next {what} run "
              "computes it again into the user store)" if shipped else
              f"delete {path} and {record.name} beside it (a cache: the next {what} run computes it again)")  # fmt: skip
    digest = read_record(path).get("sha256") if path.is_file() else None
    if not isinstance(digest, str):
        return None
    check_file(path, digest, record=record, remedy=remedy)
    try:
        return load_file(path), read_record(path)
    except Exception as e:
        raise BenchError(f"cannot load the {what} cache {path}: {e}; {remedy}") from e


def write_cached(path: Path, tensors: dict[str, torch.Tensor], *, seconds: float) -> None:
    """Write a cache file and its record (with the seconds it took to compute), the record first, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    share(tmp)  # save_file makes it 0600: unreadable for others sharing BENCH_MODEL_DIR
    atomic_write_text(cache_record(path), json.dumps({"file": path.name, "sha256": sha256(tmp),
                                                      "seconds": seconds}) + "\n")  # fmt: skip
    os.replace(tmp, path)


def cached_tensors(
    path: Path, compute: Callable[[], dict[str, torch.Tensor]], *, what: str
) -> dict[str, torch.Tensor]:
    """The cache at `path`, or `compute()` written there (parallel runs wait for one computation)."""
    with store.locked(path):
        if (found := load_cached(path, what=what)) is not None:
            return found[0]
        t0 = time.perf_counter()
        tensors = {k: v.contiguous() for k, v in compute().items()}
        write_cached(path, tensors, seconds=time.perf_counter() - t0)
    return tensors
