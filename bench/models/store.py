"""The model store: pretrained teachers and judges keyed by dataset, preset and seed, checksummed."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from bench.errors import BenchError
from bench.models.judge import JudgeCNN
from bench.sampling import DiffusionModel, load_sampler

SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "models"
MANIFEST = "MANIFEST.json"


def user_store() -> Path:
    return Path(os.environ.get("BENCH_MODEL_DIR", Path.home() / ".cache" / "unlearn-bench" / "models"))


def model_dir(root: Path, dataset: str, preset_key: str, seed: int) -> Path:
    return Path(root) / dataset / preset_key / f"seed{seed}"


def find_models(dataset: str, preset_key: str, seed: int) -> Path | None:
    """The shipped models if there are any for this key, else the user's store, else None."""
    for root in (SHIPPED, user_store()):
        d = model_dir(root, dataset, preset_key, seed)
        if (d / MANIFEST).is_file():
            return d
    return None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path, **info) -> None:
    files = sorted(
        p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.endswith(".pt")
    )
    info["files"] = {str(p.relative_to(directory)): sha256(p) for p in files}
    (directory / MANIFEST).write_text(json.dumps(info, indent=2) + "\n")


def read_manifest(directory: Path) -> dict:
    try:
        return json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise BenchError(f"cannot read {directory / MANIFEST}: {e}") from e


def verify(directory: Path) -> dict:
    """Check every file against the manifest's checksums; name the first that differs."""
    manifest = read_manifest(directory)
    for rel, digest in manifest["files"].items():
        path = directory / rel
        if not path.is_file():
            raise BenchError(f"model file {path} listed in {directory / MANIFEST} is missing")
        if sha256(path) != digest:
            raise BenchError(
                f"model file {path} does not match its checksum in {directory / MANIFEST}: "
                "truncated or modified; restore it or rerun the `command` in that manifest"
            )
    return manifest


def save_judge(judge: JudgeCNN, directory: Path, *, widths: tuple[int, ...]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    cfg = {"model": "bench_judge_cnn", "in_chans": judge.features[0].in_channels,
           "num_classes": judge.head.out_features, "widths": list(widths)}  # fmt: skip
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, directory / "model.safetensors")


def load_judge(directory: Path) -> JudgeCNN:
    try:
        cfg = json.loads((directory / "config.json").read_text())
        judge = JudgeCNN(
            in_chans=cfg["in_chans"], num_classes=cfg["num_classes"], widths=tuple(cfg["widths"])
        )
        judge.load_state_dict(load_file(directory / "model.safetensors"))
    except Exception as e:
        raise BenchError(f"cannot load the judge in {directory}: {e}") from e
    return judge.eval()


def load_teacher(directory: Path) -> DiffusionModel:
    teacher = load_sampler(directory)
    if not isinstance(teacher, DiffusionModel):
        raise BenchError(f"{directory} holds a {teacher.kind} model, not a diffusion teacher")
    return teacher
