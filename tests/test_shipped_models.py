"""The shipped fashion-mnist teacher, judge, retrain oracle and per-teacher caches: intact, as good as the README
says, reproducible to load."""

import re
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


@pytest.mark.slow  # moved out of the fast suite (its 3-minute limit); runs in CI
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


def test_the_default_sweeps_per_teacher_caches_ship_and_are_read_from_there(tmp_path, monkeypatch):
    """SA's replay and Fisher and sid's stage 1 of the shipped teacher ship, checksummed, with their command; an
    empty user store reads them there (nothing is computed) and a corrupt copy is named."""
    from bench.config import resolve_config
    from bench.errors import BenchError
    from bench.models.cache import is_cached, load_cached
    from methods.sa import SelectiveAmnesia as SA
    from methods.sfd import SiD

    monkeypatch.setenv("BENCH_MODEL_DIR", str(tmp_path / "store"))
    d, _ = _shipped()
    teacher = store.load_teacher(d / "teacher")
    sa = SA(resolve_config(SA, "default", {}))
    assert sa.prepared(teacher)  # `bench run` prepares nothing for SA
    sid = SiD(resolve_config(SiD, "default", {}))
    path = sid.stage1_path(teacher, 0)
    assert path.is_relative_to(tmp_path / "store") and is_cached(path)
    tensors, record = load_cached(path, what="sid stage-1")
    assert record["seconds"] > 0 and record["command"].startswith("python -m bench run --methods sid")
    assert any(k.startswith("generator.") for k in tensors) and any(k.startswith("fake.") for k in tensors)
    for cache in (*sa._cache_files(teacher), path):
        shipped = store.SHIPPED / cache.relative_to(tmp_path / "store")
        assert shipped.stat().st_size < 10 * 2**20
    assert not (tmp_path / "store").exists()  # read, never written

    broken = tmp_path / "shipped"  # a copy of the shipped store whose stage 1 lost a byte
    relative = path.relative_to(tmp_path / "store")
    (broken / relative).parent.mkdir(parents=True)
    (broken / relative).write_bytes((store.SHIPPED / relative).read_bytes()[:-1])
    (broken / relative).with_name(relative.name + ".json").write_bytes(
        (store.SHIPPED / relative).with_name(relative.name + ".json").read_bytes()
    )
    monkeypatch.setattr(store, "SHIPPED", broken)
    with pytest.raises(BenchError, match=re.escape(str(broken / relative))):
        load_cached(path, what="sid stage-1")
