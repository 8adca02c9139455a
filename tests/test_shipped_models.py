"""The shipped fashion-mnist teacher and judge: intact, as good as the README says, reproducible to load."""

import torch

from bench.data.fashion_mnist import FashionMNIST
from bench.models import store
from bench.models.judge import judge_probs
from bench.presets import get_preset
from bench.pretrain import recognisability


def _shipped():
    d = store.find_models("fashion-mnist", "default", 0)
    assert d is not None and d.is_relative_to(store.SHIPPED), (
        "the default teacher and judge must ship in the repo"
    )
    return d, store.verify(d)


def test_manifest_records_the_command_and_seed():
    d, manifest = _shipped()
    assert manifest["command"].startswith("bench pretrain --dataset fashion-mnist --preset default --seed 0")
    assert manifest["seed"] == 0 and manifest["judge_test_accuracy"] >= 0.87
    assert manifest["teacher_recognised"]["mean"] >= 0.8
    for f in manifest["files"]:
        assert (d / f).stat().st_size < 10 * 2**20  # small files


def test_judge_accuracy_on_real_fixture_images(fmnist_dir):
    d, _ = _shipped()
    judge = store.load_judge(d / "judge")
    x, y = FashionMNIST(data_dir=fmnist_dir.parent, image_size=16).images("test")
    acc = (judge_probs(judge, x).argmax(-1) == y).float().mean().item()
    assert acc >= 0.87


def test_teacher_samples_are_recognised_per_class():
    d, _ = _shipped()
    teacher, judge = store.load_teacher(d / "teacher"), store.load_judge(d / "judge")
    per_class = recognisability(teacher, judge, get_preset("default"), num_classes=10, per_class=20,
                                device=torch.device("cpu"), seed=123)  # fmt: skip
    assert sum(per_class) / 10 >= 0.8, per_class
