"""A zero-shot CLIP judge for the text tier (`--judge clip --clip-model DIR`): a local CLIP classifies each generated
image among the dataset's concepts, so a Stable Diffusion teacher's images are judged at their own resolution
without a judge trained on the user's images.

Each concept's class embedding is CLIP's prompt ensemble (Radford et al. 2021, Sec. 3.1.4: the mean of the
normalised text embeddings over templates, normalised again) over the concept's training names in the dataset's
training templates; the logits are CLIP's own, logit_scale * cos(image, class). Its features, for `fd_judge`, are
the projected image embeddings, so fd_judge becomes a Frechet distance in CLIP space (FD_CLIP; Kynkaenniemi et
al., ICLR 2023). Images and prompts go through the CLIP's own processor, images as uint8 with grayscale repeated
to RGB, as clip_score hands them over (evaluators/clip_score.py), so the judge sees what CLIPProcessor makes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bench.text.captions import Captions, fill


class ZeroShotJudge(nn.Module):
    """Stands where the trained judge does (bench.models.judge.JudgeCNN): forward -> logits over the concepts,
    forward_features -> the features fd_judge compares. `clip` has CLIPModel's get_image_features and
    get_text_features (evaluators.clip_score.Transformers5CLIP, or the tier's TinyCLIP), `processor` is its."""

    def __init__(self, clip, processor, captions: Captions):
        super().__init__()
        self.clip, self.processor = clip, processor
        with torch.no_grad():
            classes = []
            for concept in captions.concepts:
                prompts = [fill(t, n) for t in captions.templates for n in concept.names]
                tok = processor(text=prompts, return_tensors="pt", padding=True)
                text = clip.get_text_features(tok["input_ids"], tok.get("attention_mask")).float()
                classes.append(F.normalize(F.normalize(text, dim=-1).mean(0), dim=-1))
        self.register_buffer("classes", torch.stack(classes), persistent=False)
        self.num_features = self.classes.shape[1]  # the width of forward_features, as fd_judge reads it
        self.scale = float(getattr(clip, "model", clip).logit_scale.detach().exp())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        u8 = ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()
        u8 = u8.repeat(1, 3, 1, 1) if u8.shape[1] == 1 else u8
        pixels = self.processor(images=list(u8), return_tensors="pt")["pixel_values"]
        return self.clip.get_image_features(pixels.to(self.classes.device)).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(self.forward_features(x), dim=-1) @ self.classes.T


def zero_shot_judge(clip_dir: str, captions: Captions) -> ZeroShotJudge:
    """The judge of a local CLIP folder (checked as --clip-model is) over `captions`' concepts."""
    from evaluators.clip_score import load_clip

    clip, processor = load_clip(clip_dir)
    return ZeroShotJudge(clip, processor, captions).eval()
