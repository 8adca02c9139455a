"""Unlearning methods: each module registers itself in METHODS on import."""

from methods import finetune, original, sfd  # noqa: F401
