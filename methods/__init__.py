"""Unlearning methods: each module registers itself in METHODS on import (this order is the tables' order)."""

# isort: off
from methods import original, sfd, sfd_2stage, finetune, esd, sa, salun, sfron, ga, rl, erasediff, retrain  # noqa: F401
from methods import text_esd, text_finetune, text_sa, text_salun, text_sfd, text_uce  # noqa: F401  (the text tier)
# isort: on
