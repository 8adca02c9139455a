"""Integrity of what the harness reads back (issue 18): no unpickling of data or weights files, no crash on a
diverged method, checksums on every file it writes and later trusts, and weight files that follow the umask."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import store
from bench.config import RunSpec
from bench.context import Runtime
from bench.data.cifar10 import CIFAR10, read_batch, read_pickle
from bench.errors import BenchError
from bench.models import store as model_store
from bench.models.store import sha256
from bench.registry import EVALUATORS
from bench.runner import execute
from tests.fixtures_real import py2_pickle, write_cifar10
from tests.helpers import tiny_context

ROOT = Path(__file__).resolve().parent.parent


def flip(path: Path, offset: int | None = None, n: int = 8) -> None:
    """Flip n bytes of a file in place (in its middle unless told where)."""
    raw = bytearray(path.read_bytes())
    at = len(raw) // 2 if offset is None else offset
    for i in range(at, min(at + n, len(raw))):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


class Payload:
    """A pickle that, when loaded by a plain unpickler, writes a marker file (and then stands for `value`)."""

    def __init__(self, marker: Path, value=None):
        self.marker, self.value = marker, value

    def __reduce__(self):
        code = f"open({str(self.marker)!r}, 'a').write('ran\\n') or {self.value!r}"
        return eval, (code,)


# ---------------------------------------------------------------------------------------------------------------
# 1. CIFAR-10: a restricted unpickler


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_cifar10_payload_in_batches_meta_is_refused_and_never_runs(tmp_path, protocol):
    d = write_cifar10(tmp_path)
    marker = tmp_path / "PWNED"
    meta = {b"label_names": Payload(marker, [n.encode() for n in CIFAR10.class_names]), b"num_vis": 3072}
    (d / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    for attempt in (CIFAR10(data_dir=tmp_path).check, lambda: CIFAR10(data_dir=tmp_path).load_split("train")):
        with pytest.raises(
            BenchError,
            match=r"batches\.meta refers to (__builtin__|builtins)\.eval.*refused.*delete the file",
        ):
            attempt()
    assert not marker.exists()


def test_cifar10_payload_in_a_data_batch_is_refused(tmp_path):
    d = write_cifar10(tmp_path)
    marker = tmp_path / "PWNED"

    class System:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (d / "data_batch_2").write_bytes(pickle.dumps({b"data": System(), b"labels": [1]}, protocol=2))
    with pytest.raises(BenchError, match=r"data_batch_2 refers to (posix|os)\.system"):
        CIFAR10(data_dir=tmp_path).check()
    assert not marker.exists()


def test_cifar10_real_format_files_still_read_through_the_allowed_globals(tmp_path, monkeypatch):
    """The fixture is what Python 2's cPickle wrote (numpy.core.multiarray._reconstruct, numpy.ndarray,
    numpy.dtype); a batch that Python 3 re-pickled names numpy._core and _codecs.encode instead."""
    from bench.data import cifar10

    seen = []
    real_find = cifar10.CifarUnpickler.find_class
    monkeypatch.setattr(cifar10.CifarUnpickler, "find_class", lambda self, m, n: seen.append((m, n)) or
                        real_find(self, m, n))  # fmt: skip
    write_cifar10(tmp_path)
    ds = CIFAR10(data_dir=tmp_path, image_size=32)
    ds.check()
    x, y = ds.images("test")
    assert x.shape == (20, 3, 32, 32) and sorted(set(y.tolist())) == list(range(10))
    assert set(seen) == {("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype")}

    data = np.arange(2 * 3072).reshape(2, 3072).astype(np.uint8)
    (tmp_path / "py3").write_bytes(
        pickle.dumps({b"data": data, b"labels": [3, 9], b"batch_label": b"x"}, protocol=2)
    )
    seen.clear()
    x, y = read_batch(tmp_path / "py3")
    assert y.tolist() == [3, 9] and x[0, 1, 2, 1] == data[0, 1024 + 32 + 2]
    assert ("_codecs", "encode") in seen and ("numpy._core.multiarray", "_reconstruct") in seen
    assert read_pickle(tmp_path / "py3")["batch_label"] == b"x"
    (tmp_path / "py2").write_bytes(py2_pickle({"data": data, "labels": [3, 9]}))
    assert read_batch(tmp_path / "py2")[1].tolist() == [3, 9]


# ---------------------------------------------------------------------------------------------------------------
# 2. --inception-weights: read once, as tensors; torch-fidelity never gets the user's path


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    from tests.fixtures_real import write_inception

    return write_inception(tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth")


def test_inception_file_is_read_once_and_a_swap_after_the_check_runs_nothing(
    inception, tmp_path, monkeypatch
):
    from evaluators import fid as fid_module

    path = tmp_path / "inception.pth"
    shutil.copy(inception, path)
    original = torch.load(path, map_location="cpu", weights_only=True)
    marker = tmp_path / "PWNED"
    calls, real_load = [], torch.load

    def recording_load(f, *args, **kwargs):
        calls.append((f, kwargs.get("weights_only")))
        out = real_load(f, *args, **kwargs)
        if len(calls) == 1:  # the attacker swaps the file right after the safe load
            with open(path, "wb") as g:
                pickle.dump(Payload(marker, {}), g)
        return out

    monkeypatch.setattr(torch, "load", recording_load)
    fid_module._load_inception.cache_clear()
    net, digest = fid_module.load_inception(path)
    fid_module._load_inception.cache_clear()

    assert not marker.exists()
    # The digest is of the bytes that were loaded, not of the swapped file.
    assert digest == sha256(inception)[:16]
    user = {str(path), str(path.resolve())}
    assert [w for f, w in calls if isinstance(f, str | os.PathLike) and str(f) in user] == []  # never by path
    assert [w for _, w in calls].count(True) == 1  # the user's bytes: once, as plain tensors
    assert all(isinstance(f, io.BytesIO) for f, _ in calls)  # torch-fidelity's own load gets our buffer
    state = net.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in original)


def test_inception_payload_file_is_refused(tmp_path):
    from evaluators.fid import load_inception

    marker = tmp_path / "PWNED"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump(Payload(marker, {}), f)
    with pytest.raises(BenchError, match=r"evil\.pth is not the FID Inception-v3.*plain state dict"):
        load_inception(tmp_path / "evil.pth")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# 3. A diverged method: a failed run with a clear error, not a segfault


def test_non_finite_images_or_features_raise_before_any_linear_algebra():
    from evaluators.fid import frechet_distance, frechet_from_features

    class Judge(torch.nn.Module):
        num_features = 4

        def forward_features(self, x):
            return x.flatten(1)[:, :4] * 1e300

    real = torch.rand(6, 1, 4, 4)
    fake = real.clone()
    fake[2, 0, 1, 1] = float("nan")
    with pytest.raises(
        BenchError, match=r"non-finite images \(NaN or inf in 1 of 6 generated images\).*diverged"
    ):
        frechet_distance(Judge(), real, fake, device="cpu")
    with pytest.raises(BenchError, match="non-finite judge features"):
        frechet_distance(Judge(), real, real + 1, device="cpu")  # finite images, features overflowing
    feats = np.random.default_rng(0).normal(size=(5, 8))
    bad = feats.copy()
    bad[0, 0] = np.inf
    with pytest.raises(BenchError, match="non-finite Inception features of the generated images"):
        frechet_from_features(feats, bad)


@pytest.mark.slow
def test_diverged_method_fails_its_run_clearly_and_the_sweep_goes_on(tmp_path, fmnist_dir, monkeypatch):
    from bench.cli import main

    results = tmp_path / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BENCH_MODEL_DIR": str(tmp_path / "models"),
           "BENCH_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}  # fmt: skip
    env.pop("BENCH_DATA_DIR", None)

    common = ["--preset", "smoke", "--set", "sfd.lr_generator=1e30", "--results", str(results),
              "--data-dir", str(fmnist_dir.parent)]  # fmt: skip
    argv = [sys.executable, "-m", "bench", "run", "--methods", "sfd,original", *common]
    first = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 2, first.stderr[-3000:]  # not 139 (SIGSEGV in MKL)
    runs = {p.name.split("-")[0]: p for p in (results / "runs").iterdir()}
    assert store.is_done(runs["original"]) and not store.is_done(runs["sfd"])
    error = (runs["sfd"] / "error.txt").read_text()
    assert "BenchError: the model produced non-finite images" in error and "diverged" in error
    assert "sfd" in first.stderr + first.stdout

    # The model was saved before sampling: the rerun fails the same clear way (in this process now that it is known
    # not to crash).
    assert (runs["sfd"] / "model" / "unlearn.json").is_file()
    (runs["sfd"] / "error.txt").unlink()
    for key in ("BENCH_MODEL_DIR", "BENCH_CACHE_DIR"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.delenv("BENCH_DATA_DIR", raising=False)
    assert main(["run", "--methods", "sfd", *common]) == 2
    assert "the model produced non-finite images" in (runs["sfd"] / "error.txt").read_text()


# ---------------------------------------------------------------------------------------------------------------
# 5. Checksums on run models, state dumps, SA caches and model stores


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, fmnist_dir):
    """An `original` smoke run interrupted in evaluation: its model is saved, nothing else is done."""
    mp = pytest.MonkeyPatch()
    fid_cls = EVALUATORS.get("fid")

    def die(self, samples, ctx):
        raise Interrupt

    mp.setattr(fid_cls, "__call__", die)
    results = tmp_path_factory.mktemp("saved")
    spec = RunSpec(method="original", dataset="fashion-mnist", forget_set="class-0", seed=0, preset="smoke")
    runtime = Runtime(data_dir=fmnist_dir.parent, progress=False)
    try:
        with pytest.raises(Interrupt):
            execute(spec, results, runtime)
    finally:
        mp.undo()
    d = store.run_dir(results, spec.run_id)
    assert (d / "model" / "unlearn.json").is_file() and not store.is_done(d)
    return results, spec, runtime


def copy_run(saved_run, dst: Path):
    results, spec, runtime = saved_run
    shutil.copytree(results, dst)
    return store.run_dir(dst, spec.run_id), spec, runtime


def test_run_model_records_its_checksums_and_resumes_when_intact(saved_run, tmp_path):
    d, spec, runtime = copy_run(saved_run, tmp_path / "ok")
    record = json.loads((d / "model" / "unlearn.json").read_text())
    assert set(record["files"]) == {
        "sampler.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    }
    assert record["files"]["sampler.json"] == sha256(d / "model" / "sampler.json")
    execute(spec, tmp_path / "ok", runtime)
    assert store.is_done(d)


@pytest.mark.parametrize(
    "damage, match",
    [
        (
            "weights",
            r"model/unet/diffusion_pytorch_model\.safetensors does not match its checksum in .*unlearn\.json",
        ),
        ("sampler", r"model/sampler\.json does not match its checksum"),
        (
            "extra",
            r"model/unet/diffusion_pytorch_model\.safetensors\.index\.json is not listed in .*unlearn\.json",
        ),
        ("missing", r"model/unet/config\.json is missing"),
        ("no-record", r"unlearn\.json records no file checksums"),
        ("broken-record", r"cannot read the run model's record .*unlearn\.json"),
    ],
)
def test_damaged_run_model_is_named_and_the_fix_said(saved_run, tmp_path, damage, match):
    d, spec, runtime = copy_run(saved_run, tmp_path / damage)
    model = d / "model"
    if damage == "weights":
        flip(model / "unet" / "diffusion_pytorch_model.safetensors")
    elif damage == "sampler":
        (model / "sampler.json").write_text(json.dumps({"kind": "one-step", "t_init": 440}))
    elif damage == "extra":
        (model / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text("{}")
    elif damage == "missing":
        (model / "unet" / "config.json").unlink()
    elif damage == "no-record":
        (model / "unlearn.json").write_text(json.dumps({"unlearn_s": 1.0}))
    else:
        flip(model / "unlearn.json", 0, 1)
    with pytest.raises(BenchError, match=match) as e:
        execute(spec, tmp_path / damage, runtime)
    assert "--force" in str(e.value)
    assert not store.is_done(d)


@pytest.mark.slow  # 5 s: in the slow set, still in CI
def test_finished_runs_model_is_checked_when_loaded_again(saved_run, tmp_path):
    d, spec, runtime = copy_run(saved_run, tmp_path / "done")
    execute(spec, tmp_path / "done", runtime)
    model_store.load_run_model(d / "model")  # intact
    flip(d / "model" / "unet" / "diffusion_pytorch_model.safetensors", n=1)
    with pytest.raises(BenchError, match="diffusion_pytorch_model.safetensors does not match its checksum"):
        model_store.load_run_model(d / "model")


def test_state_dump_is_checked_against_its_record(tmp_path, fmnist_dir, monkeypatch):
    ctx = tiny_context(tmp_path / "run", fmnist_dir.parent)
    ctx.save_state({"w": torch.arange(1000.0), "step": 2})
    record = ctx.state_path.with_name("state.pt.json")
    assert json.loads(record.read_text())["sha256"] == sha256(ctx.state_path)
    assert ctx.load_state()["step"] == 2

    # A kill between the record and the dump's rename leaves the previous dump, which still matches.
    real_replace = os.replace

    def killed(src, dst):
        if str(dst).endswith("state.pt"):
            raise Interrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(Interrupt):
        ctx.save_state({"w": torch.zeros(1000), "step": 4})
    monkeypatch.setattr(os, "replace", real_replace)
    assert tiny_context(tmp_path / "run", fmnist_dir.parent).load_state()["step"] == 2

    flip(ctx.state_path, n=4)
    with pytest.raises(BenchError, match=r"state/state\.pt does not match its checksum in .*state\.pt\.json.*"
                                         r"delete the folder .*state.*--force"):  # fmt: skip
        tiny_context(tmp_path / "run", fmnist_dir.parent).load_state()
    record.unlink()
    with pytest.raises(BenchError, match=r"state/state\.pt has no readable checksum record"):
        tiny_context(tmp_path / "run", fmnist_dir.parent).load_state()


def test_sa_cache_is_checked_and_a_damaged_one_named(tmp_path):
    from bench.models.cache import cached_tensors

    def _cached(path, compute):
        return cached_tensors(path, compute, what="SA")

    path = tmp_path / "sa" / "abc" / "replay-x.safetensors"
    calls = []

    def compute():
        calls.append(1)
        return {"images": torch.arange(64.0).view(4, 16), "labels": torch.arange(4)}

    first = _cached(path, compute)
    again = _cached(path, compute)
    assert len(calls) == 1 and torch.equal(first["images"], again["images"])
    assert json.loads((path.parent / "replay-x.safetensors.json").read_text())["sha256"] == sha256(path)
    flip(path, n=4)
    with pytest.raises(BenchError, match=r"replay-x\.safetensors does not match its checksum.*delete"):
        _cached(path, compute)
    path.write_bytes(path.read_bytes()[:20])  # truncated: named too, not a bare SafetensorError
    with pytest.raises(BenchError, match=r"replay-x\.safetensors does not match its checksum"):
        _cached(path, compute)
    (path.parent / "replay-x.safetensors.json").unlink()  # an entry of an older version: computed again
    _cached(path, compute)
    assert len(calls) == 2 and _cached(path, compute)["labels"].tolist() == [0, 1, 2, 3]


@pytest.fixture
def store_copy(tmp_path):
    src = model_store.model_dir(model_store.SHIPPED, "fashion-mnist", "default", 0)
    return Path(shutil.copytree(src, tmp_path / "seed0"))


def test_shipped_store_verifies_and_tolerates_lock_files(store_copy):
    model_store.verify(model_store.model_dir(model_store.SHIPPED, "fashion-mnist", "default", 0))
    (store_copy / ".judge.lock").write_text("")
    (store_copy / "teacher_state.pt").write_bytes(b"leftover of a pretraining killed after its manifest")
    model_store.verify(store_copy)


def test_store_file_missing_from_the_manifest_is_rejected(store_copy):
    manifest = json.loads((store_copy / "MANIFEST.json").read_text())
    del manifest["files"]["teacher/unet/diffusion_pytorch_model.safetensors"]
    (store_copy / "MANIFEST.json").write_text(json.dumps(manifest))
    flip(store_copy / "teacher" / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(BenchError, match=r"teacher/unet/diffusion_pytorch_model\.safetensors is not listed in "
                                         r".*MANIFEST\.json"):  # fmt: skip
        model_store.verify(store_copy)


def test_store_extra_file_and_manifest_without_files_are_named(store_copy):
    (store_copy / "teacher" / "unet" / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(BenchError, match=r"extra\.safetensors is not listed in .*MANIFEST\.json"):
        model_store.verify(store_copy)
    (store_copy / "teacher" / "unet" / "extra.safetensors").unlink()
    manifest = json.loads((store_copy / "MANIFEST.json").read_text())
    del manifest["files"]
    (store_copy / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(BenchError, match=r"MANIFEST\.json lists no \"files\""):
        model_store.verify(store_copy)


def test_judge_trained_alone_is_checked(tmp_path):
    from bench.models.judge import JudgeCNN

    d = tmp_path / "judge"
    model_store.save_judge(JudgeCNN(in_chans=1, num_classes=10, widths=(4, 8)), d, widths=(4, 8))
    model_store.write_judge_checksums(d)
    model_store.load_judge(d)
    flip(d / "model.safetensors")
    with pytest.raises(
        BenchError, match=r"judge/model\.safetensors does not match its checksum in .*checksums"
    ):
        model_store.load_judge(d)


# ---------------------------------------------------------------------------------------------------------------
# 8. Weight files follow the umask


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def modes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): oct(p.stat().st_mode & 0o777) for p in root.rglob("*") if p.is_file()}


def test_share_follows_the_umask(tmp_path):
    from safetensors.torch import save_file

    from bench.files import share

    old = os.umask(0o007)
    try:
        save_file({"x": torch.zeros(2)}, tmp_path / "a.safetensors")
        assert oct((tmp_path / "a.safetensors").stat().st_mode & 0o777) == "0o600"  # what safetensors does
        share(tmp_path / "a.safetensors")
        assert oct((tmp_path / "a.safetensors").stat().st_mode & 0o777) == "0o660"
    finally:
        os.umask(old)


@pytest.mark.slow
def test_run_folder_and_sa_cache_files_are_0644_under_umask_022(umask_022, tmp_path, fmnist_dir, monkeypatch):
    monkeypatch.setenv("BENCH_MODEL_DIR", str(tmp_path / "models"))
    runtime = Runtime(data_dir=fmnist_dir.parent, progress=False, checkpoint_every=1)
    spec = RunSpec(method="sa", dataset="fashion-mnist", forget_set="class-0", seed=0, preset="smoke")
    d = execute(spec, tmp_path / "results", runtime)
    assert store.is_done(d)
    written = {**modes(d), **{f"models/{k}": v for k, v in modes(tmp_path / "models").items()}}
    assert any(k.endswith(".safetensors") for k in written if k.startswith("models/sa/"))
    assert "model/unet/diffusion_pytorch_model.safetensors" in written and "samples.safetensors" in written
    assert {k: v for k, v in written.items() if v != "0o644"} == {}


def test_pretrained_store_files_are_0644_under_umask_022(umask_022, tmp_path, fmnist_dir):
    from bench.data.fashion_mnist import FashionMNIST
    from bench.presets import JudgeRecipe, get_preset
    from bench.pretrain import pretrain
    from tests.helpers import TINY

    tiny = dataclasses.replace(
        get_preset("smoke"), name="tiny", models_from="", image_size=8, sampler_steps=2,
        teacher=dataclasses.replace(TINY, steps=2, batch_size=8, warmup_steps=1),
        judge=JudgeRecipe(widths=(4, 8), epochs=1, batch_size=50, lr=1e-2),
    )  # fmt: skip
    ds = FashionMNIST(data_dir=fmnist_dir.parent, image_size=8)
    out = pretrain(ds, tiny, seed=0, out_root=tmp_path, device=torch.device("cpu"), check_per_class=1)
    model_store.verify(out)
    written = modes(out)
    assert (
        "judge/model.safetensors" in written and "teacher/unet/diffusion_pytorch_model.safetensors" in written
    )
    assert {k: v for k, v in written.items() if v != "0o644"} == {}
    assert not (out / "teacher_state.pt.json").exists()  # the state dump's record goes with it
