"""The text tier's zero-shot CLIP judge (`--judge clip --clip-model DIR`, bench/text/zero_shot.py): CLIP's prompt
ensemble over each concept's names and templates, CLIP's own logits, its image embeddings as fd_judge's features;
through the command line it replaces the trained judge, in the runs' identity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.data.fashion_mnist import FashionMNISTText
from bench.models.judge import judge_probs
from bench.text.captions import FASHION_MNIST
from bench.text.zero_shot import ZeroShotJudge, zero_shot_judge
from tests.fixtures_real import write_tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return str(write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip"))


def test_with_the_tiers_tiny_clip_it_recognises_real_images(fmnist_dir):
    """The shipped tiny CLIP, used zero-shot over the ten concepts' names, labels real test images far above chance
    (measured 87.1% on the 10,000 real test images, the trained judge 90.8%; 10% is chance)."""
    from bench.text.clip import find_clip, load_tiny_clip

    clip, processor = load_tiny_clip(str(find_clip("fashion-mnist-text", "default", 0)))
    x, y = FashionMNISTText(data_dir=fmnist_dir.parent, image_size=16).images("test")
    judge = ZeroShotJudge(clip, processor, FASHION_MNIST)
    assert (judge_probs(judge, x).argmax(-1) == y).float().mean() >= 0.7


def test_its_classes_are_clips_prompt_ensembles_and_its_logits_clips_own(clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    judge = zero_shot_judge(clip_dir, FASHION_MNIST)
    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    prompts = [t.format(n) for t in FASHION_MNIST.templates for n in FASHION_MNIST.concepts[1].names]
    with torch.no_grad():
        tok = processor(text=prompts, return_tensors="pt", padding=True)
        text = model.get_text_features(**tok)
        text = text if torch.is_tensor(text) else text.pooler_output
        assert torch.allclose(
            judge.classes[1], F.normalize(F.normalize(text, dim=-1).mean(0), dim=-1), atol=1e-5
        )
        x = torch.rand(3, 1, 16, 16) * 2 - 1
        feats, logits = judge.forward_features(x), judge(x)
    assert feats.shape == (3, 16) and logits.shape == (3, 10)
    scale = model.logit_scale.exp()
    assert torch.allclose(logits, scale * F.normalize(feats, dim=-1) @ judge.classes.T, atol=1e-4)


@pytest.mark.slow  # 15 s: two smoke runs; in the slow set, still in CI
def test_bench_run_takes_it_on_the_text_tier_only_with_a_clip(clip_dir, fmnist_dir, tmp_path, capsys):
    from bench.cli import main
    from bench.store import load_results

    base = ["run", "--datasets", "fashion-mnist-text", "--forget-sets", "concept-trouser", "--preset", "smoke",
            "--methods", "original", "--data-dir", str(fmnist_dir.parent), "--results", str(tmp_path / "r")]  # fmt: skip
    assert main([*base, "--judge", "clip"]) == 2
    assert "--judge clip needs --clip-model DIR" in capsys.readouterr().err
    assert main(["run", "--datasets", "fashion-mnist", "--judge", "clip", "--clip-model", clip_dir,
                 "--dry-run"]) == 2  # fmt: skip
    assert "the text tier's" in capsys.readouterr().err
    zero_shot = [*base, "--judge", "clip", "--clip-model", clip_dir, "--evaluators", "forget_accuracy,fid"]
    assert main(zero_shot) == 0 and main([*base, "--evaluators", "forget_accuracy,fid"]) == 0
    df = load_results(tmp_path / "r")
    assert df.run_id.nunique() == 2  # another judge, another run
    fd = df[df.metric == "fd_judge"]
    assert len(fd) == 2 and fd.value.nunique() == 2  # in CLIP's features, not the trained judge's
    import json

    judges = {json.loads(p.read_text())["teacher"]["judge"] for p in (tmp_path / "r").rglob("spec.json")}
    assert any(j.startswith("zero-shot CLIP ") for j in judges) and len(judges) == 2
