"""Pretraining of the text-to-image teacher on templated captions, resumable, and its judge check per prompt kind.

The images are those of the text dataset's image dataset (fashion-mnist-text: Fashion-MNIST's), and so is the
judge: the image dataset's, from the model store, which the check uses to ask whether each class comes out of
its training prompts and of its held-out paraphrases.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from bench.api import Dataset
from bench.errors import BenchError
from bench.models import store
from bench.models.judge import judge_probs
from bench.presets import Preset, get_preset
from bench.pretrain import stored_judge
from bench.text.captions import NULL_PROMPT, Captions
from bench.text.model import PromptEncoder, TextDiffusionModel, TextTeacherRecipe, build_text_unet
from bench.training import EMA, ddpm_loss, load_state, remove_state, save_state, warmup_lambda

log = logging.getLogger(__name__)

KINDS = (
    "train",
    "paraphrase",
)  # the prompt kinds the judge check samples (neighbours are other classes' train)


def train_text_teacher(dataset: Dataset, captions: Captions, recipe: TextTeacherRecipe, *, seed: int,
                       device: torch.device, state_path: Path, amp: bool = False,
                       checkpoint_every: int = 200) -> TextDiffusionModel:  # fmt: skip
    """DDPM training of the UNet and the text encoder together (epsilon MSE, the null prompt for guidance at
    `prompt_dropout`, EMA of both); every draw (images, prompts, t, noise) comes from one CPU generator, so a run
    resumes from its state dump to the same weights."""
    torch.manual_seed(seed)
    encoder = PromptEncoder.build(captions.every_prompt(), width=recipe.text_width, layers=recipe.text_layers,
                                  heads=recipe.text_heads)  # fmt: skip
    unet = build_text_unet(recipe, image_size=dataset.image_size, channels=dataset.channels)
    net = nn.ModuleDict({"unet": unet, "encoder": encoder}).to(device)
    ema = EMA(net, recipe.ema_decay)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(recipe.warmup_steps))
    g = torch.Generator().manual_seed(seed)
    start = 0
    if state_path.is_file():
        state = load_state(state_path)
        net.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        g.set_state(state["rng"])
        start = state["step"]
        log.info("resuming text-teacher training at step %d from %s", start, state_path)
    x, y = dataset.images("train")
    bar = tqdm(total=recipe.steps, initial=start, desc="text teacher", unit="step", mininterval=2)
    net.train()
    for step in range(start, recipe.steps):
        idx = torch.randint(len(x), (recipe.batch_size,), generator=g)
        prompts = captions.training_prompts(y[idx], g)
        drop = (torch.rand(len(prompts), generator=g) < recipe.prompt_dropout).tolist()
        prompts = [NULL_PROMPT if d else p for p, d in zip(prompts, drop, strict=True)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            context = encoder(prompts)
        loss = ddpm_loss(unet, x[idx], None, g, device=device, amp=amp, context=context)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), recipe.grad_clip)
        opt.step()
        sched.step()
        ema.update(net)
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if (step + 1) % checkpoint_every == 0 or step + 1 == recipe.steps:
            save_state(state_path, {"model": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                    "sched": sched.state_dict(), "rng": g.get_state(), "step": step + 1})  # fmt: skip
    bar.close()
    teacher = TextDiffusionModel(ema.model["unet"].cpu(), ema.model["encoder"].cpu())
    teacher.raw = TextDiffusionModel(unet.eval().cpu(), encoder.eval().cpu())
    return teacher


def recognisability_by_kind(teacher: TextDiffusionModel, judge, captions: Captions, *, per_class: int, steps: int,
                            guidance: float, eta: float, device: torch.device,
                            seed: int = 0) -> dict[str, list[float]]:  # fmt: skip
    """Per prompt kind, per class: the fraction of images the judge labels as the class their prompt names. The
    class's prompts of the kind are cycled through its `per_class` images, each image with its own seed."""
    out = {}
    k_classes = len(captions.concepts)
    for kind in KINDS:
        prompts, labels = [], []
        for k in range(k_classes):
            pool = captions.prompts(k, kind)
            prompts += [pool[i % len(pool)] for i in range(per_class)]
            labels += [k] * per_class
        seeds = [seed * 1_000_003 + i for i in range(len(prompts))]
        images = teacher.sample(prompts, seeds, steps=steps, guidance=guidance, eta=eta, device=device)
        pred = judge_probs(judge, images, device=device).argmax(-1)
        y = torch.tensor(labels)
        out[kind] = [round((pred[y == k] == k).float().mean().item(), 3) for k in range(k_classes)]
    return out


def image_judge_missing(dataset: Dataset, preset: Preset, seed: int) -> bool:
    """Whether image_judge would have to train the judge (a text folder's, not yet in either store)."""
    if (images := getattr(dataset, "image_folder", None)) is None:
        return False  # a registered image dataset's judge ships, or image_judge says what to pretrain
    key = store.recipe_preset(images.name, get_preset(preset.name), seed).model_key
    user = store.model_dir(store.user_store(), images.name, key, seed) / "judge" / "model.safetensors"
    return store.find_models(images.name, key, seed) is None and not user.is_file()


def image_judge(dataset: Dataset, preset: Preset, seed: int, *, device: torch.device) -> Path:
    """The judge folder (verified) that scores the text dataset's images: its image dataset's (fashion-mnist's,
    shipped), or for a text folder the class tier's judge of the same images, trained now when missing."""
    if (images := getattr(dataset, "image_folder", None)) is not None:
        recipe = store.recipe_preset(images.name, get_preset(preset.name), seed)
        return stored_judge(images, recipe, seed=seed, device=device)
    key = store.recipe_preset(dataset.image_dataset, get_preset(preset.name), seed).model_key
    found = store.find_models(dataset.image_dataset, key, seed)
    if found is None:
        raise BenchError(f"{dataset.name}'s teacher is checked with the judge of {dataset.image_dataset}, and there "
                         f"is none for preset {key}, seed {seed}: run `python -m bench pretrain "
                         f"--dataset {dataset.image_dataset} --preset {key} --seed {seed}` first")  # fmt: skip
    store.verify(found)
    return found / "judge"


def pretrain_text(dataset: Dataset, preset: Preset, recipe: TextTeacherRecipe, *, seed: int, out_root: Path,
                  device: torch.device, amp: bool = False, check_per_class: int = 100) -> Path:  # fmt: skip
    """Train (or finish training) the text teacher for (dataset, preset, seed) into the store, check it with the
    image dataset's judge and write its manifest."""
    out = store.model_dir(out_root, dataset.name, preset.model_key, seed)
    judge_dir = image_judge(dataset, preset, seed, device=device)
    judge = store.load_judge(judge_dir)
    t0 = time.time()
    teacher = train_text_teacher(dataset, dataset.captions, recipe, seed=seed, device=device, amp=amp,
                                 state_path=out / "teacher_state.pt")  # fmt: skip
    teacher.save(out / "teacher")
    teacher.raw.save(out / "teacher" / "raw")
    per_kind = recognisability_by_kind(teacher, judge, dataset.captions, per_class=check_per_class,
                                       steps=preset.sampler_steps, guidance=preset.guidance, eta=preset.eta,
                                       device=device)  # fmt: skip
    command = (f"bench pretrain --dataset {dataset.name} --preset {preset.model_key} --seed {seed} "
               f"--out {shlex.quote(str(out_root))}")  # fmt: skip
    store.write_manifest(
        out, command=command, seed=seed, dataset=dataset.describe(), preset=preset.model_key,
        recipe=dataclasses.asdict(recipe), judge=str(judge_dir.relative_to(judge_dir.parents[3])),
        teacher_recognised={kind: {"mean": round(sum(v) / len(v), 4), "per_class": v} for kind, v in per_kind.items()}
        | {"per_class_n": check_per_class,
           "sampler": {"steps": preset.sampler_steps, "guidance": preset.guidance, "eta": preset.eta}},
        torch=torch.__version__, torch_threads=torch.get_num_threads(), seconds_this_session=round(time.time() - t0, 1),
    )  # fmt: skip
    remove_state(out / "teacher_state.pt")
    return out
