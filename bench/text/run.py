"""What a run of the text tier does differently from a class-conditional one: its models (the text teacher from the
model store, the image dataset's judge) and its evaluation grid (every class under its training prompts and under
its held-out paraphrases, so the evaluators can ask whether erasure reached the words it was not trained on)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from bench.api import Dataset
from bench.models import store
from bench.presets import Preset
from bench.text.captions import Captions
from bench.text.model import TextDiffusionModel, text_recipe
from bench.text.pretrain import KINDS, image_judge, pretrain_text
from bench.text.stable_diffusion import LatentTextDiffusionModel, check_pipeline_teacher
from bench.text.zero_shot import zero_shot_judge

log = logging.getLogger(__name__)


def is_text(dataset: Dataset | type[Dataset]) -> bool:
    """A dataset (or dataset class) of the text tier: its conditions are prompts, its forget sets concepts."""
    return getattr(dataset, "tier", "class") == "text"


def load_text_models(dataset: Dataset, preset: Preset, *, seed: int, device: torch.device, amp: bool,
                     teacher_path: str = "", judge_clip: str = ""):  # fmt: skip
    """(teacher, judge, info): the text teacher of the store (trained now into the user store when neither store
    has it), checksum-verified, or the Stable Diffusion folder `teacher_path`, and the image dataset's judge (or,
    with `judge_clip`, a zero-shot judge of that local CLIP: bench/text/zero_shot.py)."""
    recipe = store.recipe_preset(dataset.name, preset, seed)
    if teacher_path:
        check_pipeline_teacher(Path(teacher_path), dataset=dataset.name,
                               shape=(dataset.channels, dataset.image_size, dataset.image_size))  # fmt: skip
        judge, where = _judge(dataset, recipe, seed, device=device, judge_clip=judge_clip)
        return (
            LatentTextDiffusionModel.load(Path(teacher_path)),
            judge,
            {"path": teacher_path, "judge": where},
        )
    found = store.find_models(dataset.name, recipe.model_key, seed)
    if found is None:
        out = store.model_dir(store.user_store(), dataset.name, recipe.model_key, seed)
        with store.locked(out):
            if not (out / store.MANIFEST).is_file():
                log.info("no text teacher for %s at preset %s: training it now into %s; later runs reuse it",
                         dataset.name, recipe.model_key, out)  # fmt: skip
                pretrain_text(dataset, recipe, text_recipe(recipe.model_key), seed=seed, out_root=store.user_store(),
                              device=device, amp=amp, check_per_class=recipe.eval_per_class)  # fmt: skip
        found = out
    manifest = store.verify(found)
    judge, where = _judge(dataset, recipe, seed, device=device, judge_clip=judge_clip)
    teacher = TextDiffusionModel.load(found / "teacher")
    return teacher, judge, {"path": str(found), "command": manifest.get("command"), "judge": where}


def _judge(dataset: Dataset, recipe: Preset, seed: int, *, device: torch.device, judge_clip: str):
    """(judge, where it came from): the zero-shot CLIP one when asked for, else the trained judge of the images."""
    if judge_clip:
        return zero_shot_judge(judge_clip, dataset.captions), f"zero-shot CLIP {judge_clip}"
    judge_dir = image_judge(dataset, recipe, seed, device=device)
    return store.load_judge(judge_dir), str(judge_dir)


def per_kind(preset: Preset) -> int:
    """Images per class and prompt kind: the preset's `eval_per_class` split over the kinds, so a text run samples
    as many images as one condition of a class-conditional run (the default sweep's budget, README)."""
    return max(1, preset.eval_per_class // len(KINDS))


def text_eval_grid(
    captions: Captions, per_class: int, seed: int
) -> tuple[list[str], torch.Tensor, list[int], list[str]]:
    """(prompts, labels, seeds, kinds) of the evaluation grid: per prompt kind (train, then paraphrase), per class,
    `per_class` images cycling through the class's prompts of that kind. Image j of class c and kind k has the
    same seed in every method (and the training prompts' images the seeds of the class tier's grid)."""
    k_classes = len(captions.concepts)
    prompts, labels, seeds, kinds = [], [], [], []
    for i, kind in enumerate(KINDS):
        for c in range(k_classes):
            pool = captions.prompts(c, kind)
            prompts += [pool[j % len(pool)] for j in range(per_class)]
            labels += [c] * per_class
            seeds += [seed * 10_000_019 + (i * k_classes + c) * 100_003 + j for j in range(per_class)]
            kinds += [kind] * per_class
    return prompts, torch.tensor(labels), seeds, kinds
