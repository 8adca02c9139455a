"""Shared fixtures: offline hub settings, a Fashion-MNIST folder in the real IDX format, tiny models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest
import torch

from bench.data.idx import write_idx

FIXTURES = Path(__file__).parent / "fixtures"


def fixture_images() -> tuple[np.ndarray, np.ndarray]:
    f = np.load(FIXTURES / "fashion_mnist_test_500.npz")
    return f["images"], f["labels"]


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory) -> Path:
    """The 500 real fixture images written as the four gzipped IDX files (train and test alike)."""
    d = tmp_path_factory.mktemp("data") / "fashion-mnist"
    d.mkdir()
    images, labels = fixture_images()
    for prefix in ("train", "t10k"):
        write_idx(d / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return d


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session", autouse=True)
def _session_stores(tmp_path_factory):
    """Tests never read or write the user's own model store and caches (~/.cache/unlearn-bench)."""
    for key, name in (("BENCH_MODEL_DIR", "models"), ("BENCH_CACHE_DIR", "cache")):
        os.environ[key] = str(tmp_path_factory.mktemp(name))


@pytest.fixture(autouse=True)
def _restore_environ():
    """Code run in-process (a submitit job's environment, say) must not leak variables into later tests."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """CIFAR-10 and CelebA fixtures written in their real on-disk formats (tests/fixtures_real.py)."""
    from tests.fixtures_real import write_celeba, write_cifar10

    d = tmp_path_factory.mktemp("real")
    write_cifar10(d)
    write_celeba(d)
    return d


@pytest.fixture
def isolated_stores(tmp_path, monkeypatch):
    """Models, caches and the torch hub in this test's folder; no BENCH_DATA_DIR from the environment."""
    monkeypatch.setenv("BENCH_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("BENCH_DATA_DIR", raising=False)
