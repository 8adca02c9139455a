"""Datasets: each module registers itself in DATASETS on import."""

from bench.data import fashion_mnist  # noqa: F401
