"""Real third-party weights from local paths: FID Inception-v3, CLIP (transformers 5 + torchmetrics) and external
diffusers teachers, each written by the test in the real format (random weights, real architecture)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import store
from bench.cli import _evaluators, main
from bench.errors import BenchError
from bench.models.store import check_external_teacher, load_external_teacher
from bench.presets import PRESETS
from evaluators import fid as fid_module
from evaluators.clip_score import check_clip_dir, clip_score, load_clip
from evaluators.fid import FID, frechet_from_features, load_inception
from tests.fixtures_real import (
    write_external_teacher,
    write_inception,
    write_tiny_clip,
)


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    return write_inception(tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


pytestmark = pytest.mark.usefixtures("isolated_stores")


# ---------------------------------------------------------------------------------------------------------------
# Inception FID


def test_inception_file_of_the_real_architecture_loads(inception):
    net, digest = load_inception(inception)
    assert len(net.state_dict()) >= 566 and len(digest) == 16
    assert os.path.getsize(inception) > 90e6  # like the real 95.7 MB file
    assert FID.resolve_options({"inception_weights": inception}) == {"inception_weights": str(inception)}


def test_wrong_inception_files_are_named(tmp_path):
    wrong = write_inception(tmp_path / "imagenet-1000.pth", num_classes=1000)
    with pytest.raises(
        BenchError, match=r"imagenet-1000.pth is not the FID Inception-v3.*different architecture.*fc"
    ):
        load_inception(wrong)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a pickled module, not a state dict
    with pytest.raises(BenchError, match="plain state dict"):
        load_inception(tmp_path / "module.pth")
    with pytest.raises(BenchError, match="no such file"):
        FID.resolve_options({"inception_weights": tmp_path / "absent.pth"})


def test_hub_cache_file_is_used_and_absence_is_said(inception, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="evaluators.fid"):
        assert FID.resolve_options({}) == {}
    assert "reporting only fd_judge" in caplog.text
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / inception.name).symlink_to(inception)
    assert FID.resolve_options({}) == {"inception_weights": str((hub / inception.name).resolve())}


def test_sample_space_frechet_equals_torch_fidelity():
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    rng = np.random.default_rng(0)
    for n, m in ((30, 20), (12, 40)):
        real, fake = rng.normal(size=(n, 64)), rng.normal(0.3, 1.5, size=(m, 64))
        stats = [fid_features_to_statistics(torch.from_numpy(f)) for f in (real, fake)]
        expected = fid_statistics_to_metric(*stats, verbose=False)[KEY_METRIC_FID]
        assert frechet_from_features(real, fake) == pytest.approx(expected, rel=1e-6)
    assert frechet_from_features(real, real) == pytest.approx(0, abs=1e-8)


def test_fid_inception_on_a_handful_of_images(inception, data_dir, monkeypatch):
    from bench.data.celeba import CelebAIdentity

    ds = CelebAIdentity(data_dir=data_dir, image_size=16)
    real, _ = ds.images("test", (0, 1))
    calls = []
    real_features = fid_module.inception_features
    monkeypatch.setattr(
        fid_module,
        "inception_features",
        lambda net, x, **k: calls.append(len(x)) or real_features(net, x, **k),
    )
    same = fid_module.fid_inception(ds, (0, 1), real, str(inception), device="cpu")
    noise = fid_module.fid_inception(
        ds, (0, 1), torch.rand(2, 3, 16, 16) * 2 - 1, str(inception), device="cpu"
    )
    assert same == pytest.approx(0, abs=1e-6 * noise) and noise > 0
    assert calls == [3, 2, 2]  # the 3 reference images once (then cached), the 2 generated ones each time
    assert len(list(Path(os.environ["BENCH_CACHE_DIR"]).glob("fid_inception/celeba-id-16px-test-*.npz"))) == 1


# ---------------------------------------------------------------------------------------------------------------
# CLIP score


def test_clip_score_is_torchmetrics_on_transformers5(clip_dir):
    model, processor = load_clip(str(clip_dir))
    images = torch.rand(3, 1, 16, 16) * 2 - 1  # grayscale: repeated to RGB
    prompts = ["a photo of a cat", "a photo of a dog", "a photo of a bird"]
    score = clip_score(model, processor, images, prompts, device="cpu")
    # Its definition, through the untouched transformers model: max(100 * mean cos(image, text), 0).
    rgb = [((x.repeat(3, 1, 1) + 1) * 127.5).round().to(torch.uint8) for x in images]
    inputs = processor(text=prompts, images=rgb, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.model(**inputs)
    expected = max(100 * (out.image_embeds * out.text_embeds).sum(-1).mean().item(), 0.0)
    assert score == pytest.approx(expected, abs=1e-4)


def test_clip_folder_checks(clip_dir, tmp_path):
    assert check_clip_dir(clip_dir) == clip_dir.resolve()
    teacher = write_external_teacher(tmp_path / "unet")
    with pytest.raises(BenchError, match="not 'clip'"):
        check_clip_dir(teacher)
    with pytest.raises(BenchError, match="cannot read config.json"):
        check_clip_dir(tmp_path / "absent")


def test_evaluator_defaults_and_options(clip_dir, inception):
    ns = dict(evaluators=None, inception_weights=None, clip_model=None)
    names, options = _evaluators(argparse.Namespace(**ns), ["class"])["class"]
    assert "clip_score" not in names and options == ()  # not a default without a model
    names, options = _evaluators(
        argparse.Namespace(**{**ns, "clip_model": clip_dir, "inception_weights": inception}), ["class"]
    )["class"]
    assert "clip_score" in names and dict(options) == {
        "clip_model": str(clip_dir),
        "inception_weights": str(inception),
    }
    with pytest.raises(BenchError, match="clip_score needs --clip-model DIR"):
        _evaluators(argparse.Namespace(**{**ns, "evaluators": ["clip_score"]}), ["class"])
    # The text tier ships its tiny CLIP: a default there with no option, beside a class tier without it.
    both = _evaluators(argparse.Namespace(**ns), ["class", "text"])
    assert "clip_score" in both["text"][0] and both["text"][1] == ()
    assert "clip_score" not in both["class"][0]


# ---------------------------------------------------------------------------------------------------------------
# External teachers


def test_external_teacher_folders(tmp_path):
    fits = dict(dataset="cifar10", image_size=16, channels=3, num_classes=10)
    plain = write_external_teacher(tmp_path / "plain")
    pipe = write_external_teacher(tmp_path / "pipe", pipeline=True)
    assert check_external_teacher(plain, **fits) == plain
    assert check_external_teacher(pipe, **fits) == pipe / "unet"
    teacher = load_external_teacher(pipe, **fits)
    assert teacher.image_shape == (3, 16, 16) and teacher.num_classes == 10
    x = teacher.sample(torch.tensor([0, 9]), [1, 2], steps=2, guidance=2.0)  # guidance uses the null class 10
    assert x.shape == (2, 3, 16, 16)


def test_external_teacher_that_does_not_fit(tmp_path):
    fits = dict(dataset="cifar10", image_size=16, channels=3, num_classes=10)
    with pytest.raises(BenchError, match=r"is 32x32.*needs 3 channels in and out, 16x16"):
        check_external_teacher(write_external_teacher(tmp_path / "big", image_size=32), **fits)
    with pytest.raises(
        BenchError, match=r"10 class embeddings.*11 class embeddings \(10 classes plus the null"
    ):
        check_external_teacher(write_external_teacher(tmp_path / "nonull", num_classes=9), **fits)
    with pytest.raises(BenchError, match="takes 1 channels"):
        check_external_teacher(write_external_teacher(tmp_path / "gray", channels=1), **fits)
    pipe = write_external_teacher(tmp_path / "pipe", pipeline=True)
    cfg = pipe / "scheduler" / "scheduler_config.json"
    cfg.write_text(
        json.dumps({**json.loads(cfg.read_text()), "beta_end": 0.012, "beta_schedule": "scaled_linear"})
    )
    with pytest.raises(BenchError, match="differs from the DDPM schedule"):
        check_external_teacher(pipe, **fits)
    for f in (tmp_path / "big").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(BenchError, match="no .safetensors"):
        check_external_teacher(tmp_path / "big", **{**fits, "image_size": 32})
    with pytest.raises(BenchError, match="expected a diffusers UNet2DModel folder"):
        check_external_teacher(tmp_path, **fits)


def test_cli_refuses_a_teacher_that_does_not_fit(data_dir, tmp_path, capsys):
    big = write_external_teacher(tmp_path / "big", image_size=32)
    argv = ["run", "--datasets", "cifar10", "--methods", "original", "--preset", "smoke", "--data-dir", str(data_dir),
            "--results", str(tmp_path / "results"), "--teacher", str(big)]  # fmt: skip
    assert main(argv) == 2
    assert "does not fit dataset cifar10" in capsys.readouterr().err
    assert not (tmp_path / "results").exists() and not (tmp_path / "models").exists()


# ---------------------------------------------------------------------------------------------------------------
# End to end with every weight given


def test_run_with_inception_clip_and_external_teacher(
    data_dir, inception, clip_dir, tmp_path, monkeypatch, capsys
):
    # Inception on a CPU takes about half a second per image, so the grid shrinks to 2 images per class.
    monkeypatch.setitem(PRESETS, "smoke", dataclasses.replace(PRESETS["smoke"], eval_per_class=2))
    teacher = write_external_teacher(tmp_path / "teacher", num_classes=3, pipeline=True)
    results = tmp_path / "results"
    argv = ["run", "--datasets", "celeba-id", "--forget-sets", "id-2880", "--methods", "original", "--preset", "smoke",
            "--data-dir", str(data_dir), "--results", str(results), "--evaluators", "forget_accuracy,fid,clip_score",
            "--inception-weights", str(inception), "--clip-model", str(clip_dir), "--teacher", str(teacher)]  # fmt: skip
    assert main(argv) == 0
    (run,) = results.glob("runs/*")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    got = {(r["metric"], r["subset"]): r for r in rows}
    assert {
        ("fid_inception", "retain"),
        ("fd_judge", "retain"),
        ("clip_score", "forget"),
        ("clip_score", "retain"),
    } <= set(got)
    assert got[("fid_inception", "retain")]["n"] == 4 and got[("clip_score", "forget")]["n"] == 2
    # with their intervals: a bootstrap over the images (CLIP) and over the generated samples (FID)
    fid, clip = got[("fid_inception", "retain")], got[("clip_score", "forget")]
    assert 0 <= fid["ci_low"] <= fid["ci_high"] and fid["ci_method"] == "bootstrap-200-shifted"
    assert clip["ci_low"] <= clip["value"] <= clip["ci_high"] and clip["ci_method"] == "bootstrap-1000"
    outcomes = store.read_outcomes(run)
    at = fid["condition"]  # the smoke preset's one sampling condition
    assert outcomes[store.outcome_key("fid_inception[retain]", at)][0].shape == (200,)
    assert outcomes[store.outcome_key("clip_score[forget]", at)][0].shape == (2,)
    spec = json.loads((run / "spec.json").read_text())
    assert spec["teacher_path"] == str(teacher) and spec["options"]["inception_weights"] == str(inception)
    assert spec["teacher"]["path"] == str(teacher)
    # The judge was trained alone into the store; no teacher was trained.
    judge = tmp_path / "models" / "celeba-id" / "smoke" / "seed0"
    assert (judge / "judge" / "model.safetensors").is_file() and not (judge / "MANIFEST.json").exists()
    # Without --teacher it is another run (the teacher is part of its identity); with it, the same one.
    capsys.readouterr()
    assert main([a for a in argv if a not in ("--teacher", str(teacher))] + ["--dry-run"]) == 0
    assert main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1 runs, 1 to do" in out and "1 runs, 0 to do" in out


@pytest.mark.slow
def test_full_command_with_weights(data_dir, inception, clip_dir, tmp_path):
    results = tmp_path / "results"
    argv = ["run", "--datasets", "cifar10,celeba", "--methods", "sfd", "--preset", "smoke",
            "--data-dir", str(data_dir), "--results", str(results), "--inception-weights", str(inception),
            "--clip-model", str(clip_dir)]  # fmt: skip
    assert main(argv) == 0
    rows = [
        json.loads(line) for p in results.glob("runs/*/metrics.jsonl") for line in p.read_text().splitlines()
    ]
    for ds in ("cifar10", "celeba"):
        for method in ("sfd",):
            mine = {(r["metric"], r["subset"]) for r in rows if r["dataset"] == ds and r["method"] == method}
            assert {("fid_inception", "retain"), ("clip_score", "forget"), ("clip_score", "retain")} <= mine
