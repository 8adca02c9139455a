"""Fashion-MNIST (Xiao et al., 2017) from its real IDX files: the embedded, offline default dataset."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bench.api import Dataset
from bench.data.idx import read_idx
from bench.errors import BenchError
from bench.registry import DATASETS

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@DATASETS.register("fashion-mnist")
class FashionMNIST(Dataset):
    name = "fashion-mnist"
    version = "1"
    class_names = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")  # fmt: skip
    channels = 1
    native_size = 28

    def candidates(self) -> list[Path]:
        roots = [self.data_dir] if self.data_dir else []
        if os.environ.get("BENCH_DATA_DIR"):
            roots.append(Path(os.environ["BENCH_DATA_DIR"]))
        dirs = [d for r in roots for d in (r / "fashion-mnist", r)]
        return [*dirs, DEBIAN_DIR]

    def _find(self, stem: str) -> Path:
        for d in self.candidates():
            for name in (stem + ".gz", stem):
                if (d / name).is_file():
                    return d / name
        wanted = ", ".join(f + ".gz" for pair in FILES.values() for f in pair)
        raise BenchError(
            f"Fashion-MNIST file {stem}(.gz) not found in {', '.join(map(str, self.candidates()))}. "
            f"Expected the four IDX files ({wanted}). As root: `apt-get install dataset-fashion-mnist` "
            f"(puts them in {DEBIAN_DIR}); or download them from github.com/zalandoresearch/fashion-mnist "
            "into a folder given with --data-dir or BENCH_DATA_DIR."
        )

    def check(self) -> None:
        for stems in FILES.values():
            for stem in stems:
                self._find(stem)

    def load_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        images_stem, labels_stem = FILES[split]
        images, labels = read_idx(self._find(images_stem)), read_idx(self._find(labels_stem))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise BenchError(
                f"Fashion-MNIST {split} files disagree: images {images.shape} vs labels {labels.shape} "
                f"({self._find(images_stem)}, {self._find(labels_stem)})"
            )
        return images[..., None], labels.astype(np.int64)
