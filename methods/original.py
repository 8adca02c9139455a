"""`original`: the untouched teacher, the reference row every table needs."""

from __future__ import annotations

from dataclasses import dataclass

from bench.api import Method
from bench.registry import METHODS


@dataclass(frozen=True)
class OriginalConfig:
    """No settings: the teacher is returned as it is."""


@METHODS.register("original")
class Original(Method):
    name = "original"
    paper = "none: the pretrained teacher before any unlearning (the 'Pretrained' row of SA, SalUn and SFD tables)"
    Config = OriginalConfig
    tier = "any"  # the reference row of both tiers
    stable_diffusion = True  # data-free: it runs on a Stable Diffusion teacher too
    not_budgeted = "no unlearning: the teacher itself, the same at every budget"

    def unlearn(self, teacher, forget_set, ctx):
        return teacher
