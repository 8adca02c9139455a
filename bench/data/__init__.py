"""Datasets: each module registers itself in DATASETS on import; make_dataset() builds one from its CLI name."""

from __future__ import annotations

from pathlib import Path

from bench.data import celeba, cifar10, fashion_mnist, imagefolder  # noqa: F401
from bench.errors import BenchError
from bench.registry import DATASETS


def make_dataset(name: str, *, data_dir: Path | None = None, image_size: int | None = None):
    """The dataset a name on the command line means: a registered name, or `kind:PATH` (`imagefolder:PATH`)."""
    kind, sep, path = name.partition(":")
    cls = DATASETS.get(kind)
    if not getattr(cls, "takes_path", False):
        if sep:
            raise BenchError(f"dataset {kind!r} takes no path; {name!r} should be just {kind!r}")
        return cls(data_dir=data_dir, image_size=image_size)
    return cls(data_dir=data_dir, image_size=image_size, path=path or None)


def canonical_name(name: str) -> str:
    """`imagefolder:rel/path` -> `imagefolder:/abs/path`, so a run's identity does not depend on the directory."""
    kind, sep, path = name.partition(":")
    return f"{kind}:{Path(path).expanduser().resolve()}" if sep and path else name
