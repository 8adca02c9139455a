"""The text tier's tiny CLIP (issue 17.4): its contrastive loss, its resumable training and store folder, torchmetrics'
CLIPScore over it, the shipped one's zero-shot check on real images, and clip_score on a text run."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torchmetrics.multimodal.clip_score import CLIPScore

from bench.errors import BenchError
from bench.models import store
from bench.text import clip
from bench.text.captions import FASHION_MNIST
from evaluators.clip_score import clip_scores

SMOKE = clip.CLIP_RECIPES["smoke"]


@pytest.fixture(scope="module")
def text_data(fmnist_dir):
    from bench.data import make_dataset

    return make_dataset("fashion-mnist-text", data_dir=fmnist_dir.parent, image_size=16)


@pytest.fixture(scope="module")
def shipped():
    found = clip.find_clip("fashion-mnist-text", "default", 0)
    assert found is not None and found.is_relative_to(store.SHIPPED)
    return clip.load_tiny_clip(str(found))


def test_the_contrastive_targets_are_every_same_class_pair():
    """Two images of class 0 and one of class 1: each class-0 row's target is half on each class-0 caption."""
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    scale = torch.tensor(10.0)
    logits = scale * img @ img.T
    t = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    expected = -(t * logits.log_softmax(-1)).sum(-1).mean()  # symmetric: logits.T == logits here
    assert clip.contrastive_loss(img, img, labels, scale).item() == pytest.approx(expected.item())
    # Aligned same-class embeddings are the optimum: any other text embedding scores a higher loss.
    assert clip.contrastive_loss(img, img.flip(0), labels, scale) > clip.contrastive_loss(
        img, img, labels, scale
    )


def test_a_killed_training_resumes_to_the_same_weights(tmp_path, text_data):
    full = clip.train_clip(text_data, FASHION_MNIST, SMOKE, seed=3, device=torch.device("cpu"),
                           state_path=tmp_path / "a.pt")  # fmt: skip
    half = dataclasses.replace(SMOKE, steps=SMOKE.steps // 2)
    clip.train_clip(
        text_data, FASHION_MNIST, half, seed=3, device=torch.device("cpu"), state_path=tmp_path / "b.pt"
    )
    resumed = clip.train_clip(text_data, FASHION_MNIST, SMOKE, seed=3, device=torch.device("cpu"),
                              state_path=tmp_path / "b.pt")  # fmt: skip
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full.logit_scale.item() <= math.log(SMOKE.max_logit_scale)


def test_pretraining_writes_a_checked_store_folder_that_loads_to_the_same_scores(tmp_path, text_data):
    out = clip.pretrain_clip(text_data, "smoke", seed=0, out_root=tmp_path, device=torch.device("cpu"))
    manifest = store.verify(out)
    assert manifest["command"].startswith(
        "bench pretrain --dataset fashion-mnist-text --preset smoke --seed 0 --clip"
    )
    check = manifest["check_on_test_images"]
    assert set(check) == {"train", "paraphrase"} and len(check["train"]["per_class"]) == 10
    assert not (out / "clip_state.pt").exists()
    model, processor = clip.load_tiny_clip(str(out))
    images = text_data.images("test")[0][:8]
    prompts = FASHION_MNIST.prompts(0, "train")[:8]
    again, _ = clip.TinyCLIP.load(out)
    assert torch.equal(clip_scores(model, processor, images, prompts, device="cpu"),
                       clip_scores(again, processor, images, prompts, device="cpu"))  # fmt: skip
    (out / "projection.safetensors").write_bytes(b"broken")
    clip.load_tiny_clip.cache_clear()
    with pytest.raises(BenchError, match=r"projection\.safetensors does not match its checksum"):
        clip.load_tiny_clip(str(out))
    with pytest.raises(BenchError, match="no tiny-CLIP recipe for preset 'paper'; valid: default, smoke"):
        clip.pretrain_clip(text_data, "paper", seed=0, out_root=tmp_path, device=torch.device("cpu"))


def test_clip_score_is_torchmetrics_clipscore_over_the_tiny_clip(shipped, text_data):
    """The per-image scores the evaluator reports average to what torchmetrics' CLIPScore computes with the tiny
    CLIP handed to it as a (model, processor) pair."""
    model, processor = shipped
    images, labels = text_data.images("test")
    images, labels = images[:40], labels[:40]
    prompts = [FASHION_MNIST.prompts(k, "train")[i % 18] for i, k in enumerate(labels.tolist())]
    metric = CLIPScore(model_name_or_path=lambda: (model, processor))
    uint8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)
    metric.update(list(uint8), prompts)
    ours = clip_scores(model, processor, images, prompts, device="cpu")
    assert metric.compute().item() == pytest.approx(max(ours.mean().item(), 0.0), abs=1e-3)


def test_the_shipped_clip_matches_real_images_to_their_class_under_training_and_held_out_words(
    shipped, text_data
):
    """On the 500 real fixture images: zero-shot accuracy far above chance (10%) with the training prompts and
    with the paraphrases it never trained on, and an image scores higher against its own class's prompts."""
    model, _ = shipped
    check = clip.clip_check(model, text_data, FASHION_MNIST)
    assert check["train"]["zero_shot_accuracy"] > 0.8
    assert check["paraphrase"]["zero_shot_accuracy"] > 0.7
    for kind in ("train", "paraphrase"):
        assert check[kind]["score_own_class"] > check[kind]["score_other_classes"] + 10
