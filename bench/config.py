"""Run specifications: what one run is, its stable id, and typed `--set method.field=value` overrides."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.errors import BenchError

SCHEMA_VERSION = 1
# A setting of every method that has learning rates: multiplies each of them (`lr`, `lr_fake`, `lr_generator`, ...)
# after the preset's scaling, so one sweep key scales SFD's two rates together (issue 15.5: sensitivity tables).
LR_SCALE = "lr_scale"
# `all.FIELD` in --set or a sweep file's [set]: that field of every method in the sweep that has it.
ALL = "all"
# The run option (RunSpec.options) naming the local CLIP folder of a zero-shot judge (--judge clip, the text tier).
JUDGE_CLIP = "judge_clip"


@dataclass(frozen=True)
class _Setting:
    """The part of a Config field that --set parsing reads, for settings that are not Config fields (lr_scale)."""

    name: str
    default: Any


def learning_rates(config_cls) -> list[str]:
    """The Config's learning-rate fields: `lr` and `lr_*`."""
    return [f.name for f in dataclasses.fields(config_cls) if f.name == "lr" or f.name.startswith("lr_")]


def settings(config_cls) -> dict[str, Any]:
    """name -> field (or _Setting) of everything --set may set on a method."""
    found: dict[str, Any] = {f.name: f for f in dataclasses.fields(config_cls)}
    if learning_rates(config_cls):
        found[LR_SCALE] = _Setting(LR_SCALE, 1.0)
    return found


@dataclass(frozen=True)
class RunSpec:
    """One cell of a sweep: method x dataset x forget set x seed at a preset, with method overrides."""

    method: str
    dataset: str
    forget_set: str
    seed: int
    preset: str
    overrides: tuple[tuple[str, Any], ...] = ()  # (field, value) for this method, sorted
    evaluators: tuple[str, ...] = ("forget_accuracy", "fid", "wallclock")
    teacher_path: str = ""  # an external diffusers teacher folder (absolute); "" = the model store's teacher
    options: tuple[tuple[str, str], ...] = ()  # evaluator options (weights paths), sorted (name, value)
    data: str = ""  # digest of the dataset's files (Dataset.data_identity): other data, another run id
    # --budget-s: the reference seconds of unlearning compute this run was given (bench/budget.py); its overrides
    # hold the iterations (and EMA decay) that budget resolved to. 0: the preset's own budget.
    budget_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["overrides"] = dict(self.overrides)
        d["evaluators"] = list(self.evaluators)
        d["options"] = dict(self.options)
        # Left out when unset, so runs made before these fields existed keep their ids.
        for key in ("teacher_path", "options", "data", "budget_s"):
            if not d[key]:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        d = dict(d)
        d["overrides"] = tuple(sorted(d.get("overrides", {}).items()))
        d["options"] = tuple(sorted(d.get("options", {}).items()))
        d["evaluators"] = tuple(d["evaluators"])
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})

    @property
    def judge_clip(self) -> str:
        """The local CLIP folder of a zero-shot judge (--judge clip, the text tier), or "": the trained judge."""
        return dict(self.options).get(JUDGE_CLIP, "")

    @property
    def run_id(self) -> str:
        """Readable prefix plus a hash of everything that defines the run (stable across processes)."""
        blob = json.dumps({"v": SCHEMA_VERSION, **self.to_dict()}, sort_keys=True, default=str)
        digest = hashlib.sha256(blob.encode()).hexdigest()[:10]
        # imagefolder:/a/b -> imagefolder-b in the readable prefix; the hash has the whole path.
        kind, _, path = self.dataset.partition(":")
        dataset = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{kind}-{Path(path).name}" if path else kind)
        return f"{self.method}-{dataset}-{self.forget_set}-s{self.seed}-{self.preset}-{digest}"


def coerce(value: str, default: Any, *, where: str, flag: str = "--set") -> Any:
    """Parse a --set value to the type of the field's default."""
    try:
        if isinstance(default, bool):
            if value.lower() not in {"true", "false", "1", "0", "yes", "no"}:
                raise ValueError(value)
            return value.lower() in {"true", "1", "yes"}
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, tuple):
            return tuple(type(default[0])(v) if default else v for v in value.split(","))
        return value
    except ValueError as e:
        raise BenchError(f"{flag} {where}={value}: expected a {type(default).__name__}") from e


def _field(key: str, configs: dict[str, type], where: str) -> dataclasses.Field | _Setting:
    """The Config field `method.field` names (for `all.field`: that of the first method having it), or an error
    naming `where` it was given and what is valid."""
    method, dot, name = key.partition(".")
    if not dot:
        raise BenchError(f"{where}: expected method.field=value, e.g. sfd.lr=1e-4")
    if method == ALL:
        having = [m for m, c in configs.items() if name in settings(c)]
        if not having:
            raise BenchError(f"{where}: no method in --methods ({', '.join(configs)}) has a field {name!r}")
        method = having[0]
    if method not in configs:
        raise BenchError(f"{where}: method {method!r} is not in --methods ({', '.join(configs)})")
    fields = settings(configs[method])
    if name not in fields:
        raise BenchError(f"{where}: {method} has no field {name!r}; fields: {', '.join(fields)}")
    return fields[name]


def _each_method(choices: Choices, configs: dict[str, type]) -> Choices:
    """`all.FIELD` -> `METHOD.FIELD` for every method having the field (a method's own key wins)."""
    out = {k: v for k, v in choices.items() if not k.startswith(f"{ALL}.")}
    for key, value in choices.items():
        if key.startswith(f"{ALL}."):
            name = key.partition(".")[2]
            for m, c in configs.items():
                if name in settings(c):
                    out.setdefault(f"{m}.{name}", value)
    return out


def parse_sets(items: list[str], configs: dict[str, type]) -> dict[str, dict[str, Any]]:
    """`method.field=value` strings -> {method: {field: typed value}}, checked against each Config."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise BenchError(f"--set {item!r}: expected method.field=value, e.g. sfd.lr=1e-4")
        f = _field(key, configs, f"--set {item!r}")
        out.setdefault(key.partition(".")[0], {})[f.name] = coerce(value, f.default, where=key)
    return out


# "method.field" -> (its alternative values as text, where they were given: "--set" or "FILE [set]")
Choices = dict[str, tuple[list[str], str]]


def cli_choices(items: list[str], configs: dict[str, type]) -> Choices:
    """`--set method.field=v1,v2` -> alternatives. A comma separates alternatives, except in a tuple-valued field,
    where it separates the elements of the one value (as `coerce` reads it); the last --set of a key wins."""
    out: Choices = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise BenchError(f"--set {item!r}: expected method.field=value, e.g. sfd.lr=1e-4")
        f = _field(key, configs, f"--set {item!r}")
        values = [value] if isinstance(f.default, tuple) else [v.strip() for v in value.split(",")]
        out[key] = (list(dict.fromkeys(values)), "--set")
    return out


def expand_sets(choices: Choices, configs: dict[str, type]) -> dict[str, list[dict[str, Any]]]:
    """Alternatives -> per method, every combination of its own settings (the cartesian product), typed: a list
    of two values for one sfd field gives sfd two override sets and leaves every other method's runs alone."""
    typed: dict[str, list[tuple[str, list[Any]]]] = {}
    for key, (values, flag) in _each_method(choices, configs).items():
        f = _field(key, configs, f"{flag} {key}")
        typed.setdefault(key.partition(".")[0], []).append(
            (f.name, [coerce(v, f.default, where=key, flag=flag) for v in values])
        )
    # lr_scale 1 is no override: its runs are the unscaled ones (the same run ids, so a sweep folder reuses them).
    return {
        method: [{n: v for n, v in zip([n for n, _ in fields], combo, strict=True) if (n, v) != (LR_SCALE, 1.0)}
                 for combo in itertools.product(*(vs for _, vs in fields))]
        for method, fields in typed.items()
    }  # fmt: skip


def resolve_config(method_cls, preset: str, overrides: dict[str, Any]):
    """Paper defaults, then the preset's scaling, then the user's overrides, validated."""
    scaled = method_cls.scaled.get(preset)
    values = {**(scaled.overrides if scaled else {}), **overrides}
    scale = values.pop(LR_SCALE, 1.0)
    if not (isinstance(scale, int | float) and math.isfinite(scale) and scale > 0):
        raise BenchError(f"{method_cls.name}.{LR_SCALE}={scale!r}: must be a positive number")
    config = method_cls.Config(**values)
    if scale != 1.0:
        config = dataclasses.replace(
            config, **{n: getattr(config, n) * scale for n in learning_rates(type(config))}
        )
    validate_config(config, method_cls.name)
    return config


def validate_config(config, method: str) -> None:
    """Type, finiteness and range of every field (its `param(..., valid=...)`): a bad value fails before any run
    starts with the key and its valid values, never inside a run or, worse, as a plausible-looking result."""
    for f in dataclasses.fields(config):
        value, valid, key = getattr(config, f.name), f.metadata.get("valid"), f"{method}.{f.name}"
        default = f.default
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise BenchError(f"{key}={value!r}: expected true or false")
        elif isinstance(default, int | float):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not ok or (isinstance(default, int) and not isinstance(value, int)):
                raise BenchError(
                    f"{key}={value!r}: expected {'an integer' if isinstance(default, int) else 'a number'}"
                )
            if not math.isfinite(value):
                raise BenchError(f"{key}={value!r}: must be a finite number")
            if valid is not None and value not in valid:
                raise BenchError(f"{key}={value!r}: must be in {valid}")
        elif isinstance(valid, tuple) and value not in valid:
            raise BenchError(f"{key}={value!r}: expected one of {', '.join(map(repr, valid))}")
