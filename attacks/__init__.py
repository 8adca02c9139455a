"""Attacks: each module registers itself in ATTACKS on import (this order is the suite's and the tables' order)."""

# isort: off
from attacks import kshot, benign, inversion, concealment, conditions, textual_inversion  # noqa: F401
# isort: on
