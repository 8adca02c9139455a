"""IDX reading, the Fashion-MNIST dataset and its forget sets."""

import gzip

import numpy as np
import pytest

from bench.data.fashion_mnist import FashionMNIST
from bench.data.idx import read_idx, write_idx
from bench.errors import BenchError
from tests.conftest import fixture_images


def test_idx_roundtrip_plain_and_gz(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        write_idx(tmp_path / name, arr)
        np.testing.assert_array_equal(read_idx(tmp_path / name), arr)


def test_idx_header_is_the_real_format(tmp_path):
    write_idx(tmp_path / "x.gz", np.zeros((5, 28, 28), np.uint8))
    with gzip.open(tmp_path / "x.gz") as f:
        raw = f.read()
    assert raw[:4] == b"\x00\x00\x08\x03"  # magic 2051 of MNIST image files
    assert int.from_bytes(raw[4:8], "big") == 5 and int.from_bytes(raw[8:12], "big") == 28


def test_truncated_idx_names_the_file(tmp_path):
    write_idx(tmp_path / "t-idx3-ubyte", np.zeros((5, 28, 28), np.uint8))
    data = (tmp_path / "t-idx3-ubyte").read_bytes()
    (tmp_path / "t-idx3-ubyte").write_bytes(data[:-10])
    with pytest.raises(BenchError, match="t-idx3-ubyte.*truncated"):
        read_idx(tmp_path / "t-idx3-ubyte")


def test_fashion_mnist_reads_fixture(fmnist_dir):
    ds = FashionMNIST(data_dir=fmnist_dir.parent, image_size=16)
    x, y = ds.images("test")
    images, labels = fixture_images()
    assert x.shape == (500, 1, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert (y.numpy() == labels).all()
    x28, _ = FashionMNIST(data_dir=fmnist_dir, image_size=28).images("test")
    np.testing.assert_allclose(((x28[:, 0] + 1) * 127.5).round().numpy(), images)
    x0, y0 = ds.images("train", classes=(0, 3))
    assert set(y0.tolist()) == {0, 3} and len(x0) == 100


def test_images_follow_bench_data_dir_as_it_changes(tmp_path, fmnist_dir, monkeypatch):
    """The in-process image cache once served one BENCH_DATA_DIR's images after it had changed (a benchmark read
    the 500-image test fixture as if it were Fashion-MNIST)."""
    images, labels = fixture_images()
    small = tmp_path / "small"
    small.mkdir()
    for prefix in ("train", "t10k"):
        write_idx(small / f"{prefix}-images-idx3-ubyte.gz", images[:40])
        write_idx(small / f"{prefix}-labels-idx1-ubyte.gz", labels[:40])
    monkeypatch.setenv("BENCH_DATA_DIR", str(fmnist_dir))
    assert len(FashionMNIST(image_size=16).images("test")[0]) == 500
    monkeypatch.setenv("BENCH_DATA_DIR", str(small))
    assert len(FashionMNIST(image_size=16).images("test")[0]) == 40


def test_missing_data_says_what_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setattr("bench.data.fashion_mnist.DEBIAN_DIR", tmp_path / "nothing")
    monkeypatch.delenv("BENCH_DATA_DIR", raising=False)
    with pytest.raises(BenchError, match="train-images-idx3-ubyte.gz.*apt-get install dataset-fashion-mnist"):
        FashionMNIST(data_dir=tmp_path).load_split("train")


def test_forget_sets_and_anchors():
    ds = FashionMNIST()
    fs = ds.forget_set("class-0")
    assert fs.forget == (0,) and fs.anchor == 1 and 0 not in fs.retain and len(fs.retain) == 9
    assert ds.forget_set("class-9").anchor == 0
    multi = ds.forget_set("classes-1-2-3")
    assert multi.forget == (1, 2, 3) and multi.anchor == 4
    assert ds.forget_set("classes-9-0").anchor == 1
    with pytest.raises(BenchError, match="class-K"):
        ds.forget_set("dogs")
    with pytest.raises(BenchError, match="does not exist"):
        ds.forget_set("class-12")
    with pytest.raises(BenchError, match="inside the forget set"):
        type(fs)("x", (0,), (1, 2), 0)
    with pytest.raises(BenchError, match="must be a retained class"):
        fs.with_anchor(0)
