"""Pretraining: deterministic for a seed, resumable after a kill, written with a checksummed manifest."""

import dataclasses

import pytest
import torch

from bench.data.fashion_mnist import FashionMNIST
from bench.errors import BenchError
from bench.models import store
from bench.presets import JudgeRecipe, get_preset
from bench.pretrain import pretrain, train_teacher
from tests.helpers import TINY, same_weights

TINY_PRESET = dataclasses.replace(
    get_preset("smoke"), name="tiny", models_from="", image_size=8, sampler_steps=2,
    teacher=dataclasses.replace(TINY, steps=6, batch_size=8, warmup_steps=2),
    judge=JudgeRecipe(widths=(4, 8), epochs=1, batch_size=50, lr=1e-2),
)  # fmt: skip


def test_teacher_training_resumes_to_the_same_weights(tmp_path, fmnist_dir, monkeypatch):
    ds = FashionMNIST(data_dir=fmnist_dir.parent, image_size=8)
    cpu = torch.device("cpu")
    straight = train_teacher(
        ds, TINY_PRESET, seed=3, device=cpu, state_path=tmp_path / "a.pt", checkpoint_every=2
    )

    import bench.pretrain as pretrain_module

    real_save, calls = pretrain_module.save_state, []

    def save_then_die(path, state):
        real_save(path, state)
        calls.append(state["step"])
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(pretrain_module, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(ds, TINY_PRESET, seed=3, device=cpu, state_path=tmp_path / "b.pt", checkpoint_every=2)
    monkeypatch.setattr(pretrain_module, "save_state", real_save)
    resumed = train_teacher(
        ds, TINY_PRESET, seed=3, device=cpu, state_path=tmp_path / "b.pt", checkpoint_every=2
    )
    assert calls == [2, 4]
    assert same_weights(straight.unet, resumed.unet)


def test_judge_training_resumes_from_its_epoch_dump(tmp_path, fmnist_dir, monkeypatch):
    """A requeued pretraining job loses at most the judge's current epoch, and ends with the same weights."""
    import bench.pretrain as pretrain_module
    from bench.pretrain import train_judge

    ds = FashionMNIST(data_dir=fmnist_dir.parent, image_size=8)
    preset = dataclasses.replace(TINY_PRESET, judge=dataclasses.replace(TINY_PRESET.judge, epochs=3))
    cpu = torch.device("cpu")
    straight, acc = train_judge(ds, preset, seed=1, device=cpu, state_path=tmp_path / "a.pt")
    real_save = pretrain_module.save_state

    def save_then_die(path, state):
        real_save(path, state)
        if state["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(pretrain_module, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_judge(ds, preset, seed=1, device=cpu, state_path=tmp_path / "b.pt")
    monkeypatch.setattr(pretrain_module, "save_state", real_save)
    resumed, acc_resumed = train_judge(ds, preset, seed=1, device=cpu, state_path=tmp_path / "b.pt")
    assert same_weights(straight, resumed) and acc == acc_resumed


def test_pretrain_writes_a_verified_store(tmp_path, fmnist_dir):
    ds = FashionMNIST(data_dir=fmnist_dir.parent, image_size=8)
    out = pretrain(ds, TINY_PRESET, seed=0, out_root=tmp_path, device=torch.device("cpu"))
    manifest = store.verify(out)
    assert (
        manifest["command"]
        == f"bench pretrain --dataset fashion-mnist --preset tiny --seed 0 --out {tmp_path}"
    )
    assert set(manifest["files"]) >= {
        "judge/model.safetensors",
        "teacher/unet/diffusion_pytorch_model.safetensors",
    }
    assert (
        0 <= manifest["judge_test_accuracy"] <= 1 and len(manifest["teacher_recognised"]["per_class"]) == 10
    )
    assert not (out / "teacher_state.pt").exists()
    again = pretrain(ds, TINY_PRESET, seed=0, out_root=tmp_path / "again", device=torch.device("cpu"))
    for rel in ("judge/model.safetensors", "teacher/unet/diffusion_pytorch_model.safetensors"):
        assert (out / rel).read_bytes() == (again / rel).read_bytes(), f"{rel} is not reproducible"
    (out / "judge" / "config.json").write_text("{}")
    with pytest.raises(BenchError, match=r"judge/config.json does not match its checksum"):
        store.verify(out)


def test_teachers_keep_their_raw_weights_and_sa_and_salun_start_there(tmp_path, fmnist_dir):
    """The official SA and SalUn load the checkpoint's raw weights (states[0]); the others sample the EMA ones."""
    from bench.registry import METHODS
    from bench.runner import teacher_weights

    ds = FashionMNIST(data_dir=fmnist_dir.parent, image_size=8)
    out = pretrain(ds, TINY_PRESET, seed=0, out_root=tmp_path, device=torch.device("cpu"))
    store.verify(out)  # raw/ is listed in the manifest like every other file
    teacher = store.load_teacher(out / "teacher")
    assert teacher.raw is not None and not same_weights(teacher.unet, teacher.raw.unet)
    for name in ("sa", "salun"):
        method = METHODS.get(name)(METHODS.get(name).Config())
        assert method.start_weights(teacher) is teacher.raw
        assert teacher_weights(METHODS.get(name), teacher) == {"started_from": "raw", "official": "raw"}
    sfd = METHODS.get("sfd")(METHODS.get("sfd").Config())
    assert sfd.start_weights(teacher) is teacher
    shipped = store.load_teacher(store.find_models("fashion-mnist", "default", 0) / "teacher")
    assert shipped.raw is None
    assert teacher_weights(METHODS.get("sa"), shipped)["note"] == "the teacher keeps EMA weights only"
