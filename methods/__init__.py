"""Unlearning methods: each module registers itself in METHODS on import (this order is the tables' order)."""

# isort: off
from methods import original, sfd, sfd_2stage, finetune, esd, sa, salun, sfron, ga, rl, erasediff, retrain  # noqa: F401
# isort: on
