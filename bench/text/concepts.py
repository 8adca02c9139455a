"""Concept forget sets of the text tier: `concept-<slug>` forgets a class under every name and template it was
trained with, and maps it to an override concept, as SFD's prompt substitution does.

SFD's `SD/training/dataset.py::ForgetPromptDataset` pairs each forget prompt with an override prompt made by
replacing the forgotten concept's words by the override concept's (`re.sub(concept_to_forget,
concept_to_override, prompt)`). Here every prompt is a template filled with a name, so the override prompt is the
same template filled with the override concept's name of the same rank ("a photo of a tee" -> "a photo of a
pants"): always a training prompt of the anchor class, which the teacher knows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bench.api import ForgetSet
from bench.errors import BenchError
from bench.text.captions import Captions, fill


@dataclass(frozen=True)
class ConceptForgetSet(ForgetSet):
    """A class forget set (forget / retain / anchor are classes, as the judge scores them) whose conditions are
    the prompts of `captions`."""

    captions: Captions

    def with_anchor(self, anchor: int) -> ConceptForgetSet:
        return ConceptForgetSet(**{**vars(super().with_anchor(anchor)), "captions": self.captions})

    def names(self, k: int | None = None) -> tuple[str, ...]:
        """The training names of class k (default: of every forgotten class): the words ESD and UCE erase."""
        classes = self.forget if k is None else (k,)
        return tuple(n for c in classes for n in self.captions.concepts[c].names)

    def forget_prompts(self) -> list[str]:
        """Every training prompt of the forgotten classes (every name in every template)."""
        return [p for k in self.forget for p in self.captions.prompts(k, "train")]

    def retain_prompts(self) -> list[str]:
        return [p for k in self.retain for p in self.captions.prompts(k, "train")]

    def override_pairs(self, anchor: int | None = None) -> list[tuple[str, str]]:
        """(forget prompt, override prompt) per training prompt of the forgotten classes: ForgetPromptDataset's
        pairs, the override naming the anchor class (module docstring)."""
        target = self.captions.concepts[self.anchor if anchor is None else anchor].names
        return [(fill(t, name), fill(t, target[j % len(target)]))
                for k in self.forget for t in self.captions.templates
                for j, name in enumerate(self.captions.concepts[k].names)]  # fmt: skip

    def neighbours(self) -> tuple[int, ...]:
        """The retained classes the forgotten ones are confused with, which erasure must leave intact."""
        near = {j for k in self.forget for j in self.captions.concepts[k].neighbours}
        return tuple(sorted(near - set(self.forget)))


def concept_forget_set(captions: Captions, name: str) -> ConceptForgetSet:
    """`concept-<slug>` (or its alias `class-K`): one class forgotten under all its names; the anchor is the next
    class, as in the class tier (bench.api.Dataset.forget_set)."""
    slugs = captions.slugs()
    m = re.fullmatch(r"concept-(.+)|class-(\d+)", name)
    if not m:
        raise BenchError(f"unknown forget set {name!r} for the text tier; valid: "
                         f"{', '.join('concept-' + s for s in slugs)} (or class-K, K in 0..{len(slugs) - 1})")  # fmt: skip
    if m.group(2) is not None:
        k = int(m.group(2))
        if k >= len(slugs):
            raise BenchError(f"forget set {name!r}: class {k} does not exist (0..{len(slugs) - 1})")
    else:
        k = captions.index(m.group(1))
    retain = tuple(j for j in range(len(slugs)) if j != k)
    return ConceptForgetSet(f"concept-{slugs[k]}", (k,), retain, (k + 1) % len(slugs), captions)
