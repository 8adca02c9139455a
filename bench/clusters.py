"""SLURM cluster presets (slurm/*.toml): loading, `--set slurm.key=value` overrides, submitit parameters."""

from __future__ import annotations

import math
import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

import submitit

from bench.errors import BenchError, unknown

CLUSTERS = Path(__file__).resolve().parent.parent / "slurm"  # the presets shipped with the checkout

_KEYS: dict[str, tuple[type, ...]] = {
    "description": (str,), "partition": (str,), "time": (str, int), "gpus_per_node": (int,),
    "cpus_per_task": (int,), "mem_gb": (float, int), "array_parallelism": (int,), "account": (str,),
    "qos": (str,), "constraint": (str,), "exclude": (str,), "signal_delay_s": (int,), "max_requeues": (int,),
    "setup": (list,), "additional": (dict,),
}  # fmt: skip
# preset key -> submitit AutoExecutor parameter (the rest are handled in executor_params)
_SUBMITIT = {"partition": "slurm_partition", "account": "slurm_account", "qos": "slurm_qos",
             "constraint": "slurm_constraint", "exclude": "slurm_exclude", "cpus_per_task": "cpus_per_task",
             "mem_gb": "mem_gb", "array_parallelism": "slurm_array_parallelism",
             "signal_delay_s": "slurm_signal_delay_s", "setup": "slurm_setup",
             "additional": "slurm_additional_parameters"}  # fmt: skip


def cluster_names() -> list[str]:
    return sorted(p.stem for p in CLUSTERS.glob("*.toml"))


def _check_key(key: str, value: Any, where: str) -> None:
    if key not in _KEYS:
        raise BenchError(f"{where}: unknown cluster setting {key!r}; valid: {', '.join(_KEYS)} "
                         "(any other sbatch option goes under `additional`, e.g. slurm.additional.reservation=x)")  # fmt: skip
    if not isinstance(value, _KEYS[key]) or isinstance(value, bool):
        types = " or ".join(t.__name__ for t in _KEYS[key])
        raise BenchError(f"{where}: {key} = {value!r} should be a {types}")


def _coerce(key: str, value: str, where: str) -> Any:
    kind = _KEYS[key][0]
    if kind is list:  # setup lines, separated by ';'
        return [v.strip() for v in value.split(";") if v.strip()]
    if kind in (int, float):
        try:
            return kind(value)
        except ValueError as e:
            raise BenchError(f"{where}: expected {'an integer' if kind is int else 'a number'}") from e
    return value


def load_cluster(name: str, sets: list[str] = ()) -> dict[str, Any]:
    """A preset from slurm/NAME.toml (or a path to a .toml), with `slurm.key=value` overrides applied."""
    path = Path(name)
    if path.suffix != ".toml":
        path = CLUSTERS / f"{name}.toml"
        if not path.is_file():
            raise unknown("cluster", name, cluster_names())
    try:
        cfg = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise BenchError(f"--cluster {name}: cannot read {path}: {e}") from e
    for key, value in cfg.items():
        _check_key(key, value, str(path))
    for item in sets:
        key, sep, value = item.partition("=")
        parts = key.split(".")
        if not sep or parts[0] != "slurm" or len(parts) < 2:
            raise BenchError(f"--set {item!r}: expected slurm.key=value, e.g. slurm.time=2:00:00")
        if parts[1] == "additional" and len(parts) == 3:
            cfg["additional"] = {**cfg.get("additional", {}), parts[2]: value}
            continue
        if len(parts) != 2 or parts[1] not in _KEYS or parts[1] in ("additional", "description"):
            raise BenchError(f"--set {item!r}: unknown cluster setting; valid: {', '.join(_KEYS)} "
                             "(other sbatch options: slurm.additional.OPTION=value)")  # fmt: skip
        cfg[parts[1]] = _coerce(parts[1], value, f"--set {item}")
    time_minutes(cfg.get("time", 60))  # a bad time limit fails here, before anything is submitted
    cfg["name"] = path.stem
    return cfg


def time_minutes(value: int | str) -> int:
    """sbatch's --time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in whole minutes, rounded up."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
    if not m:
        raise BenchError(f"cluster setting time = {value!r}: expected minutes or [D-]HH:MM:SS, e.g. 4:00:00")
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if days is not None:  # D-H, D-H:M, D-H:M:S
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # H:M:S
        seconds = a * 3600 + b * 60 + c
    else:  # M or M:S
        seconds = a * 60 + (b or 0)
    return max(1, math.ceil(seconds / 60))


def executor_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """submitit AutoExecutor parameters for a cluster preset."""
    params: dict[str, Any] = {"name": "bench", "timeout_min": time_minutes(cfg.get("time", 60))}
    for key, target in _SUBMITIT.items():
        if cfg.get(key) not in (None, "", [], {}):
            params[target] = cfg[key]
    # submitit writes --gpus-per-node=0 for 0, which would override a gres request: leave it out instead.
    if cfg.get("gpus_per_node"):
        params["gpus_per_node"] = cfg["gpus_per_node"]
    return params


def rank_params(cfg: dict[str, Any], nproc: int) -> dict[str, Any]:
    """submitit parameters for a run of `nproc` ranks on one node: one task per rank and, when the preset asks
    for GPUs, one GPU per task."""
    params: dict[str, Any] = {"tasks_per_node": nproc}
    if cfg.get("gpus_per_node"):
        params["gpus_per_node"] = nproc
    return params


def executor(cfg: dict[str, Any], folder: Path) -> submitit.AutoExecutor:
    """A submitit AutoExecutor for SLURM with this preset's parameters, keeping its files in `folder`."""
    if shutil.which("sbatch") is None:
        raise BenchError("--launcher slurm: `sbatch` is not on PATH; run on a SLURM login node "
                         "(for the local test cluster: source DIR/env.sh after slurm/local-cluster.sh start DIR)")  # fmt: skip
    ex = submitit.AutoExecutor(
        folder=folder / "%j", cluster="slurm", slurm_max_num_timeout=cfg.get("max_requeues", 3)
    )
    ex.update_parameters(**executor_params(cfg))
    return ex
