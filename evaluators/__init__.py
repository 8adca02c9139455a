"""Evaluators: each module registers itself in EVALUATORS on import."""

from evaluators import clip_score, fid, forget_accuracy, wallclock  # noqa: F401
