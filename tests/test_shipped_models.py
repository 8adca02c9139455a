"""The shipped fashion-mnist teacher, judge and retrain oracle: intact, as good as the README says, reproducible to
load."""

from pathlib import Path

import pytest
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


def _default_oracle(tmp_path, monkeypatch):
    """`retrain` at the default preset on the real Fashion-MNIST files: what it loads, and the context it ran in."""
    from bench.api import Dataset
    from bench.config import resolve_config
    from bench.context import RunContext
    from methods.retrain import Retrain

    ds = FashionMNIST(image_size=16)  # the Debian package's files, as `bench run` reads them
    try:
        ds.check()
    except Exception as e:
        pytest.skip(f"the real Fashion-MNIST files are not installed: {e}")
    monkeypatch.setenv("BENCH_MODEL_DIR", str(tmp_path / "store"))  # only the shipped oracle can be found

    def forbidden(*args, **kwargs):
        raise AssertionError("retrain trained instead of loading the shipped oracle")

    monkeypatch.setattr(Dataset, "images", forbidden)
    d, _ = _shipped()
    forget_set = ds.forget_set("class-0")
    ctx = RunContext(run_dir=tmp_path, seed=0, preset=get_preset("default"), dataset=ds, forget_set=forget_set,
                     requires=Retrain.requires)  # fmt: skip
    model = Retrain(resolve_config(Retrain, "default", {})).unlearn(
        store.load_teacher(d / "teacher"), forget_set, ctx
    )
    return model, ctx


def test_the_default_oracle_ships_and_retrain_loads_it(tmp_path, monkeypatch):
    _, ctx = _default_oracle(tmp_path, monkeypatch)
    assert ctx.reused["what"] == "oracle" and Path(ctx.reused["path"]).is_relative_to(store.SHIPPED)
    manifest = store.verify(Path(ctx.reused["path"]))
    assert manifest["command"].startswith("OMP_NUM_THREADS=1 python -m bench run --methods retrain")
    assert manifest["seed"] == 0 and manifest["forget_set"] == "class-0" and manifest["train_s"] > 0
    assert all((Path(ctx.reused["path"]) / f).stat().st_size < 10 * 2**20 for f in manifest["files"])


@pytest.mark.slow  # 200 samples with the default sampler
def test_the_default_oracle_never_makes_the_forgotten_class(tmp_path, monkeypatch):
    """The oracle never saw class 0: asked for it, it makes something else; the retained classes it makes."""
    model, _ = _default_oracle(tmp_path, monkeypatch)
    d, _ = _shipped()
    per_class = recognisability(model, store.load_judge(d / "judge"), get_preset("default"), num_classes=10,
                                per_class=20, device=torch.device("cpu"), seed=123)  # fmt: skip
    assert per_class[0] <= 0.2, per_class
    assert sum(per_class[1:]) / 9 >= 0.75, per_class
