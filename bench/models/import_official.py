"""`bench import-teacher`: a checkpoint of the official SA/SalUn/SFD DDPM code as a teacher folder of the harness.

The official runners (`ddpm/runners/diffusion.py::train`) save `ckpt.pth` as `torch.save([model.state_dict(),
optimizer.state_dict(), (epoch,) step, ema_helper.state_dict()])`, the model wrapped in DataParallel (keys
`module.*`), the EMA shadow without the prefix, beside the run's `config.yml`. This reads the checkpoint with
`torch.load(weights_only=True)` only, builds bench.models.ddpm_official.OfficialConditionalUNet from the config's
`model:` and `data:` sections, checks every key and shape, and writes

    OUT/sampler.json, OUT/unet/            the EMA weights (as the official `init_from_ema`), diffusers format
    OUT/scheduler/scheduler_config.json    the config's `diffusion:` schedule (the harness's, else refused)
    OUT/raw/sampler.json, OUT/raw/unet/    the raw (non-EMA) weights, a teacher folder too
    OUT/import.json                        provenance: the sources' sha256, the config, the step, every file's sha256

OUT is a model-store teacher folder: `load_sampler(OUT)` and `bench run --teacher OUT` (or `--teacher OUT/raw`)
use it. Its `eps(x, t, c, guidance=w)` is the official `_forward_with_cond_scale(x, t, c, cond_scale=w - 1)`.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
from pathlib import Path

import torch

from bench.errors import BenchError
from bench.files import digests, sha256, share
from bench.models.ddpm_official import OfficialConditionalUNet
from bench.models.unet import noise_schedule
from bench.sampling import DiffusionModel

RECORD = "import.json"
OFFICIAL = (
    "Conditional_Model of clear-nus/selective-amnesia ddpm/models/diffusion.py (SA, SalUn, SFD, EraseDiff)"
)
# The `diffusion:` section the harness samples and unlearns with (bench.models.unet.noise_schedule).
SCHEDULE = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_diffusion_timesteps": 1000}


def read_config(path: Path) -> dict:
    """The run's config.yml (PyYAML safe_load: plain data only)."""
    import yaml

    try:
        cfg = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise BenchError(f"--config {path}: cannot read it as YAML: {e}") from e
    if not isinstance(cfg, dict):
        raise BenchError(
            f"--config {path}: expected the official run config (sections data:, model:, diffusion:)"
        )
    return cfg


def _get(cfg: dict, key: str, kind: type | tuple[type, ...], path: Path):
    """cfg["a"]["b"] for key "a.b", checked to be of `kind` (bool only where asked for); else a BenchError naming it."""
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise BenchError(f"--config {path}: `{key}` is missing (the official config.yml has it)")
        node = node[part]
    ok = isinstance(node, bool) if kind is bool else isinstance(node, kind) and not isinstance(node, bool)
    if not ok:
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise BenchError(f"--config {path}: `{key}` is {node!r}, expected {names}")
    return node


def _int_list(cfg: dict, key: str, path: Path) -> list[int]:
    node = _get(cfg, key, list, path)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in node):
        raise BenchError(f"--config {path}: `{key}` is {node!r}, expected a list of integers")
    return node


def model_kwargs(cfg: dict, path: Path) -> dict:
    """OfficialConditionalUNet's arguments from the official config; a key that does not fit is named."""
    if _get(cfg, "model.type", str, path) != "simple":
        raise BenchError(f"--config {path}: `model.type` is {cfg['model']['type']!r}; only 'simple' (the "
                         "epsilon-prediction DDPM of the official configs) is supported")  # fmt: skip
    for key, want in SCHEDULE.items():
        got = _get(cfg, f"diffusion.{key}", str if key == "beta_schedule" else (int, float), path)
        if got != want if isinstance(want, str) else not math.isclose(got, want, rel_tol=1e-9):
            raise BenchError(f"--config {path}: `diffusion.{key}` is {got!r}; the harness samples and unlearns "
                             f"with the official DDPM schedule ({SCHEDULE}), so {want!r} is needed")  # fmt: skip
    in_ch, out_ch = _get(cfg, "model.in_channels", int, path), _get(cfg, "model.out_ch", int, path)
    if out_ch != in_ch:
        raise BenchError(f"--config {path}: `model.out_ch` is {out_ch} but `model.in_channels` is {in_ch}: an "
                         "epsilon-predicting teacher predicts as many channels as it takes")  # fmt: skip
    dropout = _get(cfg, "model.dropout", (int, float), path)
    kwargs = {
        "sample_size": _get(cfg, "data.image_size", int, path), "in_channels": in_ch, "out_channels": out_ch,
        "num_classes": _get(cfg, "data.n_classes", int, path), "ch": _get(cfg, "model.ch", int, path),
        "ch_mult": tuple(_int_list(cfg, "model.ch_mult", path)),
        "num_res_blocks": _get(cfg, "model.num_res_blocks", int, path),
        "attn_resolutions": tuple(_int_list(cfg, "model.attn_resolutions", path)),
        "dropout": float(dropout), "resamp_with_conv": _get(cfg, "model.resamp_with_conv", bool, path),
    }  # fmt: skip
    if kwargs["ch"] != 128:
        raise BenchError(f"--config {path}: `model.ch` is {kwargs['ch']}; the official ResnetBlock projects a class "
                         "embedding of 512 = 4 x 128 channels, so the official network only runs at ch 128")  # fmt: skip
    return kwargs


def _is_weights(obj) -> bool:
    return (isinstance(obj, dict) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))  # fmt: skip


def _strip(weights: dict) -> dict:
    """Keys without DataParallel's `module.` prefix (the raw model's; the EMA shadow has none)."""
    return {k.removeprefix("module."): v for k, v in weights.items()}


def _refusal_reason(e: Exception) -> str:
    m = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
    if m:
        return f"it refers to {m.group(1)}, which is neither a tensor nor plain data"
    m = re.search(r"Unsupported operand \d+", str(e))
    return f"{m.group(0).lower()}" if m else "it holds objects other than tensors and plain data"


def read_checkpoint(path: Path) -> dict:
    """The official training checkpoint's parts, read without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"checkpoint {path} does not exist or is not a file")
    try:
        states = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise BenchError(
            f"checkpoint {path} needs arbitrary unpickling to load ({_refusal_reason(e)}): refused, since unpickling "
            "can run any code. An official DDPM checkpoint holds only tensors, numbers and containers"
        ) from None
    except Exception as e:
        raise BenchError(f"checkpoint {path} cannot be read as a torch checkpoint: {e}") from e
    layout = ("a list [model state_dict, optimizer state_dict, (epoch,) step, EMA state_dict] as the official "
              "runners/diffusion.py saves it")  # fmt: skip
    if not isinstance(states, list | tuple) or not states or not _is_weights(states[0]):
        raise BenchError(f"checkpoint {path} is not a training checkpoint of the official DDPM code: expected "
                         f"{layout}; got {type(states).__name__}")  # fmt: skip
    rest = list(states[1:])
    ema = rest.pop() if len(rest) >= 2 and _is_weights(rest[-1]) else None
    counters = rest[1:]
    if (
        any(isinstance(v, dict) for v in counters)
        or not all(isinstance(v, int) for v in counters)
        or len(counters) > 2
    ):
        raise BenchError(f"checkpoint {path} holds {len(states)} items ({', '.join(type(v).__name__ for v in states)})"
                         f"; expected {layout}. A checkpoint with several networks (SFD's distillation) is not a "
                         "teacher")  # fmt: skip
    return {"raw": _strip(states[0]), "ema": None if ema is None else _strip(ema),
            "epoch": counters[0] if len(counters) == 2 else None, "step": counters[-1] if counters else None}  # fmt: skip


def check_weights(weights: dict, model: torch.nn.Module, *, what: str, path: Path, config: Path) -> None:
    """Every key of the network the config describes, with its shape; the first that differs is named."""
    want = model.state_dict()
    where = f"the {what} weights of {path} do not match the network {config} describes"
    for k, v in want.items():
        if k in weights and tuple(weights[k].shape) != tuple(v.shape):
            raise BenchError(
                f"{where}: key `{k}` has shape {tuple(weights[k].shape)} in the checkpoint, {tuple(v.shape)} in "
                "the network (check model.ch, ch_mult, num_res_blocks, attn_resolutions, in_channels, "
                "data.n_classes, data.image_size)"
            )
        if k in weights and not weights[k].is_floating_point():
            raise BenchError(f"{where}: key `{k}` holds {weights[k].dtype}, not floating-point weights")
    missing = [k for k in want if k not in weights]
    if missing:
        raise BenchError(
            f"{where}: key `{missing[0]}` is missing from the checkpoint ({len(missing)} missing)"
        )
    extra = [k for k in weights if k not in want]
    if extra:
        raise BenchError(
            f"{where}: key `{extra[0]}` is in the checkpoint but not in the network ({len(extra)} such)"
        )


def _network(kwargs: dict, weights: dict) -> OfficialConditionalUNet:
    unet = OfficialConditionalUNet(**kwargs)
    unet.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    return unet.eval()


def import_teacher(ckpt: Path, *, config: Path, out: Path, command: str = "") -> dict:
    """Write the teacher folder `out` from an official checkpoint and its config.yml; return its import record."""
    ckpt, config, out = Path(ckpt), Path(config), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BenchError(f"--out {out} exists and is not an empty folder: remove it or choose another")
    cfg = read_config(config)
    kwargs = model_kwargs(cfg, config)
    try:
        reference = OfficialConditionalUNet(**kwargs)
    except ValueError as e:
        raise BenchError(f"--config {config}: {e}") from e
    parts = read_checkpoint(ckpt)
    use_ema = parts["ema"] is not None
    if cfg["model"].get("ema", False) != use_ema:
        raise BenchError(f"--config {config}: `model.ema` is {cfg['model'].get('ema')!r} but the checkpoint "
                         f"{ckpt} {'holds' if use_ema else 'holds no'} EMA weights: not the run's config?")  # fmt: skip
    check_weights(parts["raw"], reference, what="raw", path=ckpt, config=config)
    if use_ema:
        check_weights(parts["ema"], reference, what="EMA", path=ckpt, config=config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.importing-{os.getpid()}"  # written whole, then renamed into place
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        DiffusionModel(_network(kwargs, parts["ema"] if use_ema else parts["raw"])).save(tmp)
        if use_ema:
            DiffusionModel(_network(kwargs, parts["raw"])).save(tmp / "raw")
        noise_schedule().save_config(tmp / "scheduler")
        record = {
            "command": command, "official_network": OFFICIAL,
            "checkpoint": {"path": str(ckpt.resolve()), "sha256": sha256(ckpt), "bytes": ckpt.stat().st_size,
                           "epoch": parts["epoch"], "step": parts["step"]},
            "config": {"path": str(config.resolve()), "sha256": sha256(config), "content": cfg},
            "weights": "ema" if use_ema else "raw (the checkpoint holds no EMA)",
            "raw_weights": "raw/" if use_ema else ".",
            "guidance": "eps(x, t, c, guidance=w) = official _forward_with_cond_scale(x, t, c, cond_scale=w - 1)",
            "files": digests(tmp),
        }  # fmt: skip
        (tmp / RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
        share(tmp)
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record
