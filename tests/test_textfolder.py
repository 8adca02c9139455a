"""`textfolder:PATH` (issue 17, item 5: what a user brings for concepts of their own): an image folder with a
captions.json naming each class's words. Its forget sets are its concepts, its judge the image folder's (trained
on those images when the store has none), and a run unlearns them on the tiny text teacher trained on the folder or
on a Stable Diffusion folder given with --teacher."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from bench.data import make_dataset
from bench.errors import BenchError

CLASSES = ("circle", "cross", "square")
CAPTIONS = {
    "templates": ["a drawing of a {}", "a {}"],
    "held_out_templates": ["a sketch of a {}"],
    "concepts": {
        "circle": {"names": ["circle", "ring"], "held_out": ["round ring"], "neighbours": ["square"]},
        "cross": {"names": ["cross", "plus"]},
        "square": {"names": ["square", "box"], "held_out": ["square box"], "neighbours": ["circle"]},
    },
}


def write_textfolder(root, captions=CAPTIONS, per_class=12):
    """root/train/<class>/*.png of 20x20 grayscale shapes (decoded at the preset's 16x16) and root/captions.json."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:20, :20] - 9.5
    shapes = {"circle": np.abs(np.hypot(yy, xx) - 6) < 1.5, "cross": (np.abs(yy) < 2) | (np.abs(xx) < 2),
              "square": np.maximum(np.abs(yy), np.abs(xx)) < 7}  # fmt: skip
    for c in CLASSES:
        (root / "train" / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = shapes[c] * 200 + rng.integers(0, 40, (20, 20))
            Image.fromarray(img.clip(0, 255).astype(np.uint8), mode="L").save(
                root / "train" / c / f"{i:03d}.png"
            )
    (root / "captions.json").write_text(json.dumps(captions))
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_textfolder(tmp_path_factory.mktemp("tf") / "shapes")


def test_its_concepts_are_the_class_folders_under_their_words(folder):
    ds = make_dataset(f"textfolder:{folder}", image_size=16)
    ds.check()
    assert ds.tier == "text" and ds.channels == 1 and ds.image_size == 16 and ds.class_names == CLASSES
    assert ds.forget_sets() == ["concept-circle", "concept-cross", "concept-square"]
    fs = ds.forget_set("concept-circle")
    assert (
        fs.forget == (0,) and fs.anchor == 1 and fs.names() == ("circle", "ring") and fs.neighbours() == (2,)
    )
    assert fs.forget_prompts() == ["a drawing of a circle", "a drawing of a ring", "a circle", "a ring"]
    assert set(ds.captions.prompts(0, "paraphrase")) == {
        "a sketch of a circle", "a sketch of a ring", "a sketch of a round ring", "a drawing of a round ring",
        "a round ring"}  # fmt: skip
    assert ds.forget_set("class-1").name == "concept-cross"
    assert ds.image_dataset == make_dataset(f"imagefolder:{folder}", image_size=16).name  # the judge's images
    assert ds.name.startswith("textfolder-shapes-") and ds.name != ds.image_dataset


def test_only_the_main_guidance_is_sampled_as_on_every_text_dataset(folder):
    from bench.presets import get_preset
    from bench.runner import guidances

    preset = get_preset("default")
    assert guidances(preset, f"textfolder:{folder}") == (preset.guidance,)
    assert guidances(preset, f"imagefolder:{folder}") == preset.conditions


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (None, "captions.json not found; it names each class folder's words"),
        ({"concepts": {**CAPTIONS["concepts"], "triangle": {"names": ["triangle"]}}}, "no such folder: triangle"),
        ({"concepts": {k: v for k, v in CAPTIONS["concepts"].items() if k != "cross"}}, "missing: cross"),
        ({"templates": ["a drawing"]}, "template 'a drawing' needs exactly one {}"),
        ({"held_out_templates": []}, "held_out_templates needs at least 1"),
        ({"concepts": {**CAPTIONS["concepts"], "cross": {"names": []}}}, "cross.names needs at least 1"),
        ({"concepts": {**CAPTIONS["concepts"], "cross": {"names": ["x"], "neighbors": []}}},
         "concept 'cross' takes \"names\", \"held_out\" and \"neighbours\""),
        ({"concepts": {**CAPTIONS["concepts"], "cross": {"names": ["x"], "neighbours": ["star"]}}},
         "cross.neighbours names star: not another class folder"),
    ],
)  # fmt: skip
def test_a_bad_captions_file_says_what_is_wrong(tmp_path, change, message):
    root = write_textfolder(tmp_path / "bad", per_class=2)
    if change is None:
        (root / "captions.json").unlink()
    else:
        (root / "captions.json").write_text(json.dumps({**CAPTIONS, **change}))
    with pytest.raises(BenchError, match=message.replace("{", r"\{").replace("}", r"\}")):
        make_dataset(f"textfolder:{root}", image_size=16).check()


@pytest.mark.slow  # about 10 s: in the slow set, still in CI
def test_runs_on_it_train_its_judge_once_and_unlearn_on_either_teacher(folder, tmp_path, caplog):
    """Without --teacher the tiny text teacher is trained on the folder; with a Stable Diffusion folder that
    decodes to its image size, that is unlearned. Both are scored by one judge of the folder's images, trained
    once and then reused, on every prompt kind."""
    import logging

    from bench.cli import main
    from bench.store import load_results
    from tests.test_text_stable_diffusion import tiny_pipeline

    sd_dir = tiny_pipeline(tmp_path / "tiny-sd")

    def missing(teacher):  # what a SLURM sweep submits a models job for before its array
        from bench.config import RunSpec
        from bench.context import Runtime
        from bench.prerequisites import _models_missing

        spec = RunSpec(method="text-uce", dataset=f"textfolder:{folder}", forget_set="concept-circle", seed=0,
                       preset="smoke", teacher_path=teacher)  # fmt: skip
        return _models_missing(spec, Runtime())

    assert missing("") and missing(str(sd_dir))  # no judge of its images yet (nor a tiny teacher)
    base = ["run", "--datasets", f"textfolder:{folder}", "--forget-sets", "concept-circle", "--preset", "smoke",
            "--evaluators", "forget_accuracy"]  # fmt: skip
    with caplog.at_level(logging.INFO):
        assert main([*base, "--methods", "original", "--results", str(tmp_path / "tiny")]) == 0
        assert main([*base, "--methods", "text-uce,text-finetune", "--teacher", str(sd_dir),
                     "--results", str(tmp_path / "sd")]) == 0  # fmt: skip
    assert not missing("") and not missing(str(sd_dir))
    assert caplog.text.count("no judge for imagefolder-shapes-") == 1
    assert caplog.text.count("no text teacher for textfolder-shapes-") == 1
    subsets = {"forget", "retain", "forget-paraphrase", "retain-paraphrase", "neighbour"}
    for results, methods in (("tiny", {"original"}), ("sd", {"text-uce", "text-finetune"})):
        df = load_results(tmp_path / results)
        acc = df[df.metric == "accuracy"]
        assert set(acc.method) == methods and set(acc.subset) == subsets
        assert set(df.condition) == {"guidance 1"}  # the smoke preset's main guidance alone
