"""Files the harness writes and later trusts: sha256 checksums recorded at write time and checked at load, and the
mode of the weight files it writes (safetensors creates them 0600, whatever the umask)."""

from __future__ import annotations

import fnmatch
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from bench.errors import BenchError


def sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share(path: Path) -> None:
    """Give a file the mode open() would have given it (0o666 & ~umask), or every file under a folder.

    safetensors' save_file (and so save_pretrained) creates 0600 files, which a teammate sharing BENCH_MODEL_DIR or
    a results folder cannot read; call this after each of them.
    """
    path = Path(path)
    mode = 0o666 & ~current_umask()
    for p in sorted(path.rglob("*")) if path.is_dir() else (path,):
        if p.is_file() and not p.is_symlink():
            os.chmod(p, mode)


def digests(directory: Path, *, exclude: Iterable[str] = ()) -> dict[str, str]:
    """{relative path: sha256} of every file under `directory`, except those matching a pattern of `exclude`."""
    directory, patterns = Path(directory), tuple(exclude)
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return {
        rel: sha256(p) for p in files if not matches(rel := p.relative_to(directory).as_posix(), patterns)
    }


def check_file(path: Path, digest: str, *, record: Path, remedy: str) -> None:
    """A BenchError naming `path` when it is missing or its sha256 is not `digest` (recorded in `record`)."""
    if not Path(path).is_file():
        raise BenchError(f"{path} is missing (its checksum is recorded in {record}): {remedy}")
    if sha256(path) != digest:
        raise BenchError(
            f"{path} does not match its checksum in {record}: truncated or modified since it was written; {remedy}"
        )


def matches(rel: str, patterns: Iterable[str]) -> bool:
    """Whether a relative path matches a glob pattern: one without "/" matches the file name, one with "/" the path."""
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(rel if "/" in pat else name, pat) for pat in patterns)


def unlisted(directory: Path, recorded: dict, allow: Iterable[str] = ()) -> list[Path]:
    """Files under `directory` that are neither in `recorded` (relative paths) nor match a pattern of `allow`."""
    directory, patterns = Path(directory), tuple(allow)
    files = (p for p in sorted(directory.rglob("*")) if p.is_file())
    return [p for p in files if (rel := p.relative_to(directory).as_posix()) not in recorded
            and not matches(rel, patterns)]  # fmt: skip


def check_digests(directory: Path, recorded: object, *, record: Path, remedy: str,
                  allow: Iterable[str] = ()) -> None:  # fmt: skip
    """Every file under `directory` is one of `recorded` ({relative path: sha256}) with that checksum, or matches a
    pattern of `allow` (the record itself, lock files); a missing, changed or unlisted file raises a BenchError
    naming it."""
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        raise BenchError(
            f"{record} records no file checksums (written by an older version, or edited): {remedy}"
        )
    for rel, digest in recorded.items():
        check_file(Path(directory) / rel, digest, record=record, remedy=remedy)
    for p in unlisted(directory, recorded, allow):
        raise BenchError(
            f"{p} is not listed in {record}: the harness did not write it there, and it is not checked; {remedy}"
        )
