"""UCE, Unified Concept Editing (Gandikota et al., WACV 2024, arXiv 2308.14761): a closed-form edit of the
cross-attention key and value projections, from the official `train-scripts/train_erase.py::edit_model`
(rohitgandikota/unified-concept-editing@18287f6). No training, no data.

For every `attn2` of the UNet's down, mid and up blocks and each of its projections W (to_v, and to_k:
`with_to_k=True`), with c the text encoder's token embeddings (paper Eq. 7):

  W' = (lamb W + erase_scale sum_e v*_e c_e^T + preserve_scale sum_p W c_p c_p^T)
       (lamb I + erase_scale sum_e c_e c_e^T + preserve_scale sum_p c_p c_p^T)^-1,

the minimiser of lamb |W' - W|^2 + erase_scale sum_e |W' c_e - v*_e|^2 + preserve_scale sum_p |W' c_p - W c_p|^2.
Erased tokens c_e: for each erased text, its embeddings from its last word token to the end of the padding, lined
up with those of its guide text from the guide's last word token (the `final_token_idx` slices), and v*_e = W g
(the guide's embeddings, `technique='replace'`, the script's default). Preserved tokens c_p: all 77 of each
preserved text. Defaults (train_erase.py `__main__`): lamb 0.5, erase_scale 1, preserve_scale 0.1, erased texts
the concept's names alone (`--add_prompts` False), guide " " (no `--guided_concepts`: towards the unconditional),
and for an object the preserved texts [""] (`--preserve_concepts` unset and `concept_type` not art).

Here the names are the forgotten concept's training names; `guide='anchor'` edits towards the anchor class's names
instead (the script's `--guided_concepts`), `preserve='retained'` preserves every retained concept's names (the
script's own choice for artists: every other artist), `prompts='templates'` erases each name in every training
template (the analogue of `--add_prompts`, whose templates are the script's own).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from bench.api import NON_NEGATIVE, POSITIVE, Method, param
from bench.registry import METHODS
from bench.text.captions import fill
from bench.text.tokenizer import MAX_LENGTH, clip_tokenizer

SCRIPT = "UCE train-scripts/train_erase.py"


def uce_edit(w: torch.Tensor, erase: torch.Tensor, targets: torch.Tensor, preserve: torch.Tensor, *, lamb: float,
             erase_scale: float, preserve_scale: float) -> torch.Tensor:  # fmt: skip
    """The closed-form W' of the module docstring: `erase` (n, d) token embeddings to send to `targets` (n, out),
    `preserve` (m, d) token embeddings whose outputs stay W's."""
    eye = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
    mat1 = lamb * w + erase_scale * targets.T @ erase + preserve_scale * (preserve @ w.T).T @ preserve
    mat2 = lamb * eye + erase_scale * erase.T @ erase + preserve_scale * preserve.T @ preserve
    return mat1 @ torch.inverse(mat2)


def aligned_tokens(encoder, erased: list[str], guides: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(erased, guide) token embeddings, each text from its last word token on, cut to a common length: the
    `final_token_idx` slices of edit_model."""
    olds, news = [], []
    for old, new in zip(erased, guides, strict=True):
        pair = [old, new or " "]  # edit_model: an empty guide becomes " "
        mask = clip_tokenizer()(
            pair, padding="max_length", max_length=MAX_LENGTH, truncation=True
        ).attention_mask
        i, j = (sum(m) - 2 for m in mask)
        far = max(i, j)
        emb = encoder(pair)
        olds.append(emb[0, i : MAX_LENGTH - max(0, far - i)])
        news.append(emb[1, j : MAX_LENGTH - max(0, far - j)])
    return torch.cat(olds), torch.cat(news)


def cross_attention_projections(unet) -> list[torch.nn.Linear]:
    """edit_model's projections: to_v of every attn2 (down, mid, up blocks, in that order), then their to_k."""
    attns = [m.attn2 for name, m in unet.named_modules() if hasattr(m, "attn2") and name.split(".")[0] in
             ("down_blocks", "mid_block", "up_blocks")]  # fmt: skip
    return [a.to_v for a in attns] + [a.to_k for a in attns]


@dataclass(frozen=True)
class UCEConfig:
    lamb: float = param(0.5, f"{SCRIPT} __main__: edit_model(lamb=0.5)", valid=NON_NEGATIVE)
    erase_scale: float = param(1.0, f"{SCRIPT} --erase_scale", valid=POSITIVE)
    preserve_scale: float = param(0.1, f"{SCRIPT} --preserve_scale", valid=NON_NEGATIVE)
    with_to_k: bool = param(True, f"{SCRIPT} edit_model(with_to_k=True): keys as well as values")
    guide: str = param("uncond", f"{SCRIPT}: no --guided_concepts, towards ' '; 'anchor': the anchor's names",
                       valid=("uncond", "anchor"))  # fmt: skip
    preserve: str = param("null", f"{SCRIPT}: objects preserve [''] ; 'retained': every retained concept's names",
                          valid=("null", "retained"))  # fmt: skip
    prompts: str = param("names", f"{SCRIPT} --add_prompts False: the names alone; 'templates': in every "
                         "training template", valid=("names", "templates"))  # fmt: skip


@METHODS.register("text-uce")
class TextUCE(Method):
    name = "text-uce"
    version = "1"
    paper = "Gandikota et al., Unified Concept Editing in Diffusion Models, WACV 2024 (closed form, official code)"
    Config = UCEConfig
    tier = "text"
    stable_diffusion = True  # data-free: it runs on a Stable Diffusion teacher too
    not_budgeted = "a closed-form edit: it has no iterations to stop"
    scaled = {}  # no budget to scale: one linear solve per projection

    def unlearn(self, teacher, forget_set, ctx):
        cfg = self.config
        encoder = copy.deepcopy(teacher.encoder).to(ctx.device).eval()
        unet = copy.deepcopy(teacher.unet).to(ctx.device).eval()
        captions = forget_set.captions
        target = captions.concepts[forget_set.anchor].names
        templates = captions.templates if cfg.prompts == "templates" else ("{}",)
        pairs = [(fill(t, n), fill(t, target[j % len(target)]) if cfg.guide == "anchor" else " ")
                 for t in templates for j, n in enumerate(forget_set.names())]  # fmt: skip
        kept = [""] if cfg.preserve == "null" else [n for k in forget_set.retain for n in forget_set.names(k)]
        projections = cross_attention_projections(unet)
        if not cfg.with_to_k:
            projections = projections[: len(projections) // 2]
        bar = ctx.progress(len(projections), self.name)
        with torch.no_grad():
            old, new = aligned_tokens(encoder, *map(list, zip(*pairs, strict=True)))
            preserve = encoder(kept).flatten(0, 1)
            for proj in projections:
                w = proj.weight.float()
                proj.weight.copy_(uce_edit(w, old.float(), new.float() @ w.T, preserve.float(), lamb=cfg.lamb,
                                           erase_scale=cfg.erase_scale, preserve_scale=cfg.preserve_scale))  # fmt: skip
                bar.update()
        bar.close()
        ctx.log(1, erased=len(pairs), preserved=len(kept))
        return teacher.with_unet(unet)
