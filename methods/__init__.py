"""Unlearning methods: each module registers itself in METHODS on import."""

from methods import esd, finetune, original, retrain, sa, salun, sfd  # noqa: F401
