"""The text-conditional tier's foundations (issue 17.1): the offline CLIP tokenizer, the captions and their
held-out split, the tiny text-to-image teacher, its resumable training and its judge check per prompt kind."""

from __future__ import annotations

import dataclasses
import gzip
import json

import pytest
import torch

from bench.errors import BenchError
from bench.text import tokenizer
from bench.text.captions import FASHION_MNIST, NULL_PROMPT, fill
from bench.text.model import TEXT_RECIPES, PromptEncoder, TextDiffusionModel, build_text_unet

SMOKE = TEXT_RECIPES["smoke"]


# The tokenizer -----------------------------------------------------------------------------------------------------


def test_the_tokenizer_is_clips_real_vocabulary():
    """The ids are OpenAI CLIP's (and Stable Diffusion 1.x's): 49,408 tokens, start 49406, end and pad 49407."""
    tok = tokenizer.clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.convert_ids_to_tokens(tok("an ankle boot").input_ids) == [
        "<|startoftext|>", "an</w>", "ankle</w>", "boot</w>", "<|endoftext|>"]  # fmt: skip
    assert tok("T-Shirt").input_ids == tok("t-shirt").input_ids  # CLIP lower-cases
    padded = tok("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[3:] == [49407] * 74


def test_a_damaged_vocabulary_file_is_named(tmp_path):
    broken = tmp_path / "bpe.txt.gz"
    broken.write_bytes(gzip.compress(b"#version\na b\n"))  # far fewer merges than CLIP's
    with pytest.raises(BenchError, match=r"bpe\.txt\.gz.*48894 merges"):
        tokenizer.vocab_and_merges(broken)
    broken.write_bytes(b"not gzip")
    with pytest.raises(BenchError, match=r"bpe\.txt\.gz is missing or damaged"):
        tokenizer.vocab_and_merges(broken)


# The captions ------------------------------------------------------------------------------------------------------


def test_held_out_prompts_are_new_strings_made_of_trained_tokens():
    """A from-scratch text encoder only knows tokens it trained on: every held-out prompt is unseen as a string,
    and every token of it occurs in the training captions."""
    tok = tokenizer.clip_tokenizer()
    train = {p for k in range(10) for p in FASHION_MNIST.prompts(k, "train")}
    trained_tokens = {i for p in train for i in tok(p).input_ids}
    for k in range(10):
        held_out = FASHION_MNIST.prompts(k, "paraphrase")
        assert held_out and not set(held_out) & train
        for p in held_out:
            assert set(tok(p).input_ids) <= trained_tokens, p
    names = [n for c in FASHION_MNIST.concepts for n in (*c.names, *c.held_out)]
    assert len(names) == len(set(names))  # no name stands for two classes


def test_prompt_kinds_and_the_article():
    c = FASHION_MNIST
    assert c.index("ankle-boot") == 9 and "a photo of an ankle boot" in c.prompts(9, "train")
    assert fill("a small {}", "overcoat") == "a small overcoat" and fill("{}", "ankle boot") == "ankle boot"
    assert fill("a {}", "ankle boot") == "an ankle boot"
    assert set(c.prompts(0, "neighbour")) == set(c.prompts(6, "train")) | set(c.prompts(2, "train"))
    assert all(k not in concept.neighbours for k, concept in enumerate(c.concepts))
    with pytest.raises(BenchError, match="unknown concept 'hat'; valid: t-shirt, trouser"):
        c.index("hat")
    with pytest.raises(BenchError, match="valid: train, paraphrase, neighbour"):
        c.prompts(0, "attack")


def test_training_prompts_follow_their_labels_and_the_generator():
    labels = torch.tensor([0, 9, 9, 3])
    a = FASHION_MNIST.training_prompts(labels, torch.Generator().manual_seed(1))
    assert a == FASHION_MNIST.training_prompts(labels, torch.Generator().manual_seed(1))
    for k, p in zip(labels.tolist(), a, strict=True):
        assert p in FASHION_MNIST.prompts(k, "train")


# The model ---------------------------------------------------------------------------------------------------------


def tiny_model() -> TextDiffusionModel:
    torch.manual_seed(0)
    encoder = PromptEncoder.build(FASHION_MNIST.every_prompt(), width=SMOKE.text_width, layers=SMOKE.text_layers,
                                  heads=SMOKE.text_heads)  # fmt: skip
    return TextDiffusionModel(build_text_unet(SMOKE, image_size=8, channels=1), encoder)


def test_the_encoder_keeps_a_row_per_caption_token_and_one_for_the_rest(tmp_path):
    model = tiny_model()
    enc = model.encoder
    tok = tokenizer.clip_tokenizer()
    caption_tokens = {i for p in FASHION_MNIST.every_prompt() for i in tok(p).input_ids}
    assert (
        set(enc.token_ids) == caption_tokens and enc.text_model.config.vocab_size == len(caption_tokens) + 1
    )
    rows = enc.rows(["a photo of a tee", "a photo of a zebra"])
    assert rows.shape == (2, 77) and (rows[0] > 0).all() and rows[1, 5] == 0  # "zebra" is no caption token
    hidden = enc(["a photo of a tee", NULL_PROMPT])
    assert hidden.shape == (2, 77, SMOKE.text_width)
    model.save(tmp_path / "teacher")
    again = TextDiffusionModel.load(tmp_path / "teacher")
    assert torch.equal(again.encoder(["the bag"]), enc(["the bag"]))
    # Stable Diffusion's layout: the cross-attention that ESD-x trains and UCE edits is attn2, keyed by the text.
    assert any(n.endswith("attn2.to_k.weight") for n, _ in model.unet.named_parameters())
    tokens = tmp_path / "teacher" / "text_encoder" / "tokens.json"
    tokens.write_text(json.dumps({"clip_bpe_ids": enc.token_ids[:-1]}))
    with pytest.raises(BenchError, match="cannot load the text encoder in .*tokens for"):
        TextDiffusionModel.load(tmp_path / "teacher")
    tokens.write_text("{")
    with pytest.raises(BenchError, match="cannot load the text encoder in"):
        TextDiffusionModel.load(tmp_path / "teacher")


def test_sampling_pairs_images_by_seed_and_guidance_uses_the_null_prompt():
    model = tiny_model()
    prompts = ["a photo of a tee", "the bag", "a small boot"]
    kw = {"steps": 2, "guidance": 3.0}
    both = model.sample(prompts, [5, 6, 7], **kw)
    alone = model.sample(prompts[1:2], [6], **kw)
    assert both.shape == (3, 1, 8, 8) and torch.allclose(both[1], alone[0], atol=1e-5)
    assert not torch.allclose(model.sample(prompts, [5, 6, 7], steps=2, guidance=1.0), both)
    assert model.nfe(steps=10, guidance=3.0) == 20 and model.nfe(steps=10, guidance=1.0) == 10


# Training and the judge check --------------------------------------------------------------------------------------


def test_a_killed_training_resumes_to_the_same_weights(tmp_path, fmnist_dir):
    from bench.data import make_dataset
    from bench.text.pretrain import train_text_teacher

    ds = make_dataset("fashion-mnist-text", data_dir=fmnist_dir.parent, image_size=8)
    recipe = dataclasses.replace(SMOKE, steps=4)
    kw = {"seed": 3, "device": torch.device("cpu"), "checkpoint_every": 2}
    whole = train_text_teacher(ds, ds.captions, recipe, state_path=tmp_path / "a.pt", **kw)
    train_text_teacher(
        ds, ds.captions, dataclasses.replace(recipe, steps=2), state_path=tmp_path / "b.pt", **kw
    )
    resumed = train_text_teacher(ds, ds.captions, recipe, state_path=tmp_path / "b.pt", **kw)  # from step 2
    for a, b in zip(whole.unet.parameters(), resumed.unet.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(whole.encoder(["a tee"]), resumed.encoder(["a tee"]))
    assert not torch.equal(
        whole.encoder(["a tee"]), whole.raw.encoder(["a tee"])
    )  # EMA beside the raw weights


def test_pretraining_writes_a_checked_store_folder_with_the_judge_check_per_prompt_kind(tmp_path, fmnist_dir):
    from bench.data import make_dataset
    from bench.models import store
    from bench.presets import get_preset
    from bench.text.pretrain import pretrain_text

    ds = make_dataset("fashion-mnist-text", data_dir=fmnist_dir.parent, image_size=16)
    preset = dataclasses.replace(get_preset("smoke"), models_from="")
    out = pretrain_text(ds, preset, dataclasses.replace(SMOKE, steps=2), seed=0, out_root=tmp_path,
                        device=torch.device("cpu"), check_per_class=2)  # fmt: skip
    manifest = store.verify(out)
    assert manifest["judge"] == "fashion-mnist/default/seed0/judge"  # the image dataset's shipped judge
    checked = manifest["teacher_recognised"]
    for kind in ("train", "paraphrase"):
        assert len(checked[kind]["per_class"]) == 10 and all(0 <= v <= 1 for v in checked[kind]["per_class"])
    assert checked["per_class_n"] == 2 and "fashion-mnist-text --preset smoke" in manifest["command"]
    teacher = TextDiffusionModel.load(out / "teacher")
    assert json.loads((out / "teacher" / "sampler.json").read_text()) == {"kind": "text-diffusion"}
    assert teacher.raw is not None and teacher.raw.raw is None
    assert not torch.equal(teacher.encoder(["a tee"]), teacher.raw.encoder(["a tee"]))
