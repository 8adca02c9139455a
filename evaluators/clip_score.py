"""CLIP score (Hessel et al., 2021) of generations against "a photo of a {class name}", as torchmetrics CLIPScore.

Reported on the forgotten classes (lower: the model no longer draws what the prompt names) and the retained
ones (higher). torchmetrics 1.9 averages 100 * cos(image, text) over the images and clips the mean at 0; the
per-image scores (from the update function CLIPScore itself calls) give a percentile bootstrap interval over the
images and the report's Wilcoxon signed-rank test. On the class tier it runs only with a local transformers CLIP
folder (--clip-model DIR): no model can be downloaded here.

On the text tier each image is scored against the prompt it was generated from, training prompts and held-out
paraphrases apart, with the tier's shipped tiny CLIP (bench/text/clip.py; --clip-model DIR replaces it).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from bench import stats
from bench.api import EvalContext, Evaluator, Measurement, Metric, SampleSet
from bench.errors import BenchError
from bench.registry import EVALUATORS

PROMPT = "a photo of a {}"
CLIP_FORGET = Metric("clip_score", "forget", higher_is_better=False)
CLIP_RETAIN = Metric("clip_score", "retain", higher_is_better=True)
CLIP_FORGET_PARAPHRASE = Metric("clip_score", "forget-paraphrase", higher_is_better=False)
CLIP_RETAIN_PARAPHRASE = Metric("clip_score", "retain-paraphrase", higher_is_better=True)
HOW = (
    "a transformers CLIP folder, e.g. made on a machine with internet by `CLIPModel.from_pretrained("
    "'openai/clip-vit-large-patch14').save_pretrained(DIR)` and the same with CLIPProcessor"
)


class Transformers5CLIP(nn.Module):
    """torchmetrics 1.9 expects get_image_features / get_text_features to return tensors; transformers 5 returns
    a BaseModelOutputWithPooling whose pooler_output holds the projected embedding."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if torch.is_tensor(out) else out.pooler_output

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def check_clip_dir(path: Path) -> Path:
    """A BenchError unless `path` looks like a saved CLIP model with its processor (reads only config files)."""
    path = Path(path).expanduser().resolve()
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise BenchError(f"--clip-model {path}: cannot read config.json ({e}); expected {HOW}") from e
    if cfg.get("model_type") != "clip":
        raise BenchError(
            f"--clip-model {path}: config.json is a {cfg.get('model_type')!r} model, not 'clip'; expected {HOW}"
        )
    if not any((path / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
        raise BenchError(
            f"--clip-model {path}: no preprocessor_config.json (the CLIPProcessor is missing); expected {HOW}"
        )
    if not any((path / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        raise BenchError(
            f"--clip-model {path}: no tokenizer files (tokenizer.json or vocab.json); expected {HOW}"
        )
    return path


@lru_cache(maxsize=1)
def load_clip(path: str):
    """(model, processor) from a local folder, never the hub."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
        processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise BenchError(f"--clip-model {path}: cannot load the CLIP model and processor: {e}") from e
    return Transformers5CLIP(model), processor


def clip_scores(model, processor, images: torch.Tensor, prompts: list[str], *, device,
                batch_size: int = 64) -> torch.Tensor:  # fmt: skip
    """100 * cos(image, prompt) per image (float images in [-1, 1], grayscale repeated to RGB), by the function
    torchmetrics' CLIPScore.update calls."""
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update

    x = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
    with torch.no_grad():
        out = [_clip_score_update(list(x[i : i + batch_size].to(device)), prompts[i : i + batch_size], model,
                                  processor)[0].float().cpu() for i in range(0, len(x), batch_size)]  # fmt: skip
    return torch.cat(out)


def clip_score(
    model, processor, images: torch.Tensor, prompts: list[str], *, device, batch_size: int = 64
) -> float:
    """torchmetrics CLIPScore of float images in [-1, 1] against their prompts: the mean score, clipped at 0."""
    scores = clip_scores(model, processor, images, prompts, device=device, batch_size=batch_size)
    return max(scores.mean().item(), 0.0)


@EVALUATORS.register("clip_score")
class ClipScore(Evaluator):
    """clip_score of the generations of forgotten and of retained classes against their prompts: "a photo of a
    {class name}" on the class tier, the prompt each image was generated from on the text tier."""

    name = "clip_score"
    version = "3"  # 2: bootstrap intervals and per-image scores; 3: the text tier's own prompts and tiny CLIP
    metrics = (CLIP_FORGET, CLIP_RETAIN, CLIP_FORGET_PARAPHRASE, CLIP_RETAIN_PARAPHRASE)
    needs = "clip_model"
    shipped_for = ("text",)

    @classmethod
    def resolve_options(cls, given, tier: str = "class"):
        if given.get("clip_model"):
            return {"clip_model": str(check_clip_dir(Path(given["clip_model"])))}
        if tier in cls.shipped_for:
            return {}
        raise BenchError(f"evaluator clip_score needs --clip-model DIR: {HOW}")

    def __call__(self, samples: SampleSet, ctx: EvalContext):
        model, processor = self._model(samples, ctx)
        if samples.prompts is None:
            names = [n.replace("_", " ") for n in ctx.dataset.class_names]
            prompts = [PROMPT.format(names[k]) for k in samples.labels.tolist()]
            return self._scored(CLIP_FORGET, CLIP_RETAIN, samples, prompts, model, processor, ctx)
        train, para = samples.of_kind(), samples.of_kind("paraphrase")
        return [*self._scored(CLIP_FORGET, CLIP_RETAIN, train, train.prompts, model, processor, ctx),
                *self._scored(CLIP_FORGET_PARAPHRASE, CLIP_RETAIN_PARAPHRASE, para, para.prompts, model, processor,
                              ctx)]  # fmt: skip

    def row_fields(self, ctx: EvalContext):
        return {"clip_model": ctx.options.get("clip_model") or str(self._tiny_clip_dir(ctx))}

    @staticmethod
    def _tiny_clip_dir(ctx: EvalContext) -> Path:
        from bench.text.clip import text_clip

        return text_clip(ctx.dataset, ctx.model_key, ctx.seed, device=ctx.device)

    def _model(self, samples: SampleSet, ctx: EvalContext):
        if ctx.options.get("clip_model"):
            return load_clip(ctx.options["clip_model"])
        if samples.prompts is None:
            raise BenchError(f"evaluator clip_score needs --clip-model DIR: {HOW}")
        from bench.text.clip import load_tiny_clip

        return load_tiny_clip(str(self._tiny_clip_dir(ctx)))

    @staticmethod
    def _scored(forget_metric, retain_metric, samples, prompts, model, processor, ctx) -> list[Measurement]:
        forget = torch.isin(samples.labels, torch.tensor(ctx.forget_set.forget))
        rows = []
        for metric, mask in ((forget_metric, forget), (retain_metric, ~forget)):
            if not mask.any():
                raise ValueError(f"clip_score[{metric.subset}] has no generated images to score")
            chosen = [p for p, m in zip(prompts, mask.tolist(), strict=True) if m]
            scores = clip_scores(model, processor, samples.images[mask], chosen, device=ctx.device).double()
            ci = tuple(
                max(b, 0.0) for b in stats.bootstrap_mean_interval(scores.numpy())
            )  # clipped as the mean
            rows.append(Measurement(metric, max(scores.mean().item(), 0.0), int(mask.sum()), ci=ci,
                                    ci_method=f"bootstrap-{stats.RESAMPLES}", outcomes=scores, test=stats.WILCOXON))  # fmt: skip
        return rows
