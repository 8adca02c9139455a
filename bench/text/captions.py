"""Templated captions of a labelled image set: each class a concept with several names, written into several
templates, split into what the text teacher trains on and what is held out for evaluation only.

The text encoder of the tiny teacher is trained from scratch, so it knows no word it has not seen: a held-out
name or template made of unseen tokens would be noise to it, not a paraphrase. So the held-out names and templates
are new *strings* whose CLIP BPE tokens all occur in the training captions ("tee shirt" when "tee" and "t-shirt"
are trained; "a black and white picture of a" when "a black and white photo of a" and "a picture of a" are), and
a test checks it. What they probe is whether erasure follows a concept through new word combinations, not world
knowledge a real CLIP has.

Prompt kinds, as the evaluators will read them (issue 17.4): `train` (training names in training templates),
`paraphrase` (every other pairing of a name and a template, held-out on at least one side) and `neighbour` (the
training prompts of the classes a forgotten class is confused with, which erasure must leave intact).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from bench.errors import BenchError

NULL_PROMPT = ""  # the unconditional prompt of classifier-free guidance, as Stable Diffusion's


@dataclass(frozen=True)
class Concept:
    """A class as text: its slug (`concept-<slug>`), the names the teacher trains on and held-out ones."""

    slug: str
    names: tuple[str, ...]
    held_out: tuple[str, ...]
    neighbours: tuple[int, ...]  # classes it is confused with (the judge's and the teacher's usual mix-ups)


@dataclass(frozen=True)
class Captions:
    concepts: tuple[Concept, ...]
    templates: tuple[str, ...]
    held_out_templates: tuple[str, ...]

    def slugs(self) -> list[str]:
        return [c.slug for c in self.concepts]

    def index(self, slug: str) -> int:
        """The class a concept slug names (`t-shirt` -> 0); unknown ones list the valid."""
        for k, c in enumerate(self.concepts):
            if c.slug == slug:
                return k
        raise BenchError(f"unknown concept {slug!r}; valid: {', '.join(self.slugs())}")

    def prompts(self, k: int, kind: str) -> list[str]:
        """Class k's prompts of a kind: `train`, `paraphrase` or `neighbour`."""
        c = self.concepts[k]
        if kind == "train":
            return [fill(t, n) for t in self.templates for n in c.names]
        if kind == "paraphrase":
            every = itertools.product((*self.templates, *self.held_out_templates), (*c.names, *c.held_out))
            return [fill(t, n) for t, n in every if t in self.held_out_templates or n in c.held_out]
        if kind == "neighbour":
            return [p for j in c.neighbours for p in self.prompts(j, "train")]
        raise BenchError(f"unknown prompt kind {kind!r}; valid: train, paraphrase, neighbour")

    def training_prompts(self, labels: torch.Tensor, g: torch.Generator) -> list[str]:
        """One training caption per label, its template and name drawn uniformly from `g` (the teacher's data)."""
        t = torch.randint(len(self.templates), (len(labels),), generator=g).tolist()
        n = torch.randint(1 << 30, (len(labels),), generator=g).tolist()
        return [fill(self.templates[i], self.concepts[k].names[j % len(self.concepts[k].names)])
                for i, j, k in zip(t, n, labels.tolist(), strict=True)]  # fmt: skip

    def every_prompt(self) -> list[str]:
        """Every prompt of every kind (the vocabulary the tiny text encoder is built over)."""
        out = [
            p
            for k in range(len(self.concepts))
            for kind in ("train", "paraphrase")
            for p in self.prompts(k, kind)
        ]
        return list(dict.fromkeys([NULL_PROMPT, *out]))


def fill(template: str, name: str) -> str:
    """`template` with `name` in its `{}`, the article before it agreeing ("a photo of an ankle boot")."""
    text = template.format(name)
    if name[:1] in "aeiou":
        text = text.replace(f" a {name}", f" an {name}")
        if text.startswith(f"a {name}"):
            text = "an" + text[1:]
    return text


# Fashion-MNIST (Xiao et al. 2017): its ten class names, two synonyms each for training, two held-out phrasings.
# Neighbours: the class pairs Fashion-MNIST classifiers confuse most (tops with tops, shoes with shoes).
# fmt: off
FASHION_MNIST = Captions(
    concepts=(
        Concept("t-shirt", ("t-shirt", "tee", "top"), ("tee shirt", "t shirt"), (6, 2)),
        Concept("trouser", ("trousers", "pants", "pair of jeans"), ("jeans", "pair of trousers"), (3,)),
        Concept("pullover", ("pullover", "sweater", "knit jumper"), ("jumper", "knit sweater"), (4, 6)),
        Concept("dress", ("dress", "gown", "summer frock"), ("frock", "summer dress"), (4, 6)),
        Concept("coat", ("coat", "jacket", "winter overcoat"), ("overcoat", "winter jacket"), (2, 6)),
        Concept("sandal", ("sandal", "flip-flop", "strappy slipper"), ("slipper", "strappy sandal"), (7, 9)),
        Concept("shirt", ("shirt", "blouse", "button-down"), ("button-down shirt", "dress shirt"), (0, 4)),
        Concept("sneaker", ("sneaker", "trainer", "running shoe"), ("running sneaker", "trainer shoe"), (5, 9)),
        Concept("bag", ("bag", "handbag", "shoulder purse"), ("purse", "shoulder bag"), ()),
        Concept("ankle-boot", ("ankle boot", "boot", "short bootie"), ("bootie", "short boot"), (7, 5)),
    ),
    templates=("a photo of a {}", "a picture of a {}", "a black and white photo of a {}", "an image of the {}",
               "a small {}", "{}"),
    held_out_templates=("a black and white picture of a {}", "a photo of the small {}", "an image of a {}", "the {}"),
)
# fmt: on
