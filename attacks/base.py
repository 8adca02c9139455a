"""The attack contract: an evaluator of a new kind that gets a run's saved model and only the real data its threat
model allows, never the method, and returns tidy findings (metric, value, n, plus the attack's parameters).

Attacks ask whether the forgotten class is erased or only hidden: they try to bring it back (fine-tuning, a new
class embedding, partial denoising, other sampling conditions) and measure how often the judge recognises it.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn

from bench.api import Metric, Scaled
from bench.context import RunContext
from bench.errors import BenchError
from bench.models.judge import judge_probs
from bench.presets import Preset
from bench.sampling import Sampler

ONE_STEP = "one-step"
PROBE_SEED = 7_000_003  # probe grids use seeds of their own, not the evaluation grid's
EXEMPLAR = 0.9  # the judge's probability of its class an attacker's chosen image has (AttackContext.choose)


@dataclass(frozen=True)
class Finding:
    """One row's payload: the runner adds the run's columns and the attack's name, version and threat model."""

    metric: Metric
    value: float
    n: int
    # The attack's parameters for this row: k, steps, w, t ...
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class AttackContext:
    """What an attack may use: the run's seeds, its resumable state and the real data its threat model allows
    (`run.data`, checked against `requires`), the judge, the preset's sampler, and the untouched teacher as a
    reference the metrics are read against (steps-to-relearn's threshold, the teacher's null-class rate): the
    attack never fine-tunes or samples the teacher in place of the model it attacks."""

    run: RunContext
    judge: nn.Module
    teacher: Sampler
    preset: Preset
    _cache: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.run.device

    @property
    def amp(self) -> bool:
        return self.run.amp

    @property
    def forget(self) -> tuple[int, ...]:
        return self.run.forget_set.forget

    def data(self, which: str, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        return self.run.data(which, split)

    def seeded(self, name: str) -> torch.Generator:
        """A fresh CPU generator from the run's seed and `name` alone: the same for every method of a seed, and
        not part of any state dump, so a resumed attack draws the same choices again."""
        sub = int(hashlib.sha256(f"{self.run.seed}/attack/{name}".encode()).hexdigest()[:15], 16)
        return torch.Generator().manual_seed(sub)

    def probe_grid(
        self, per_class: int, classes: tuple[int, ...] | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """Labels and per-image seeds of a probe grid: image j of class c has the same seed in every method."""
        classes = self.forget if classes is None else classes
        labels = torch.tensor(classes).repeat_interleave(per_class)
        seeds = [PROBE_SEED + self.run.seed * 10_000_019 + int(c) * 100_003 + j
                 for c in classes for j in range(per_class)]  # fmt: skip
        return labels, seeds

    def sample(self, model: Sampler, labels: torch.Tensor | list[str], seeds: list[int], *,
               guidance: float | None = None):  # fmt: skip
        """Images from `model` with the preset's sampler (its steps and eta; its attack guidance unless given), of
        class labels, or of prompts on the text tier."""
        p = self.preset
        w = p.attack_guidance if guidance is None else guidance
        return model.sample(labels, seeds, steps=p.attack_sampler_steps, guidance=w, eta=p.eta, device=self.device,
                            amp=self.amp)  # fmt: skip

    def judged(self, images: torch.Tensor) -> torch.Tensor:
        """The judge's label of each image."""
        return judge_probs(self.judge, images, device=self.device).argmax(-1)

    def hits(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Whether the judge recognises each image as the class it stands for (bool per image)."""
        return self.judged(images) == labels

    def choose(self, x: torch.Tensor, y: torch.Tensor, k: int, name: str, *, exemplars: bool) -> torch.Tensor:
        """(forgotten classes, k) indices: the first k of one seeded permutation of each class's images, the same
        for every method of a seed (so the k = 1 image is among the k = 5). `exemplars`: among the images the
        judge gives their class with probability EXEMPLAR or more, as an attacker picks clear examples: relearning
        an image the judge finds ambiguous (a dark T-shirt it calls a shirt half the time) lowers forget accuracy
        for the judge's reasons, not the model's."""
        g = self.seeded(name)
        if exemplars:
            usable = (
                judge_probs(self.judge, x, device=self.device).gather(1, y[:, None]).squeeze(1) >= EXEMPLAR
            )
        else:
            usable = torch.ones(len(y), dtype=torch.bool)
        picks = []
        for c in self.forget:
            idx = ((y == c) & usable).nonzero().flatten()
            if len(idx) < k:
                raise BenchError(f"the attack needs {k} images of class {c}{' the judge is sure of' * exemplars} "
                                 f"and the data has {len(idx)}")  # fmt: skip
            picks.append(idx[torch.randperm(len(idx), generator=g)[:k]])
        return torch.stack(picks)

    def teacher_figure(self, key: str, compute) -> Any:
        """A reference figure of the untouched teacher, computed once per run and shared by the attacks."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]


class Resume:
    """Finished units (one k, one w, ...) and the unit in progress, dumped through the run context after every
    probe, so a killed attack resumes where its last dump left it and ends with the same rows."""

    def __init__(self, run: RunContext):
        self.run = run
        self.state = run.load_state() or {"units": {}}

    def finished(self, unit: str) -> list[dict] | None:
        return self.state["units"].get(unit)

    def current(self, unit: str) -> dict | None:
        cur = self.state.get("current")
        return cur if cur is not None and cur.get("unit") == unit else None

    def checkpoint(self, unit: str, **state) -> None:
        self.state["current"] = {"unit": unit, **state}
        self.run.save_state(self.state)

    def finish(self, unit: str, rows: list[dict]) -> list[dict]:
        self.state["units"][unit] = rows
        self.state.pop("current", None)
        self.run.save_state(self.state)
        return rows


def rate(hits: torch.Tensor) -> float:
    """The exact fraction k / n of a boolean tensor (not a float32 mean)."""
    return int(hits.sum()) / len(hits)


def as_record(f: Finding) -> dict:
    """A finding as plain data (what a state dump may hold: torch.load reads it with weights_only)."""
    m = f.metric
    return {"metric": m.name, "subset": m.subset, "higher_is_better": m.higher_is_better, "unit": m.unit,
            "value": float(f.value), "n": int(f.n), "params": dict(f.params)}  # fmt: skip


def from_record(r: dict) -> Finding:
    return Finding(Metric(r["metric"], r["subset"], r["higher_is_better"], r["unit"]), r["value"], r["n"],
                   dict(r["params"]))  # fmt: skip


class Attack(ABC):
    """An attack on a finished run's model. Its card states the threat model (what the attacker holds), the
    sources it follows, and how it applies to one-step generators; `applies` says when it does not (then it
    writes no row: nothing is made up)."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    title: ClassVar[str]
    threat: ClassVar[str]  # what the attacker holds
    requires: ClassVar[frozenset[str]] = frozenset()  # real data it reads: {"forget"}, {"retain"}
    tier: ClassVar[str] = "class"  # the runs it attacks: the class tier's or the text tier's (bench/text)
    sources: ClassVar[str]
    # How it applies to one-step generators (SFD, SiD), and why that is the honest analogue.
    one_step: ClassVar[str]
    Config: ClassVar[type]
    scaled: ClassVar[dict[str, Scaled]] = {}
    metrics: ClassVar[tuple[Metric, ...]]

    def __init__(self, config):
        self.config = config

    def applies(self, model: Sampler) -> str:
        """'' when the attack applies to this model, else why not (recorded; no row is written)."""
        return ""

    def not_applicable(self, model: Sampler) -> dict[str, str]:
        """Parts of the attack that do not apply to this model (e.g. guidance scales of a one-step generator):
        part -> why; they are recorded and get no row."""
        return {}

    @abstractmethod
    def run(self, model: Sampler, ctx: AttackContext, resume: Resume) -> list[Finding]:
        """Findings for this model; a value that cannot be computed raises."""

    @classmethod
    def card(cls) -> dict[str, Any]:
        return {
            "name": cls.name,
            "title": cls.title,
            "threat": cls.threat,
            "requires": sorted(cls.requires),
            "sources": cls.sources,
            "one_step": cls.one_step,
            "defaults": {f.name: (f.default, f.metadata.get("source", "")) for f in fields(cls.Config)},
            "scaled": {k: {"overrides": v.overrides, "why": v.why} for k, v in cls.scaled.items()},
            "metrics": [f"{m.name}[{m.subset}]" for m in cls.metrics],
        }


def same_kind(model: Sampler, unet: nn.Module) -> Sampler:
    """A sampler of the model's kind (and settings) around another network: the attacked copy."""
    settings = {k: v for k, v in model.settings().items() if k != "kind"}
    return type(model)(unet, **settings)
