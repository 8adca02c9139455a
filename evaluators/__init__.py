"""Evaluators: each module registers itself in EVALUATORS on import."""

from evaluators import fid, forget_accuracy, wallclock  # noqa: F401
