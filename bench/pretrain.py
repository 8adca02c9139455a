"""Pretraining of a dataset's teacher (class-conditional DDPM) and judge (classifier), resumable."""

from __future__ import annotations

import logging
import shlex
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bench import distributed
from bench.api import Dataset
from bench.distributed import SINGLE, World
from bench.errors import BenchError
from bench.models import store
from bench.models.judge import JudgeCNN, judge_probs
from bench.models.unet import build_unet
from bench.presets import Preset
from bench.sampling import DiffusionModel
from bench.training import (
    EMA,
    ddpm_loss,
    global_rng_state,
    load_state,
    random_flip,
    remove_state,
    save_state,
    set_global_rng_state,
    warmup_lambda,
)

log = logging.getLogger(__name__)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and a random shift of up to 2 pixels (one shift per batch)."""
    flip = torch.rand(len(x), generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    h, w = x.shape[-2:]
    return padded[..., 2 + dy : 2 + dy + h, 2 + dx : 2 + dx + w]


def stored_judge(dataset: Dataset, recipe: Preset, *, seed: int, device: torch.device) -> Path:
    """The judge folder of a class-tier dataset at `recipe`, verified: the store's (beside its teacher), else one
    trained alone now into the user store, where a later pretrain reuses it (for an external teacher, or a text
    folder's concepts scored on its images)."""
    found = store.find_models(dataset.name, recipe.model_key, seed)
    if found is not None:
        store.verify(found)
        return found / "judge"
    out = store.model_dir(store.user_store(), dataset.name, recipe.model_key, seed) / "judge"
    with store.locked(out):
        if not (out / "model.safetensors").is_file():
            log.info("no judge for %s at preset %s: training it now with the %s recipe (%d epochs) into %s",
                     dataset.name, recipe.model_key, recipe.model_key, recipe.judge.epochs, out)  # fmt: skip
            judge, acc = train_judge(dataset, recipe, seed=seed, device=device)
            log.info("judge test accuracy %.4f", acc)
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            store.save_judge(judge, tmp, widths=recipe.judge.widths)
            store.write_judge_checksums(tmp)
            tmp.rename(out)
    store.verify_judge(out)  # no manifest there: the judge's own checksums.json
    return out


def train_judge(
    dataset: Dataset, preset: Preset, *, seed: int, device: torch.device, state_path: Path | None = None
) -> tuple[JudgeCNN, float]:
    """Train the judge on the train split; return it with its accuracy on the real test split. With `state_path`
    it dumps its state after every epoch and resumes from it (a requeued pretraining job loses at most one)."""
    recipe = preset.judge
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = dataset.images("train")
    judge = JudgeCNN(in_chans=dataset.channels, num_classes=dataset.num_classes, widths=recipe.widths).to(
        device
    )
    steps_per_epoch = len(x) // recipe.batch_size
    opt = torch.optim.AdamW(judge.parameters(), lr=recipe.lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe.lr, total_steps=recipe.epochs * steps_per_epoch
    )
    first = 0
    if state_path is not None and state_path.is_file():
        state = load_state(state_path)
        judge.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        g.set_state(state["rng"])
        first = state["epoch"]
        log.info("resuming judge training at epoch %d from %s", first, state_path)
    bar = tqdm(total=recipe.epochs * steps_per_epoch, initial=first * steps_per_epoch, desc="judge", unit="step",
               mininterval=2)  # fmt: skip
    for epoch in range(first, recipe.epochs):
        if state_path is not None and epoch > first:
            save_state(state_path, {"model": judge.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                                    "rng": g.get_state(), "epoch": epoch})  # fmt: skip
        judge.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * recipe.batch_size : (i + 1) * recipe.batch_size]
            xb = _augment(x[idx], g).to(device)
            loss = F.cross_entropy(judge(xb), y[idx].to(device), label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    judge.eval()
    xt, yt = dataset.images("test")
    acc = (judge_probs(judge, xt, device=device).argmax(-1) == yt).float().mean().item()
    return judge.cpu(), acc


def train_teacher(dataset: Dataset, preset: Preset, *, seed: int, device: torch.device, state_path: Path,
                  checkpoint_every: int = 250, amp: bool = False, world: World = SINGLE) -> DiffusionModel:  # fmt: skip
    """DDPM training (epsilon MSE, null-label dropout for guidance, EMA); resumes from `state_path`.

    Data-parallel over the ranks of `world`: each draws the global batch and takes its slice, the gradients are
    averaged before clipping, and rank 0 alone writes the state dumps; the weights do not depend on the split."""
    recipe = preset.teacher
    world.check_batch(recipe.batch_size, "the teacher's batch size")
    torch.manual_seed(seed)  # the initial weights depend on the seed alone, not on what ran before
    unet = build_unet(recipe, image_size=dataset.image_size, channels=dataset.channels,
                      num_classes=dataset.num_classes).to(device)  # fmt: skip
    ema = EMA(unet, recipe.ema_decay)
    if world.rank:  # the same initial weights on every rank, then dropout masks of its own
        torch.manual_seed(distributed.rank_seed(seed, world))
    opt = torch.optim.AdamW(unet.parameters(), lr=recipe.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(recipe.warmup_steps))
    g = torch.Generator().manual_seed(seed)
    start = 0
    if state_path.is_file():
        state = load_state(state_path)
        unet.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        g.set_state(state["rng"])
        set_global_rng_state(
            world.unpack(state.get("global_rng"))
        )  # the UNet's dropout draws from torch's global generator
        start = state["step"]
        log.info("resuming teacher training at step %d from %s", start, state_path)
    x, y = dataset.images("train")
    null = dataset.num_classes
    bar = tqdm(total=recipe.steps, initial=start, desc="teacher", unit="step", mininterval=2,
               disable=not world.is_main)  # fmt: skip
    unet.train()
    for step in range(start, recipe.steps):
        idx = torch.randint(len(x), (recipe.batch_size,), generator=g)
        x0, labels = x[idx], y[idx].clone()
        labels[torch.rand(len(labels), generator=g) < recipe.label_dropout] = null
        if recipe.flip:
            x0 = random_flip(x0, g)
        loss = ddpm_loss(unet, x0, labels, g, device=device, amp=amp, reduction=recipe.loss,
                         antithetic=recipe.antithetic, shard=world.shard)  # fmt: skip
        opt.zero_grad(set_to_none=True)
        loss.backward()
        world.average_gradients(unet)
        torch.nn.utils.clip_grad_norm_(unet.parameters(), recipe.grad_clip)
        opt.step()
        sched.step()
        ema.update(unet)
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if (step + 1) % checkpoint_every == 0 or step + 1 == recipe.steps:
            global_rng = world.pack(global_rng_state())  # each rank's: its dropout masks
            if world.is_main:
                save_state(state_path, {"model": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                        "sched": sched.state_dict(), "rng": g.get_state(), "step": step + 1,
                                        "global_rng": global_rng})  # fmt: skip
    bar.close()
    teacher = DiffusionModel(ema.model.cpu())
    teacher.raw = DiffusionModel(unet.eval().cpu())  # kept beside the EMA weights (teacher/raw/)
    return teacher


def recognisability(teacher: DiffusionModel, judge, preset: Preset, *, num_classes: int, per_class: int,
                    device: torch.device, seed: int = 0) -> list[float]:  # fmt: skip
    """Per class: the fraction of the teacher's samples that the judge labels as their conditioning class."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    seeds = [seed * 1_000_003 + i for i in range(len(labels))]
    images = teacher.sample(labels, seeds, steps=preset.sampler_steps, guidance=preset.guidance,
                            eta=preset.eta, device=device)  # fmt: skip
    pred = judge_probs(judge, images, device=device).argmax(-1)
    return [(pred[labels == k] == k).float().mean().item() for k in range(num_classes)]


def pretrain(dataset: Dataset, preset: Preset, *, seed: int, out_root: Path, device: torch.device,
             amp: bool = False, check_per_class: int = 100, world: World = SINGLE) -> Path:  # fmt: skip
    """Train (or finish training) the judge and the teacher for (dataset, preset, seed) into the store.

    With several ranks the teacher's training is data-parallel over them and rank 0 alone does the rest."""
    out = store.model_dir(out_root, dataset.name, preset.model_key, seed)
    t0 = time.time()
    teacher = None
    if world.size > 1:  # the teacher first: no rank waits in a collective while rank 0 trains the judge
        teacher = train_teacher(dataset, preset, seed=seed, device=device, state_path=out / "teacher_state.pt",
                                amp=amp, world=world)  # fmt: skip
        if not world.is_main:
            return out
    judge_dir = out / "judge"
    if (judge_dir / "model.safetensors").is_file():
        judge = store.load_judge(judge_dir)
        xt, yt = dataset.images("test")
        judge_acc = (judge_probs(judge, xt, device=device).argmax(-1) == yt).float().mean().item()
    else:
        judge, judge_acc = train_judge(
            dataset, preset, seed=seed, device=device, state_path=out / "judge_state.pt"
        )
        store.save_judge(judge, judge_dir, widths=preset.judge.widths)
        remove_state(out / "judge_state.pt")
    log.info("judge test accuracy %.4f", judge_acc)
    if teacher is None:
        teacher = train_teacher(
            dataset, preset, seed=seed, device=device, state_path=out / "teacher_state.pt", amp=amp
        )
    teacher.save(out / "teacher")
    teacher.raw.save(out / "teacher" / "raw")
    per_class = recognisability(teacher, judge, preset, num_classes=dataset.num_classes, per_class=check_per_class,
                                device=device)  # fmt: skip
    command = (f"bench pretrain --dataset {dataset.name} --preset {preset.model_key} --seed {seed} "
               f"--out {shlex.quote(str(out_root))}")  # fmt: skip
    store.write_manifest(
        out, command=command, seed=seed, dataset=dataset.describe(), preset=preset.model_key,
        judge_test_accuracy=round(judge_acc, 4),
        teacher_recognised={"mean": round(sum(per_class) / len(per_class), 4),
                            "per_class": [round(p, 3) for p in per_class], "per_class_n": check_per_class,
                            "sampler": {"steps": preset.sampler_steps, "guidance": preset.guidance, "eta": preset.eta}},
        torch=torch.__version__, torch_threads=torch.get_num_threads(), seconds_this_session=round(time.time() - t0, 1),
    )  # fmt: skip
    remove_state(out / "teacher_state.pt")
    return out


def pretrain_named(dataset: str, preset: str, *, seed: int, out_root: Path, data_dir: Path | None = None,
                   device: str = "cpu", amp: bool = False, clip_only: bool = False) -> Path:  # fmt: skip
    """`bench pretrain` as one call, by names: also the body of its SLURM job, which a requeue calls again (the
    teacher's training resumes from its state dump; a finished judge is loaded, not retrained). In a job of
    several tasks (or processes that `bench pretrain --nproc` started) the teacher trains data-parallel."""
    from bench.context import Runtime
    from bench.data import make_dataset
    from bench.presets import get_preset

    data = make_dataset(dataset, data_dir=data_dir, image_size=get_preset(preset).image_size)
    recipe = store.recipe_preset(data.name, get_preset(preset), seed)  # the models runs at this preset use
    world = distributed.init_job(device)
    torch_device = Runtime(device=distributed.rank_device(device, world)).torch_device
    torch.manual_seed(seed)
    from bench.text.run import is_text

    if is_text(data):  # the text-conditional tier's teacher and CLIP (bench/text)
        from bench.text.clip import clip_dir, pretrain_clip
        from bench.text.model import text_recipe
        from bench.text.pretrain import pretrain_text

        if world.size > 1:
            raise BenchError(
                f"{data.name}'s teacher trains in one process: drop --nproc (or the job's extra tasks)"
            )
        out = None
        if not clip_only:
            out = pretrain_text(data, recipe, text_recipe(recipe.model_key), seed=seed, out_root=Path(out_root),
                                device=torch_device, amp=amp)  # fmt: skip
        if (
            clip_only
            or not (clip_dir(out_root, data.name, recipe.model_key, seed) / store.MANIFEST).is_file()
        ):
            clip = pretrain_clip(
                data, recipe.model_key, seed=seed, out_root=Path(out_root), device=torch_device
            )
        return out or clip
    if clip_only:
        raise BenchError(
            f"--clip-only: {data.name} is of the class tier, which ships no CLIP (--clip-model DIR)"
        )
    return pretrain(data, recipe, seed=seed, out_root=Path(out_root), device=torch_device, amp=amp,
                    world=world)  # fmt: skip
