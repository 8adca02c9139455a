"""The model store: pretrained teachers and judges keyed by dataset, preset and seed, checksummed."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from safetensors.torch import load_file, save_file

from bench.errors import BenchError
from bench.files import check_digests, digests, sha256, share, unlisted
from bench.models.judge import JudgeCNN
from bench.models.unet import UNET_CLASSES, config_num_classes, load_unet
from bench.presets import Preset, get_preset
from bench.sampling import DiffusionModel, Sampler, load_sampler

SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "models"
MANIFEST = "MANIFEST.json"
# Files a store folder may hold beside those its manifest lists: the manifest, lock files (locked()), and the
# training states with their checksum records, which pretrain() deletes (the teacher's right after writing the
# manifest: a kill can leave it). Each is checked against its own record when it is loaded.
UNLISTED = (MANIFEST, ".*.lock", "teacher_state.pt", "teacher_state.pt.json", "judge_state.pt",
            "judge_state.pt.json")  # fmt: skip
# A judge trained alone (for an external teacher, no manifest yet) records its files' checksums here.
JUDGE_CHECKSUMS = "checksums.json"


def user_store() -> Path:
    return Path(os.environ.get("BENCH_MODEL_DIR", Path.home() / ".cache" / "unlearn-bench" / "models"))


def cache_dir() -> Path:
    """Rebuildable caches (decoded images, Inception features): BENCH_CACHE_DIR or ~/.cache/unlearn-bench/cache."""
    return Path(os.environ.get("BENCH_CACHE_DIR", Path.home() / ".cache" / "unlearn-bench" / "cache"))


def model_dir(root: Path, dataset: str, preset_key: str, seed: int) -> Path:
    return Path(root) / dataset / preset_key / f"seed{seed}"


def recipe_preset(dataset: str, preset: Preset, seed: int = 0) -> Preset:
    """The preset whose recipe and store key make `dataset`'s teacher and judge for runs at `preset`.

    A preset with `models_from` (smoke) reuses that preset's models only where they ship with the package
    (fashion-mnist); for every other dataset it trains and caches its own with its own (tiny) recipe. Only shipped
    models count, so which models a run uses never depends on what a user's cache happens to hold.
    """
    if preset.models_from and (model_dir(SHIPPED, dataset, preset.models_from, seed) / MANIFEST).is_file():
        return get_preset(preset.models_from)
    return dataclasses.replace(preset, models_from="")


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on `directory` (a sibling lock file): parallel runs wait for one training."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f".{directory.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def find_models(dataset: str, preset_key: str, seed: int) -> Path | None:
    """The shipped models if there are any for this key, else the user's store, else None."""
    for root in (SHIPPED, user_store()):
        d = model_dir(root, dataset, preset_key, seed)
        if (d / MANIFEST).is_file():
            return d
    return None


def write_manifest(directory: Path, **info) -> None:
    """MANIFEST.json: `info` and the checksum of every file in the folder (all but UNLISTED)."""
    info["files"] = digests(directory, exclude=UNLISTED)
    (directory / MANIFEST).write_text(json.dumps(info, indent=2) + "\n")


def read_manifest(directory: Path) -> dict:
    try:
        return json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise BenchError(f"cannot read {directory / MANIFEST}: {e}") from e


def verify(directory: Path) -> dict:
    """Check every file against the manifest's checksums, and that the folder holds no file the manifest does not
    list (beside UNLISTED); name the first that differs."""
    manifest = read_manifest(directory)
    record = directory / MANIFEST
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise BenchError(
            f'{record} lists no "files" with their checksums (truncated or edited): restore it, or delete the '
            f"folder {directory} and rerun the `command` in that manifest (bench pretrain) to make it again"
        )
    remedy = "restore it or rerun the `command` in that manifest"
    for rel, digest in manifest["files"].items():
        path = directory / rel
        if not path.is_file():
            raise BenchError(f"model file {path} listed in {record} is missing; {remedy}")
        if sha256(path) != digest:
            raise BenchError(
                f"model file {path} does not match its checksum in {record}: truncated or modified; {remedy}"
            )
    for path in unlisted(directory, manifest["files"], UNLISTED):
        raise BenchError(
            f"model file {path} is not listed in {record}, so it is not checked: remove it (nothing the harness "
            "wrote is missing from the manifest), or rerun the `command` in that manifest"
        )
    return manifest


def save_judge(judge: JudgeCNN, directory: Path, *, widths: tuple[int, ...]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    cfg = {"model": "bench_judge_cnn", "in_chans": judge.features[0].in_channels,
           "num_classes": judge.head.out_features, "widths": list(widths)}  # fmt: skip
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, directory / "model.safetensors")
    share(directory / "model.safetensors")


def write_judge_checksums(directory: Path) -> None:
    """Record the checksums of a judge folder's files (for a judge outside a manifest's store folder)."""
    checks = digests(directory, exclude=[JUDGE_CHECKSUMS])
    (directory / JUDGE_CHECKSUMS).write_text(json.dumps({"files": checks}, indent=2) + "\n")


def verify_judge(directory: Path) -> None:
    """Check a judge folder against its own checksums.json (a judge trained alone by the runner)."""
    record = directory / JUDGE_CHECKSUMS
    try:
        recorded = json.loads(record.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BenchError(
            f"cannot read the judge's checksums {record} ({e!r}): delete the folder {directory} and the next run "
            "trains the judge again"
        ) from e
    check_digests(directory, recorded, record=record, allow=(JUDGE_CHECKSUMS,),
                  remedy=f"delete the folder {directory} and the next run trains the judge again")  # fmt: skip


def load_judge(directory: Path) -> JudgeCNN:
    if (directory / JUDGE_CHECKSUMS).is_file():
        verify_judge(directory)
    try:
        cfg = json.loads((directory / "config.json").read_text())
        judge = JudgeCNN(
            in_chans=cfg["in_chans"], num_classes=cfg["num_classes"], widths=tuple(cfg["widths"])
        )
        judge.load_state_dict(load_file(directory / "model.safetensors"))
    except Exception as e:
        raise BenchError(f"cannot load the judge in {directory}: {e}") from e
    return judge.eval()


# In a run's model/ folder: the unlearning seconds and the checksums of the saved files.
RUN_RECORD = "unlearn.json"


def save_run_model(model: Sampler, directory: Path, *, unlearn_s: float, reused: dict | None = None) -> None:
    """Save a run's unlearned model and its record: the unlearning time, what the method took from a cache
    (RunContext.reuse) and every saved file's sha256."""
    model.save(directory)
    record = {"unlearn_s": unlearn_s, "reused": reused, "files": digests(directory, exclude=[RUN_RECORD])}
    (directory / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def load_run_model(directory: Path) -> tuple[Sampler, float]:
    """A run's saved model (checked against the checksums in its unlearn.json) and its unlearning seconds."""
    record_path = directory / RUN_RECORD
    remedy = "rerun the run with --force (it unlearns again)"
    try:
        record = json.loads(record_path.read_text())
        unlearn_s = float(record["unlearn_s"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise BenchError(f"cannot read the run model's record {record_path} ({e!r}): {remedy}") from e
    check_digests(directory, record.get("files"), record=record_path, remedy=remedy, allow=(RUN_RECORD,))
    return load_sampler(directory), unlearn_s


def run_model_reused(directory: Path) -> dict | None:
    """What a run's method took from a cache, from its model record (None: nothing, or an older record)."""
    try:
        reused = json.loads((directory / RUN_RECORD).read_text()).get("reused")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    return reused if isinstance(reused, dict) else None


def load_teacher(directory: Path) -> DiffusionModel:
    """A teacher folder's EMA weights, with its raw weights as `.raw` where it keeps them (raw/: every teacher
    trained or imported since they are kept; the shipped default teacher has EMA weights only)."""
    teacher = load_sampler(directory)
    if not isinstance(teacher, DiffusionModel):
        raise BenchError(f"{directory} holds a {teacher.kind} model, not a diffusion teacher")
    if (directory / "raw" / "sampler.json").is_file():
        teacher.raw = load_sampler(directory / "raw")
    return teacher


# The schedule every sampler and method of the harness assumes (bench.models.unet.noise_schedule).
SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
            "prediction_type": "epsilon"}  # fmt: skip


def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BenchError(f"cannot read {path}: {e}") from e


def external_unet_dir(path: Path) -> Path:
    """The folder of an external teacher's UNet: PATH (config.json + safetensors) or PATH/unet (a pipeline)."""
    path = Path(path)
    for d in (path, path / "unet"):
        if (d / "config.json").is_file():
            return d
    raise BenchError(
        f"--teacher {path}: expected a diffusers UNet2DModel folder (config.json and "
        "diffusion_pytorch_model.safetensors, as save_pretrained writes them) or a pipeline folder with unet/ in it"
    )


def check_external_teacher(
    path: Path, *, dataset: str, image_size: int, channels: int, num_classes: int
) -> Path:
    """Check an external teacher's config against the dataset (no weights are read); return its UNet folder."""
    unet_dir = external_unet_dir(path)
    cfg = _read_config(unet_dir / "config.json")
    if cfg.get("_class_name", "UNet2DModel") not in UNET_CLASSES:
        raise BenchError(f"--teacher {path}: {unet_dir} holds a {cfg['_class_name']}; the harness needs one of "
                         f"{', '.join(UNET_CLASSES)}")  # fmt: skip
    if not any(unet_dir.glob("*.safetensors")):
        raise BenchError(
            f"--teacher {path}: no .safetensors weights in {unet_dir} (save with safe_serialization=True)"
        )
    size = cfg.get("sample_size")
    size = size[0] if isinstance(size, list | tuple) and len(set(size)) == 1 else size
    classes = config_num_classes(cfg)  # the null class is one more embedding (the official null vector)
    got = (cfg.get("in_channels"), cfg.get("out_channels"), size, None if classes is None else classes + 1)
    want = (channels, channels, image_size, num_classes + 1)
    if got != want:
        raise BenchError(
            f"--teacher {path} does not fit dataset {dataset} at this preset: its UNet takes {got[0]} channels, "
            f"predicts {got[1]}, is {got[2]}x{got[2]} and has {got[3]} class embeddings; the dataset needs "
            f"{channels} channels in and out, {image_size}x{image_size} (the preset's resolution) and "
            f"{num_classes + 1} class embeddings ({num_classes} classes plus the null class {num_classes} for "
            "guidance)"
        )
    scheduler = Path(path) / "scheduler" / "scheduler_config.json"
    if unet_dir != Path(path) and scheduler.is_file():
        sched = _read_config(scheduler)
        diff = {k: sched.get(k) for k, v in SCHEDULE.items() if k in sched and sched[k] != v}
        if diff:
            raise BenchError(
                f"--teacher {path}: its scheduler ({scheduler}) differs from the DDPM schedule the harness samples "
                f"and unlearns with ({SCHEDULE}) in {diff}"
            )
    return unet_dir


def load_external_teacher(
    path: Path, *, dataset: str, image_size: int, channels: int, num_classes: int
) -> DiffusionModel:
    """An external class-conditional teacher (a diffusers UNet2DModel, or the official DDPM as `bench import-teacher`
    writes it), checked against the dataset."""
    unet_dir = check_external_teacher(path, dataset=dataset, image_size=image_size, channels=channels,
                                      num_classes=num_classes)  # fmt: skip
    try:
        unet = load_unet(unet_dir)
    except Exception as e:
        raise BenchError(f"--teacher {path}: cannot load the UNet in {unet_dir}: {e}") from e
    unet.register_to_config(sample_size=image_size)  # a square [s, s] becomes s, as the samplers expect
    teacher = DiffusionModel(unet.eval())
    raw = Path(path) / "raw"
    if (raw / "unet" / "config.json").is_file():  # bench import-teacher keeps the raw weights there
        try:
            teacher.raw = DiffusionModel(load_unet(raw / "unet").eval())
        except Exception as e:
            raise BenchError(f"--teacher {path}: cannot load the raw weights in {raw}: {e}") from e
        teacher.raw.unet.register_to_config(sample_size=image_size)
    return teacher


# ---- oracles: a `retrain` model kept per dataset, preset, forget set, seed and recipe ------------------------
# Retraining costs what pretraining the teacher costs (about an hour on 2 cores at the default preset), and the
# attacks and reports compare every method with it, so a finished one is kept, and the default one is shipped.
ORACLES = "oracles"


def oracle_dir(root: Path, dataset: str, preset_key: str, forget_set: str, seed: int, key: str) -> Path:
    return Path(root) / dataset / preset_key / ORACLES / forget_set / f"seed{seed}-{key}"


def find_oracle(dataset: str, preset_key: str, forget_set: str, seed: int, key: str) -> Path | None:
    """The shipped oracle for this key if there is one, else the user's store's, else None (checked on the way)."""
    for root in (SHIPPED, user_store()):
        d = oracle_dir(root, dataset, preset_key, forget_set, seed, key)
        if (d / MANIFEST).is_file():
            verify(d)
            return d
    return None


def save_oracle(model: DiffusionModel, directory: Path, **info) -> None:
    """Write an oracle folder atomically: the model, then a manifest with `info` and every file's checksum."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp)
    write_manifest(tmp, **info)
    share(tmp / MANIFEST)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)


def load_oracle(directory: Path) -> tuple[DiffusionModel, dict]:
    """An oracle's model and manifest (its checksums checked)."""
    manifest = verify(directory)
    model = load_sampler(directory)
    if not isinstance(model, DiffusionModel):
        raise BenchError(f"{directory} holds a {model.kind} model, not a retrained diffusion model")
    return model, manifest
