"""The plug-in contracts: forget sets, datasets, methods and evaluators."""

from __future__ import annotations

import hashlib
import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from bench.errors import BenchError

if TYPE_CHECKING:
    from bench.context import RunContext
    from bench.sampling import Sampler


@dataclass(frozen=True)
class ForgetSet:
    """Which conditions to forget, which to keep, and the "safe" anchor class forgotten ones map to."""

    name: str
    forget: tuple[int, ...]
    retain: tuple[int, ...]
    anchor: int

    def __post_init__(self):
        if not self.forget:
            raise BenchError(f"forget set {self.name!r} forgets nothing")
        if not self.retain:
            raise BenchError(f"forget set {self.name!r} leaves no class to retain")
        if self.anchor in self.forget:
            raise BenchError(
                f"anchor class {self.anchor} of forget set {self.name!r} is inside the forget set"
            )

    def with_anchor(self, anchor: int) -> ForgetSet:
        if anchor not in self.retain:
            raise BenchError(
                f"anchor {anchor} must be a retained class of forget set {self.name!r}: "
                f"{', '.join(map(str, self.retain))}"
            )
        return ForgetSet(self.name, self.forget, self.retain, anchor)


class Dataset(ABC):
    """A labelled image set read from local files, with forget sets over its classes."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    class_names: ClassVar[tuple[str, ...]]
    channels: ClassVar[int]
    native_size: ClassVar[int]

    def __init__(self, data_dir: Path | None = None, image_size: int | None = None):
        self.data_dir = Path(data_dir) if data_dir else None
        self.image_size = image_size or self.native_size

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def check(self) -> None:
        """Raise a BenchError naming the expected files when the data is not on disk, or the broken one; it runs
        before any run starts (datasets with a decoded-image cache may fill it here, once)."""

    @abstractmethod
    def load_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images (N, H, W, C) at native size (or already at `image_size`) and int64 labels, for split
        'train' or 'test'."""

    def images(self, split: str, classes: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images (N, C, H, W) in [-1, 1] at `image_size`, with labels, optionally of some classes."""
        x, y = _as_tensors(self, split)
        if classes is not None:
            keep = torch.isin(y, torch.tensor(classes))
            x, y = x[keep], y[keep]
        return x, y

    # Class forget sets: `class-K` and `classes-A-B-...`.
    def forget_sets(self) -> list[str]:
        return [f"class-{k}" for k in range(self.num_classes)] + ["classes-A-B-..."]

    def forget_set(self, name: str) -> ForgetSet:
        m = re.fullmatch(r"class-(\d+)|classes-(\d+(?:-\d+)+)", name)
        if not m:
            raise BenchError(
                f"unknown forget set {name!r} for dataset {self.name}; valid: class-K (K in 0..{self.num_classes - 1}) "
                "or classes-A-B-... (several classes)"
            )
        forget = tuple(sorted({int(k) for k in (m.group(1) or m.group(2)).split("-")}))
        bad = [k for k in forget if k >= self.num_classes]
        if bad:
            raise BenchError(
                f"forget set {name!r}: class {bad[0]} does not exist (0..{self.num_classes - 1})"
            )
        retain = tuple(k for k in range(self.num_classes) if k not in forget)
        if not retain:
            raise BenchError(
                f"forget set {name!r} forgets every class of {self.name}: none is left to retain"
            )
        name = (
            f"class-{forget[0]}" if len(forget) == 1 else "classes-" + "-".join(map(str, forget))
        )  # canonical
        # The default anchor is the next class after the first forgotten one that is not forgotten.
        anchor = next(
            k % self.num_classes
            for k in range(forget[0] + 1, forget[0] + self.num_classes)
            if k % self.num_classes not in forget
        )
        return ForgetSet(name, forget, retain, anchor)

    def data_files(self) -> list[Path]:
        """Every file the dataset reads, both splits (resolved now, so a missing one raises a BenchError)."""
        raise NotImplementedError(f"{type(self).__name__} does not list its files")

    def data_identity(self) -> dict[str, Any]:
        """The data a run reads: its folder, and a digest of the files' names (below it) and sizes, which enters the
        run id, so that runs on other data get other ids (recorded in spec.json, checked again by the runner)."""
        files = sorted(Path(f).resolve() for f in self.data_files())
        root = Path(os.path.commonpath(files)) if files else Path()
        root = root.parent if root in files else root
        h = hashlib.sha256()
        total = 0
        for f in files:
            size = f.stat().st_size
            total += size
            h.update(f"{f.relative_to(root)}\0{size}\n".encode())
        return {"root": str(root), "files": len(files), "bytes": total, "digest": h.hexdigest()[:16]}

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "image_size": self.image_size,
            "channels": self.channels,
            "classes": list(self.class_names),
        }


_TENSORS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _as_tensors(dataset: Dataset, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    # Keyed by what determines the tensors, so two Dataset objects for the same files share one copy: the folder
    # named by --data-dir, else the BENCH_DATA_DIR of the moment (a dataset object made before it changed must not
    # serve the other folder's images), and an image folder's own path.
    folder = dataset.data_dir or os.environ.get("BENCH_DATA_DIR")
    key = (type(dataset).__name__, dataset.name, str(folder), str(getattr(dataset, "root", None)),
           dataset.image_size, split)  # fmt: skip
    if key not in _TENSORS:
        arr, labels = dataset.load_split(split)
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        if x.shape[-1] != dataset.image_size:
            x = torch.nn.functional.interpolate(
                x, size=dataset.image_size, mode="bilinear", antialias=True, align_corners=False
            ).clamp_(-1, 1)
        _TENSORS[key] = (x, torch.from_numpy(labels).long())
    return _TENSORS[key]


@dataclass(frozen=True)
class Scaled:
    """How a preset scales a method's paper defaults, and why."""

    overrides: dict[str, Any]
    why: str


class Method(ABC):
    """An unlearning algorithm: turns the teacher and a forget set into a sampler."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    paper: ClassVar[str]
    Config: ClassVar[type]
    requires: ClassVar[frozenset[str]] = frozenset()  # real data it reads: {"forget", "retain"}
    scaled: ClassVar[dict[str, Scaled]] = {}  # preset name -> budget scaling
    oracle: ClassVar[bool] = False
    default_sweep: ClassVar[bool] = True  # False: `bench run` without --methods leaves it out (budget)
    # The teacher weights the official code starts from: "ema" (the sampling weights), or "raw" (SA and SalUn load
    # the checkpoint's states[0]) where the teacher keeps them (start_weights).
    starts_from: ClassVar[str] = "ema"
    # Whether unlearn() splits its global batch over the ranks of a multi-process run (ctx.world, see
    # bench/distributed.py); a method that does not is run by rank 0 alone.
    data_parallel: ClassVar[bool] = False
    # Why `--budget-s` cannot run it ('' = it can: its `iterations` stop it; bench/budget.py).
    not_budgeted: ClassVar[str] = ""
    # The conditioning it edits: "class" (a class-conditional UNet2DModel) or "text" (the text tier's
    # UNet2DConditionModel and its prompts, bench/text/), or "any". `bench run` pairs methods with datasets of
    # their tier.
    tier: ClassVar[str] = "class"
    # Whether it also runs on a Stable Diffusion folder as the text teacher (--teacher DIR, bench/text/
    # stable_diffusion.py): it must read no images (they would need the VAE) and sample only through the model.
    stable_diffusion: ClassVar[bool] = False

    def __init__(self, config):
        self.config = config

    def validate(self, forget_set: ForgetSet) -> None:
        """Raise a BenchError when the config cannot run on this forget set (checked before any run starts)."""

    @abstractmethod
    def unlearn(self, teacher: Sampler, forget_set: ForgetSet, ctx: RunContext) -> Sampler:
        """Return the unlearned model; everything outside the model comes through ctx."""

    def start_weights(self, teacher: Sampler) -> Sampler:
        """The teacher as the method starts from it: its raw weights when the method's official code starts there
        and the teacher has them, else its EMA weights (recorded in the run's spec.json)."""
        return teacher.raw if self.starts_from == "raw" and teacher.raw is not None else teacher

    def anchors(self, forget_set: ForgetSet) -> tuple[int, ...]:
        """The classes this method sends forgotten conditions to, which `to_anchor[forget]` scores against: the
        forget set's anchor unless the method's config picks others (SFD's `anchor`, SalUn's `relabel`)."""
        return (forget_set.anchor,)

    def prepared(self, teacher: Sampler) -> bool:
        """Whether what the method caches per teacher (SA's replay and Fisher) is in the model store already."""
        return True

    def prepare(self, teacher: Sampler, ctx: RunContext) -> None:
        """Compute and cache it: on SLURM a job of its own does this once before the runs that need it (which then
        load it from the cache), so no array task waits on another's lock."""

    @classmethod
    def card(cls) -> dict[str, Any]:
        return {
            "name": cls.name,
            "paper": cls.paper,
            "requires": sorted(cls.requires),
            "oracle": cls.oracle,
            "defaults": {f.name: (f.default, f.metadata.get("source", "")) for f in fields(cls.Config)},
            "valid": {f.name: _valid_text(f.metadata.get("valid")) for f in fields(cls.Config)},
            "scaled": {k: {"overrides": v.overrides, "why": v.why} for k, v in cls.scaled.items()},
        }


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric Config field, checked before any run starts (bench.config.validate_config)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # the bound itself is excluded
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def __str__(self) -> str:
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{lo}, {hi}{')' if self.high_open or self.high is None else ']'}"


POSITIVE = Range(0, None, low_open=True)  # learning rates, batch sizes, iteration counts
NON_NEGATIVE = Range(0)  # loss weights, clipping thresholds (0 = off where the method says so)
FRACTION = Range(0, 1)  # probabilities and ratios
DECAY = Range(0, 1, high_open=True)  # EMA decay and Adam betas: 1 would never move
TIMESTEP = Range(0, 999)  # a DDPM timestep (an index) of the T = 1000 schedule every teacher uses


def _valid_text(valid: Range | tuple[str, ...] | None) -> str:
    if isinstance(valid, tuple):
        return " | ".join(valid)
    return "" if valid is None else str(valid)


def param(default, source: str, valid: Range | tuple[str, ...] | None = None):
    """A Config field whose default carries where it comes from (paper section or official config) and its valid
    values: a Range for numbers (required: bench.config.validate_config checks it), choices for strings (None: the
    method's validate() checks it)."""
    return field(default=default, metadata={"source": source, "valid": valid})


TRAIN_KIND = "train"  # the text tier's training prompts (bench.text.captions prompt kinds)


@dataclass
class SampleSet:
    """Generated images of the fixed evaluation grid, with what the runner measured while making them."""

    images: torch.Tensor  # (N, C, H, W) in [-1, 1]
    labels: torch.Tensor  # conditioning class of each image
    nfe: int  # network evaluations per image
    sample_s: float
    unlearn_s: float
    peak_mem_mb: float
    # The text tier's prompt kind of each image (bench.text.captions: "train", "paraphrase"); None: class labels.
    kinds: list[str] | None = None
    prompts: list[str] | None = None  # the text tier's prompt of each image

    def by_kind(self) -> dict[str, torch.Tensor]:
        """The images per prompt kind, in grid order ({"": all of them} without kinds)."""
        if self.kinds is None:
            return {"": self.images}
        kinds = np.array(self.kinds)
        return {k: self.images[torch.from_numpy(kinds == k)] for k in dict.fromkeys(self.kinds)}

    def of_kind(self, kind: str = TRAIN_KIND) -> SampleSet:
        """The images of one prompt kind (all of them without kinds): what a class-tier metric reads on the text
        tier is its training prompts' images."""
        if self.kinds is None:
            return self
        keep = np.array(self.kinds) == kind
        prompts = None if self.prompts is None else [p for p, k in zip(self.prompts, keep, strict=True) if k]
        keep = torch.from_numpy(keep)
        return SampleSet(self.images[keep], self.labels[keep], self.nfe, self.sample_s, self.unlearn_s,
                         self.peak_mem_mb, [kind] * int(keep.sum()), prompts)  # fmt: skip


@dataclass(frozen=True)
class Metric:
    name: str
    subset: str
    higher_is_better: bool
    unit: str = ""

    @property
    def key(self) -> str:
        return f"{self.name}[{self.subset}]"


@dataclass(frozen=True)
class Measurement:
    """One metric's value with what the report needs to judge it: its 95% interval and how it was computed (none
    for a figure measured once, like seconds), and the outcomes a paired test across methods reads: one per image
    of the metric's subset in grid order (image i of class c has the same noise in every method), or one per
    bootstrap resample of a statistic that is not a mean over images (bench.stats)."""

    metric: Metric
    value: float
    n: int
    ci: tuple[float, float] | None = None
    ci_method: str = ""  # e.g. "wilson", "bootstrap-1000"
    outcomes: torch.Tensor | np.ndarray | None = None
    test: str = ""  # the paired test the outcomes are for: bench.stats.MCNEMAR, WILCOXON or BOOTSTRAP

    @classmethod
    def of(cls, item: Measurement | tuple) -> Measurement:
        """An evaluator's item as a Measurement: a plain (metric, value, n) has no interval."""
        return item if isinstance(item, Measurement) else cls(*item)

    def __iter__(self):
        """Unpacks as (metric, value, n), as evaluators' items did before intervals, for callers that read those."""
        return iter((self.metric, self.value, self.n))


class Evaluator(ABC):
    """Turns samples into metric rows; it sees samples and the dataset, never the method."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    metrics: ClassVar[tuple[Metric, ...]]
    # A user option it cannot run without (e.g. "clip_model"); without it, it is not among the default evaluators.
    needs: ClassVar[str] = ""
    # The tiers (Method.tier's names) whose model store ships what `needs` names: a default evaluator there.
    shipped_for: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def resolve_options(cls, given: dict[str, Any], tier: str = "class") -> dict[str, str]:
        """The options (EvalContext.options) it will read on datasets of `tier`, from the user's (None when
        unset); checked before any run starts, raising a BenchError when unusable. They are part of the run's
        identity."""
        return {}

    @abstractmethod
    def __call__(self, samples: SampleSet, ctx: EvalContext) -> list[Measurement | tuple[Metric, float, int]]:
        """A Measurement, or plainly (metric, value, n), for each metric; a value that cannot be computed raises."""

    def row_fields(self, ctx: EvalContext) -> dict[str, Any]:
        """Columns every row of this evaluator carries besides the tidy ones (e.g. the FID's reference set)."""
        return {}


@dataclass
class EvalContext:
    dataset: Dataset
    forget_set: ForgetSet
    judge: torch.nn.Module
    device: torch.device
    options: dict[str, Any] = field(default_factory=dict)
    anchors: tuple[
        int, ...
    ] = ()  # where the method sent the forgotten classes (Method.anchors); () = the default
    # Where an evaluator finds the store's models of this run (bench.models.store): its recipe's key and seed.
    model_key: str = ""
    seed: int = 0

    @property
    def anchor_classes(self) -> tuple[int, ...]:
        return self.anchors or (self.forget_set.anchor,)
