"""Textual inversion on the text tier: the embedding-inversion attack as Pham et al. run it on Stable Diffusion.

Freeze the unlearned UNet and text encoder, add one token `<s1>` to the vocabulary, its embedding initialised from
the erased concept's word and the one trainable parameter, optimise it with the model's own diffusion loss on N real
images of the forgotten class captioned "a photo of a <s1>" (and the other templates), then sample from prompts with
`<s1>` in them. If a word exists that makes the frozen model draw the class, the concept is still in the weights,
however its own names were remapped (Pham et al., "Circumventing Concept Erasure Methods for Text-to-Image
Generative Models", ICLR 2024; NYU-DICE-Lab/circumventing-concept-erasure, esd/train.sh and concept_inversion.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from attacks.base import (
    Attack,
    AttackContext,
    Finding,
    Resume,
    as_record,
    from_record,
    rate,
)
from attacks.inversion import RECOVERED, InversionConfig, NewClass
from bench.api import Scaled
from bench.errors import BenchError
from bench.registry import ATTACKS
from bench.sampling import autocast
from bench.text.captions import fill
from bench.text.model import TextDiffusionModel, TextOneStepGenerator
from bench.training import ddpm_loss

PLACEHOLDER = "<s1>"  # esd/train.sh --placeholder_token="<s1>"
SRC = "Pham et al. ICLR 2024, esd/train.sh"


class WithPlaceholder(torch.nn.Module):
    """A frozen copy of a text encoder (the tier's PromptEncoder or a Stable Diffusion folder's) with one more
    token, PLACEHOLDER: a row appended to its embedding table (attacks.inversion.NewClass, the class tier's
    new-row table), trainable alone."""

    def __init__(self, encoder, init_row: int):
        super().__init__()
        self.text_model = copy.deepcopy(encoder.text_model).requires_grad_(False)
        table = self.text_model.get_input_embeddings().weight
        self.text_model.set_input_embeddings(NewClass(table, table[init_row]))
        self.new_row = table.shape[0]
        self.table_rows = encoder.table_rows  # token ids -> the table's rows, as the encoder maps them
        self.tokenizer = copy.deepcopy(encoder.tokenizer)
        self.tokenizer.add_tokens([PLACEHOLDER])  # a token of its own, as the official script adds it
        self.placeholder_id = self.tokenizer.convert_tokens_to_ids(PLACEHOLDER)

    @property
    def vector(self) -> torch.nn.Parameter:
        return self.text_model.get_input_embeddings().new

    def rows(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids  # fmt: skip
        new = ids == self.placeholder_id
        return self.table_rows(ids.masked_fill(new, 0)).masked_fill(new, self.new_row)

    def forward(self, prompts: list[str]) -> torch.Tensor:
        device = self.vector.device
        return self.text_model(input_ids=self.rows(prompts).to(device)).last_hidden_state


def initializer_row(encoder, names: tuple[str, ...]) -> tuple[str, int]:
    """(word, its row in the encoder's table): the first of the concept's names that is one CLIP token, as
    --initializer_token must be (the erased concept's own word in the official runs, e.g. "nude")."""
    for name in names:
        ids = encoder.tokenizer(name).input_ids[1:-1]
        if len(ids) == 1:
            return name, int(encoder.table_rows(torch.tensor(ids))[0])
    raise BenchError(f"textual inversion needs a one-token name to start from; {names} has none")


@dataclass(frozen=True)
class TextualInversionConfig(InversionConfig):
    """The class tier's inversion budget (same images, steps, batch, lr, samples): the official one scaled alike."""


@ATTACKS.register("textual-inversion")
class TextualInversion(Attack):
    name = "textual-inversion"
    title = "textual inversion"
    threat = "the weights and N real training images of each forgotten concept"
    requires = frozenset({"forget"})
    tier = "text"
    sources = ("Pham et al., 'Circumventing Concept Erasure Methods for Text-to-Image Generative Models', ICLR 2024 "
               "(Concept Inversion; NYU-DICE-Lab/circumventing-concept-erasure esd/train.sh: placeholder <s1>, "
               "--initializer_token the erased concept's word, 25 images, lr 5e-3 x 16 constant); its prompts are "
               "the tier's training templates, where the official ones are textual inversion's imagenet templates, "
               "whose words the tiny text encoder never saw")  # fmt: skip
    one_step = (
        "the token is optimised through the frozen generator's one-step forward, G(z, prompt) regressed on the N "
        "images (a fresh latent per image and step), as the class tier's inversion does, and sampled in one step"
    )
    Config = TextualInversionConfig
    scaled = {
        "smoke": Scaled({"images": 2, "steps": 2, "batch_size": 2, "per_class": 4, "checkpoint_every": 1},
                        "seconds-long test runs"),
        "paper": Scaled({"steps": 2000, "batch_size": 64, "per_class": 500}, "GPU scale"),
    }  # fmt: skip
    metrics = (RECOVERED,)

    def run(self, model: TextDiffusionModel, ctx: AttackContext, resume: Resume) -> list[Finding]:
        cfg = self.config
        unit = "textual-inversion"
        if (rows := resume.finished(unit)) is not None:
            return [from_record(r) for r in rows]
        forget_set = ctx.run.forget_set
        x, y = ctx.data("forget")
        idx = ctx.choose(x, y, cfg.images, "inversion/images", exemplars=True)
        _, row = initializer_row(model.encoder, forget_set.names(forget_set.forget[0]))
        encoder = WithPlaceholder(model.encoder, row).to(ctx.device)
        unet = copy.deepcopy(model.unet).requires_grad_(False).to(ctx.device)
        # The run's model with the placeholder encoder and a frozen UNet copy: its kind, schedule, t_init and (on a
        # Stable Diffusion teacher) VAE unchanged.
        attacked = model.replaced(unet=unet, encoder=encoder)
        templates = forget_set.captions.templates
        opt = torch.optim.Adam([encoder.vector], lr=cfg.lr)
        g, step = ctx.seeded(unit), 0
        if (state := resume.current(unit)) is not None:
            with torch.no_grad():
                encoder.vector.copy_(state["new"])
            opt.load_state_dict(state["opt"])
            g.set_state(state["rng"])
            step = state["step"]
        # Several forgotten concepts: one token for all of their images; on a Stable Diffusion model their VAE
        # latents, drawn once (as the methods that train on images draw them).
        xs = model.encode_images(x[idx.flatten()], ctx.seeded(f"{unit}/latents"))
        bar = ctx.run.progress(cfg.steps, unit, initial=step)
        while step < cfg.steps:
            pick = torch.randint(len(xs), (cfg.batch_size,), generator=g)
            which = torch.randint(len(templates), (cfg.batch_size,), generator=g).tolist()
            x0 = xs[pick]
            with autocast(ctx.device, ctx.amp):
                context = encoder([fill(templates[i], PLACEHOLDER) for i in which])
            if isinstance(attacked, TextOneStepGenerator):
                z = torch.randn(x0.shape, generator=g)
                with autocast(ctx.device, ctx.amp):
                    out = attacked.generate(z.to(ctx.device), context)
                loss = ((out.float() - x0.to(ctx.device)) ** 2).mean()
            else:
                loss = ddpm_loss(unet, x0, None, g, device=ctx.device, amp=ctx.amp, context=context,
                                 abar=model.schedule.alphas_cumprod)  # fmt: skip
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update()
            ctx.run.log(step, **{f"{unit}/loss": loss.item()})
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                resume.checkpoint(unit, new=encoder.vector.detach().cpu(), opt=opt.state_dict(), rng=g.get_state(),
                                  step=step)  # fmt: skip
        bar.close()
        labels, seeds = ctx.probe_grid(cfg.per_class)
        prompts = [fill(templates[j % len(templates)], PLACEHOLDER) for j in range(len(labels))]
        images = ctx.sample(attacked, prompts, seeds)  # prompts where the class tier's attacks pass labels
        hits = torch.isin(ctx.judged(images), torch.tensor(ctx.forget))
        found = Finding(RECOVERED, rate(hits), len(hits),
                        {"images": cfg.images, "steps": cfg.steps, "lr": cfg.lr})  # fmt: skip
        return [from_record(r) for r in resume.finish(unit, [as_record(found)])]
