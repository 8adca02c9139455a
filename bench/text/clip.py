"""The text tier's tiny CLIP: what its `clip_score` is measured with (issue 17.4).

A real CLIP knows nothing of 16x16 Fashion-MNIST images and cannot be downloaded here, so the tier ships its own,
trained contrastively (Radford et al. 2021's symmetric InfoNCE) on the teacher's training captions: a judge-like
image tower (bench/models/judge.py's CNN, its head the projection) and a text encoder built as the teacher's
(PromptEncoder: the real CLIP tokenizer, a small CLIPTextModel, pooled at <|endoftext|> as CLIP's) with a linear
projection. It exposes `get_image_features` / `get_text_features` and a processor, which is what torchmetrics'
CLIPScore asks of a model (`CLIPScore(model_name_or_path=lambda: (model, processor))`).

The captions name a class and nothing else, so every pair of an image and a caption of the same class is a
positive: the InfoNCE targets are uniform over them (the supervised-contrastive variant of Khosla et al. 2020),
where CLIP's one-hot diagonal would push apart a batch's many same-class pairs. Its check (in its manifest) is the
zero-shot accuracy on the test images with the training prompts and with the held-out paraphrases, and the mean
score of a test image against a prompt of its class and of another class: the scale a reader needs to read a
clip_score on this tier.
"""

from __future__ import annotations

import json
import math
import shlex
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from bench.api import Dataset
from bench.errors import BenchError
from bench.files import share
from bench.models import store
from bench.models.judge import JudgeCNN
from bench.text.captions import Captions
from bench.text.model import PromptEncoder
from bench.text.pretrain import KINDS
from bench.text.tokenizer import MAX_LENGTH, clip_tokenizer
from bench.training import load_state, remove_state, save_state, warmup_lambda


@dataclass(frozen=True)
class ClipRecipe:
    """No paper trains this model. The image tower is the shipped judge's CNN (its widths), the text encoder the
    teacher's size; embedding width, batch, lr and steps are our choice (the zero-shot check in the manifest says
    how well it came out), CLIP's initial temperature 0.07 and its cap of 100 on the logit scale."""

    image_widths: tuple[int, ...] = (32, 64, 128)
    text_width: int = 64
    text_layers: int = 3
    text_heads: int = 4
    embed_dim: int = 64
    steps: int = 800
    batch_size: int = 256
    lr: float = 1e-3
    warmup_steps: int = 100
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0


CLIP_RECIPES = {
    "default": ClipRecipe(),
    "smoke": ClipRecipe(image_widths=(8, 16), text_width=16, text_layers=1, text_heads=2, embed_dim=16, steps=20,
                        batch_size=32, warmup_steps=0),
}  # fmt: skip


class TinyCLIP(nn.Module):
    """Image and text towers into one normalised embedding space, as torchmetrics' CLIPScore reads a CLIP."""

    def __init__(
        self, image: JudgeCNN, encoder: PromptEncoder, *, embed_dim: int, init_temperature: float = 0.07
    ):
        super().__init__()
        self.image, self.encoder = image, encoder
        self.text_projection = nn.Linear(encoder.width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))
        self.config = encoder.text_model.config  # what torchmetrics looks up (max_position_embeddings)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.image(pixel_values)

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = self.encoder.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return self.text_projection(out.pooler_output)

    def save(self, directory: Path, *, image_size: int, widths: tuple[int, ...]) -> None:
        store.save_judge(self.image, directory / "image", widths=widths)
        self.encoder.save(directory / "text_encoder")
        save_file({"text_projection": self.text_projection.weight.detach().contiguous(),
                   "logit_scale": self.logit_scale.detach().reshape(1)}, directory / "projection.safetensors")  # fmt: skip
        (directory / "clip.json").write_text(json.dumps({"image_size": image_size}, indent=2) + "\n")
        share(directory / "projection.safetensors")

    @classmethod
    def load(cls, directory: Path) -> tuple[TinyCLIP, TinyClipProcessor]:
        try:
            image = store.load_judge(directory / "image")
            encoder = PromptEncoder.load(directory / "text_encoder")
            heads = load_file(directory / "projection.safetensors")
            image_size = int(json.loads((directory / "clip.json").read_text())["image_size"])
            model = cls(image, encoder, embed_dim=heads["text_projection"].shape[0])
            model.text_projection.weight.data.copy_(heads["text_projection"])
            model.logit_scale.data.copy_(heads["logit_scale"][0])
        except BenchError:
            raise
        except Exception as e:
            raise BenchError(f"cannot load the tiny CLIP in {directory}: {e}") from e
        return model.eval(), TinyClipProcessor(encoder, image_size)


class TinyClipProcessor:
    """A CLIPProcessor's interface for the tiny CLIP: uint8 (C, H, W) images -> grayscale in [-1, 1] at its size
    (channels averaged, as CLIPScore hands over grayscale repeated to RGB); prompts -> the encoder's rows."""

    def __init__(self, encoder: PromptEncoder, image_size: int):
        self.encoder, self.image_size = encoder, image_size

    def __call__(self, text=None, images=None, return_tensors="pt", padding=True) -> dict[str, torch.Tensor]:
        if images is not None:
            x = torch.stack([torch.as_tensor(i) for i in images]).float().mean(1, keepdim=True) / 127.5 - 1
            if x.shape[-1] != self.image_size:
                x = F.interpolate(
                    x, size=self.image_size, mode="bilinear", antialias=True, align_corners=False
                )
            return {"pixel_values": x}
        return text_inputs(self.encoder, [text] if isinstance(text, str) else list(text))


def text_inputs(encoder: PromptEncoder, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The encoder's rows of `prompts`, padded to the longest (not to 77 as the UNet's context is): CLIP pools at
    <|endoftext|> under a causal mask, so the padding after it changes nothing but the cost."""
    tok = clip_tokenizer()(
        prompts, padding="longest", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    )
    return {"input_ids": encoder.lookup.cpu()[tok.input_ids], "attention_mask": tok.attention_mask}


def clip_dir(root: Path, dataset: str, preset_key: str, seed: int) -> Path:
    """A store folder of its own beside the teacher's (seedN/): clip-seedN/, with its own manifest."""
    return Path(root) / dataset / preset_key / f"clip-seed{seed}"


def find_clip(dataset: str, preset_key: str, seed: int) -> Path | None:
    for root in (store.SHIPPED, store.user_store()):
        if (clip_dir(root, dataset, preset_key, seed) / store.MANIFEST).is_file():
            return clip_dir(root, dataset, preset_key, seed)
    return None


@lru_cache(maxsize=2)
def load_tiny_clip(path: str) -> tuple[TinyCLIP, TinyClipProcessor]:
    """The tiny CLIP of a store folder, checked against its manifest."""
    store.verify(Path(path))
    return TinyCLIP.load(Path(path))


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor):
    """Symmetric InfoNCE with every same-class pair a positive (targets uniform over them)."""
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets.T)) / 2


def train_clip(dataset: Dataset, captions: Captions, recipe: ClipRecipe, *, seed: int, device: torch.device,
               state_path: Path, checkpoint_every: int = 250) -> TinyCLIP:  # fmt: skip
    """Contrastive training on (training image, a training caption of its class); every draw from one CPU
    generator, so a run resumes from its state dump to the same weights."""
    torch.manual_seed(seed)
    image = JudgeCNN(in_chans=dataset.channels, num_classes=recipe.embed_dim, widths=recipe.image_widths)
    encoder = PromptEncoder.build(captions.every_prompt(), width=recipe.text_width, layers=recipe.text_layers,
                                  heads=recipe.text_heads)  # fmt: skip
    model = TinyCLIP(image, encoder, embed_dim=recipe.embed_dim, init_temperature=recipe.init_temperature)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(recipe.warmup_steps))
    g = torch.Generator().manual_seed(seed)
    start = 0
    if state_path.is_file():
        state = load_state(state_path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        g.set_state(state["rng"])
        start = state["step"]
    x, y = dataset.images("train")
    model.train()
    bar = tqdm(total=recipe.steps, initial=start, desc="tiny CLIP", unit="step", mininterval=2)
    for step in range(start, recipe.steps):
        idx = torch.randint(len(x), (recipe.batch_size,), generator=g)
        prompts = captions.training_prompts(y[idx], g)
        text = {k: v.to(device) for k, v in text_inputs(encoder, prompts).items()}
        loss = contrastive_loss(model.get_image_features(x[idx].to(device)),
                                model.get_text_features(**text), y[idx].to(device), model.logit_scale.exp())  # fmt: skip
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(max=math.log(recipe.max_logit_scale))
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if (step + 1) % checkpoint_every == 0 or step + 1 == recipe.steps:
            save_state(state_path, {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                                    "rng": g.get_state(), "step": step + 1})  # fmt: skip
    bar.close()
    return model.cpu().eval()


@torch.no_grad()
def clip_check(model: TinyCLIP, dataset: Dataset, captions: Captions, *, batch_size: int = 1000) -> dict:
    """Per prompt kind, on the test images: zero-shot accuracy (the class whose prompts' mean embedding is
    nearest) per class, and the mean 100 * cos of an image with a prompt of its own class and of the others."""
    x, y = dataset.images("test")
    img = torch.cat([F.normalize(model.get_image_features(x[i : i + batch_size]), dim=-1)
                     for i in range(0, len(x), batch_size)])  # fmt: skip
    out = {}
    k_classes = len(captions.concepts)
    for kind in KINDS:
        per_prompt = []
        for k in range(k_classes):
            text = text_inputs(model.encoder, captions.prompts(k, kind))
            per_prompt.append(F.normalize(model.get_text_features(**text), dim=-1))
        centroids = F.normalize(torch.stack([e.mean(0) for e in per_prompt]), dim=-1)
        pred = (img @ centroids.T).argmax(-1)
        scores = torch.stack([100 * (img @ e.T).mean(1) for e in per_prompt], 1)  # (N, K): mean over prompts
        own = scores.gather(1, y[:, None]).squeeze(1)
        other = (scores.sum(1) - own) / (k_classes - 1)
        out[kind] = {"zero_shot_accuracy": round((pred == y).float().mean().item(), 4),
                     "per_class": [round((pred[y == k] == k).float().mean().item(), 3) for k in range(k_classes)],
                     "score_own_class": round(own.mean().item(), 2),
                     "score_other_classes": round(other.mean().item(), 2)}  # fmt: skip
    return out


def pretrain_clip(
    dataset: Dataset, preset_key: str, *, seed: int, out_root: Path, device: torch.device
) -> Path:
    """Train (or finish training) the tiny CLIP for (dataset, preset, seed) into the store, check it on the test
    images and write its manifest."""
    if preset_key not in CLIP_RECIPES:
        raise BenchError(f"the text tier has no tiny-CLIP recipe for preset {preset_key!r}; valid: "
                         f"{', '.join(CLIP_RECIPES)}")  # fmt: skip
    recipe = CLIP_RECIPES[preset_key]
    out = clip_dir(out_root, dataset.name, preset_key, seed)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = train_clip(
        dataset, dataset.captions, recipe, seed=seed, device=device, state_path=out / "clip_state.pt"
    )
    model.save(out, image_size=dataset.image_size, widths=recipe.image_widths)
    check = clip_check(model, dataset, dataset.captions)
    command = (f"bench pretrain --dataset {dataset.name} --preset {preset_key} --seed {seed} --clip-only "
               f"--out {shlex.quote(str(out_root))}")  # fmt: skip
    remove_state(out / "clip_state.pt")
    store.write_manifest(out, command=command, seed=seed, dataset=dataset.describe(), preset=preset_key,
                         recipe=asdict(recipe), check_on_test_images=check, torch=torch.__version__,
                         torch_threads=torch.get_num_threads(), seconds=round(time.time() - t0, 1))  # fmt: skip
    return out


def text_clip(dataset: Dataset, preset_key: str, seed: int, *, device: torch.device) -> Path:
    """The tiny CLIP's store folder for a run: the shipped one, else the user's, else trained now into the user's
    store (a few minutes on 2 cores at the default preset)."""
    found = find_clip(dataset.name, preset_key, seed)
    if found is not None:
        return found
    out = clip_dir(store.user_store(), dataset.name, preset_key, seed)
    with store.locked(out):
        if not (out / store.MANIFEST).is_file():
            pretrain_clip(dataset, preset_key, seed=seed, out_root=store.user_store(), device=device)
    return out
