"""Datasets: each module registers itself in DATASETS on import; make_dataset() builds one from its CLI name."""

from __future__ import annotations

from pathlib import Path

from bench.data import celeba, cifar10, fashion_mnist, imagefolder, textfolder  # noqa: F401
from bench.errors import BenchError
from bench.registry import DATASETS


def make_dataset(name: str, *, data_dir: Path | None = None, image_size: int | None = None):
    """The dataset a name on the command line means: a registered name, or `kind:PATH` (`imagefolder:PATH`,
    `textfolder:PATH`)."""
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


ALL_CLASSES = "all-classes"  # a forget-set list entry: every single-class forget set of the dataset


def forget_set_names(ds, names: list[str]) -> list[str]:
    """`all-classes` -> class-0 .. class-(K-1) of this dataset (the others as given), so one sweep file or command
    covers every forget class of datasets with different class counts."""
    out = []
    for name in names:
        if name != ALL_CLASSES:
            out.append(name)
            continue
        try:
            ds.forget_set("class-0")
        except BenchError as e:
            raise BenchError(f"forget set {ALL_CLASSES}: dataset {ds.name} has no class-K forget sets; valid: "
                             f"{', '.join(ds.forget_sets())}") from e  # fmt: skip
        out += [f"class-{k}" for k in range(ds.num_classes)]
    return out
