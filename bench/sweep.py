"""Sweep files (`bench run --sweep FILE.toml`): a sweep written down once, its record beside the results, and the
report labels that tell apart runs that differ only by a swept setting."""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from bench.config import ALL, LR_SCALE, Choices, _field
from bench.errors import BenchError

RECORD = "sweep.json"  # the resolved sweep, in the results folder
NAMES = (
    "methods",
    "datasets",
    "forget_sets",
    "evaluators",
)  # lists of names (a single string is a list of one)
TEXT = ("preset", "cluster", "device", "fid_reference", "judge")
COUNTS = ("workers", "nproc", "checkpoint_every")  # whole numbers of at least 1
# Every key a sweep file may hold, with what it is; the error for an unknown key lists them.
KEYS = {
    "methods": "method names (default: all but the oracles)",
    "datasets": "dataset names, imagefolder:PATH or textfolder:PATH for a folder",
    "forget_sets": "forget set names; all-classes = class-0 .. class-(K-1)",
    "seeds": "integers",
    "preset": "smoke, default or paper",
    "budget_s": "seconds or a list of them: matched budgets (bench/budget.py), one run per budget",
    "evaluators": "evaluator names (default: all)",
    "set": "table of method settings, method.field = value or [value, ...] (a list: one run per value)",
    "results": "the sweep folder (default: results/<file name without .toml>)",
    "launcher": "inline, local or slurm",
    "cluster": "slurm/NAME.toml preset or a .toml path, for launcher slurm",
    "workers": "processes for launcher local",
    "nproc": "processes per run",
    "device": "cpu, cuda or cuda:N",
    "amp": "true: bf16 autocast",
    "checkpoint_every": "steps between state dumps",
    "fid_reference": "train or test",
    "judge": "text tier: trained (default) or clip (a zero-shot judge of --clip-model)",
}
CHOICES = {
    "launcher": ("inline", "local", "slurm"),
    "fid_reference": ("train", "test"),
    "judge": ("trained", "clip"),
}


@dataclass
class Sweep:
    """A sweep file, read and checked: its values (typed as the command line's) and its [set] table."""

    path: Path
    text: str
    values: dict[str, Any] = field(default_factory=dict)
    sets: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> field -> value or [values]

    def choices(self, configs: dict[str, type]) -> Choices:
        """The [set] table as alternatives for config.expand_sets; settings of methods this invocation does not
        run (--methods on the command line chose others) are left out, not an error."""
        out: Choices = {}
        where = f"{self.path} [set]"
        for method, fields in self.sets.items():
            if method not in configs and method != ALL:
                continue
            for name, value in fields.items():
                key = f"{method}.{name}"
                tuple_field = isinstance(_field(key, configs, f"{where} {key}").default, tuple)
                # A list is several values, except for a tuple-valued field, where a list of lists is.
                several = isinstance(value, list) and (
                    not tuple_field or all(isinstance(v, list) for v in value)
                )
                out[key] = (list(dict.fromkeys(map(_text, value if several else [value]))), where)
        return out


def _text(value: Any) -> str:
    """A TOML value as the command line would write it (config.coerce reads it)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(_text, value))
    return str(value)


def load(path: Path) -> Sweep:
    """Read and check a sweep file: unknown keys, wrong types and unknown names fail here, naming the file and
    listing what is valid, before anything runs."""
    from bench.attack import evaluator_names
    from bench.cli import SEEDS
    from bench.presets import get_preset
    from bench.registry import DATASETS, EVALUATORS, METHODS

    path = Path(path)
    try:
        text = path.read_text()
        data = tomllib.loads(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise BenchError(f"--sweep {path}: cannot read it: {e}") from e
    sweep = Sweep(path=path, text=text)
    for key, value in data.items():
        if key not in KEYS:
            raise BenchError(
                f"{path}: unknown key {key!r}; valid keys: {', '.join(KEYS)}\n"
                + "\n".join(f"  {k}: {v}" for k, v in KEYS.items())
            )
        where = f"{path}: {key}"
        if key in NAMES:
            names = [value] if isinstance(value, str) else value
            if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
                raise BenchError(f"{where} = {value!r}: expected a non-empty list of names")
            value = list(dict.fromkeys(names))
        elif key == "seeds":
            seeds = [value] if isinstance(value, int) else value
            if not isinstance(seeds, list) or not seeds or any(isinstance(s, bool) or not isinstance(s, int)
                                                               for s in seeds):  # fmt: skip
                raise BenchError(
                    f"{where} = {value!r}: expected a non-empty list of integers, e.g. [0, 1, 2]"
                )
            if bad := [s for s in seeds if s not in SEEDS]:
                raise BenchError(
                    f"{where}: seed {bad[0]} is out of range ({SEEDS.start} .. {SEEDS.stop - 1})"
                )
            value = list(dict.fromkeys(seeds))
        elif key == "budget_s":
            budgets = [value] if isinstance(value, int | float) and not isinstance(value, bool) else value
            if (
                not isinstance(budgets, list)
                or not budgets
                or any(
                    isinstance(b, bool) or not isinstance(b, int | float) or not b > 0 or b == float("inf")
                    for b in budgets
                )
            ):
                raise BenchError(
                    f"{where} = {value!r}: expected positive seconds or a list of them, e.g. [15, 30]"
                )
            value = list(dict.fromkeys(float(b) for b in budgets))
        elif key in TEXT or key in CHOICES or key == "results":
            if not isinstance(value, str) or not value:
                raise BenchError(f"{where} = {value!r}: expected a string ({KEYS[key]})")
            if key in CHOICES and value not in CHOICES[key]:
                raise BenchError(f"{where} = {value!r}: expected one of {', '.join(CHOICES[key])}")
            value = Path(value) if key == "results" else value
        elif key in COUNTS:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BenchError(f"{where} = {value!r}: expected a whole number of at least 1")
        elif key == "amp":
            if not isinstance(value, bool):
                raise BenchError(f"{where} = {value!r}: expected true or false")
        elif key == "set":
            sweep.sets = _check_sets(value, path)
            continue
        sweep.values[key] = value
    try:  # names: the registries' errors list the valid ones
        for m in sweep.values.get("methods", []):
            METHODS.get(m)
        for e in evaluator_names(sweep.values.get("evaluators"), []):  # attacks ('+robustness') left out
            EVALUATORS.get(e)
        for d in sweep.values.get("datasets", []):
            DATASETS.get(d.partition(":")[0])
        if "preset" in sweep.values:
            get_preset(sweep.values["preset"])
    except BenchError as e:
        raise BenchError(f"{path}: {e}") from e
    sweep.values.setdefault("results", Path("results") / path.stem)
    return sweep


def _check_sets(table: Any, path: Path) -> dict[str, dict[str, Any]]:
    """[set]: method -> field -> a value or a list of values, each field one of the method's Config."""
    from bench.registry import METHODS

    where = f"{path} [set]"
    if not isinstance(table, dict):
        raise BenchError(f"{where}: expected a table of method.field = value")
    out: dict[str, dict[str, Any]] = {}
    for method, fields in table.items():
        if method == "slurm":
            raise BenchError(f"{where}: slurm settings belong in the cluster file (cluster = PATH.toml) or on the "
                             "command line (--set slurm.KEY=VALUE)")  # fmt: skip
        if not isinstance(fields, dict):
            raise BenchError(f"{where} {method} = {fields!r}: expected {method}.FIELD = value")
        try:  # all.FIELD: that field of every method of the sweep that has it
            configs = {m: METHODS.get(m).Config for m in (METHODS if method == ALL else [method])}
        except BenchError as e:
            raise BenchError(f"{where}: {e}") from e
        for name, value in fields.items():
            key = f"{method}.{name}"
            _field(key, configs, f"{where} {key}")
            if isinstance(value, dict) or value == []:
                raise BenchError(f"{where} {key} = {value!r}: expected a value or a non-empty list of values")
        out[method] = dict(fields)
    return out


def resolve_args(args, defaults: dict[str, Any]) -> None:
    """`bench run`'s options: the command line, then the sweep file (--sweep), then `defaults`. A flag given on
    the command line wins over the file's key (a list flag replaces the file's list); --amp is on if either turns
    it on. The file itself lands in args.sweep_file (None without --sweep) for make_specs' [set]."""
    args.sweep_file = load(args.sweep) if getattr(args, "sweep", None) else None
    for key, value in (args.sweep_file.values if args.sweep_file else {}).items():
        if key == "amp":
            args.amp = args.amp or value
        elif getattr(args, key) is None:
            setattr(args, key, value)
    for key, default in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, default)


def write_record(results: Path, sweep: Sweep, specs) -> Path | None:
    """RESULTS/sweep.json: the file the sweep came from (path, checksum, text) and every run it expanded to, with
    the fields that define it. Written atomically, and only when it changed, so rerunning a finished sweep leaves
    the folder untouched."""
    from bench import store

    record = {"sweep": str(sweep.path.resolve()), "sha256": hashlib.sha256(sweep.text.encode()).hexdigest(),
              "text": sweep.text, "runs": [{"run_id": s.run_id, **s.to_dict()} for s in specs]}  # fmt: skip
    path = Path(results) / RECORD
    text = json.dumps(record, indent=2, default=str) + "\n"
    if path.is_file() and path.read_text() == text:
        return None
    store.writable_dir(results, "--results")
    store.atomic_write_text(path, text)
    return path


# ---- report labels ----------------------------------------------------------------------------------------


def label_swept(df: pd.DataFrame, dirs: dict[str, Path]) -> pd.DataFrame:
    """Rename the method of runs that differ only by a setting, `sfd[lr_generator=1e-05]`, so that the tables
    show a row per value instead of averaging them. Per (method, dataset, preset), a setting is shown when its
    effective value (the run's override, else its resolved config in spec.json) is not the same in every run;
    settings common to all runs, and runs without a spec.json, keep the plain method name."""
    if df.empty or "run_id" not in df.columns:
        return df
    # Runs of one budget (--budget-s) are compared with each other, so the iterations a budget resolved to label
    # nothing: the budget is a column of its own.
    by = [c for c in ("method", "dataset", "preset", "budget_s") if c in df.columns]
    runs = df.drop_duplicates("run_id")
    specs = {rid: _read_spec(dirs.get(rid)) for rid in runs["run_id"]}
    labels: dict[str, str] = {}
    for key, group in runs.groupby(by, sort=False, dropna=False):
        method, rids = key[0] if isinstance(key, tuple) else key, list(group["run_id"])
        names = sorted({k for rid in rids for k in specs[rid].get("overrides") or {}})
        value = {(rid, k): _effective(specs[rid], k) for rid in rids for k in names}
        varying = [
            k
            for k in names
            if len({json.dumps(value[rid, k], sort_keys=True, default=str) for rid in rids}) > 1
        ]
        for rid in rids if varying else ():
            labels[rid] = f"{method}[{','.join(f'{k}={_show(value[rid, k])}' for k in varying)}]"
    if not labels:
        return df
    return df.assign(method=df["run_id"].map(labels).fillna(df["method"]))


def _effective(spec: dict[str, Any], key: str) -> Any:
    overrides = spec.get("overrides") or {}
    if key == LR_SCALE:  # not a config field: no override is scale 1
        return overrides.get(key, 1.0)
    return overrides[key] if key in overrides else (spec.get("config") or {}).get(key)


def _read_spec(d: Path | None) -> dict[str, Any]:
    try:
        spec = json.loads((Path(d) / "spec.json").read_text()) if d else {}
    except (OSError, ValueError):
        return {}
    return spec if isinstance(spec, dict) else {}


def _show(value: Any) -> str:
    if value is None:
        return "default"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)
