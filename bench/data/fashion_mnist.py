"""Fashion-MNIST (Xiao et al., 2017) from its real IDX files: the embedded, offline default dataset."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from bench.api import Dataset
from bench.data.idx import read_idx
from bench.data.imagefolder import data_root, data_roots
from bench.errors import BenchError
from bench.registry import DATASETS
from bench.text.captions import FASHION_MNIST as FASHION_MNIST_CAPTIONS
from bench.text.concepts import ConceptForgetSet, concept_forget_set

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
        """The user's data folder (authoritative when given: no fall-back), else the Debian package's."""
        roots = data_roots(self.data_dir, "fashion-mnist")
        return roots if data_root(self.data_dir) else [DEBIAN_DIR]

    @cached_property
    def files(self) -> dict[str, Path]:
        """The four IDX files, all from one folder (never one split here and the other there)."""
        names = [stem for stems in FILES.values() for stem in stems]
        for d in self.candidates():
            found = {
                stem: next((d / n for n in (stem + ".gz", stem) if (d / n).is_file()), None) for stem in names
            }
            if all(found.values()):
                return found
            if any(found.values()):
                lacks = ", ".join(f"{stem}(.gz)" for stem, f in found.items() if f is None)
                raise BenchError(
                    f"Fashion-MNIST folder {d} lacks {lacks}: all four IDX files must be in one folder"
                )
        wanted = ", ".join(n + ".gz" for n in names)
        raise BenchError(
            f"Fashion-MNIST not found in {', '.join(map(str, self.candidates()))}. "
            f"Expected the four IDX files ({wanted}). As root: `apt-get install dataset-fashion-mnist` "
            f"(puts them in {DEBIAN_DIR}); or download them from github.com/zalandoresearch/fashion-mnist "
            "into a folder given with --data-dir or BENCH_DATA_DIR."
        )

    def data_files(self) -> list[Path]:
        return list(self.files.values())

    def check(self) -> None:
        """Read and check both splits (a second): a broken or mismatched file fails before any run starts."""
        for split in FILES:
            self.load_split(split)

    def load_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        images_path, labels_path = (self.files[stem] for stem in FILES[split])
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1 or len(images) != len(labels):
            raise BenchError(
                f"Fashion-MNIST {split} files disagree: images {images.shape} vs labels {labels.shape}, expected "
                f"(N, 28, 28) and (N,) ({images_path}, {labels_path})"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise BenchError(f"Fashion-MNIST labels in {labels_path} lie outside 0..{self.num_classes - 1}")
        return images[..., None], labels.astype(np.int64)


@DATASETS.register("fashion-mnist-text")
class FashionMNISTText(FashionMNIST):
    """Fashion-MNIST's images with templated captions (bench/text/captions.py): the text-conditional tier's
    dataset. Its teacher is text-to-image; its judge is Fashion-MNIST's."""

    name = "fashion-mnist-text"
    tier = "text"
    image_dataset = "fashion-mnist"
    captions = FASHION_MNIST_CAPTIONS

    def forget_sets(self) -> list[str]:
        return [f"concept-{slug}" for slug in self.captions.slugs()]

    def forget_set(self, name: str) -> ConceptForgetSet:
        return concept_forget_set(self.captions, name)
