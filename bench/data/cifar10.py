"""CIFAR-10 (Krizhevsky, 2009) from the official "CIFAR-10 python version" folder, read by our own reader.

The batches were pickled by Python 2's cPickle: their strings load as bytes (keys b'data', b'labels') with
`encoding="bytes"`, and each b'data' is a uint8 array of 10000 rows of 3072 bytes (1024 red, 1024 green, 1024
blue, each a row-major 32x32 plane). torchvision's CIFAR10 class md5-checks every file, which no fixture
could pass, so this reader checks the structure instead and names the file that breaks it.

Resolution: 32x32 natively (the `paper` preset); the CPU presets (`smoke`, `default`) downsample it to their
16x16 like every dataset, since a preset fixes the compute budget (a teacher at 32x32 costs 4x the steps' time).
"""

from __future__ import annotations

import _codecs
import pickle
from pathlib import Path

import numpy as np

from bench.api import Dataset
from bench.data.imagefolder import data_roots
from bench.errors import BenchError
from bench.registry import DATASETS

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

FOLDER = "cifar-10-batches-py"
FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
META = "batches.meta"
RELEASE = 'https://www.cs.toronto.edu/~kriz/cifar.html ("CIFAR-10 python version", cifar-10-python.tar.gz)'


# The only globals the release's pickles name (numpy arrays: _reconstruct + ndarray + dtype; Python-2 strings that
# Python 3 re-pickled: _codecs.encode). Anything else could run code while unpickling, so it is refused.
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _codecs.encode,
}


class ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle names a global that a CIFAR-10 batch never holds."""


class CifarUnpickler(pickle.Unpickler):
    """An unpickler that resolves only ALLOWED_GLOBALS: a crafted file cannot make it call anything else."""

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise ForbiddenGlobal(f"{module}.{name}") from None


def read_pickle(path: Path) -> dict[str, object]:
    """A Python-2 pickle as a dict with str keys (its bytes keys decoded as latin-1), unpickled restrictedly."""
    try:
        with open(path, "rb") as f:
            obj = CifarUnpickler(f, encoding="bytes").load()
    except FileNotFoundError as e:
        raise BenchError(f"CIFAR-10 file {path} is missing; extract {RELEASE} again") from e
    except ForbiddenGlobal as e:
        raise BenchError(
            f"CIFAR-10 file {path} refers to {e}, which no CIFAR-10 file holds (only numpy arrays, lists, numbers "
            f"and strings): refused to unpickle it, since such a file can run code when loaded. Do not use this "
            f"folder; delete the file and extract {RELEASE} again"
        ) from e
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, ImportError,
            IndexError, KeyError, MemoryError) as e:  # fmt: skip
        raise BenchError(f"cannot unpickle CIFAR-10 file {path} (corrupted or truncated?): {e!r}") from e
    if not isinstance(obj, dict):
        raise BenchError(f"CIFAR-10 file {path} holds a {type(obj).__name__}, expected a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file as uint8 images (N, 32, 32, 3) and int64 labels."""
    batch = read_pickle(path)
    if "data" not in batch or "labels" not in batch:
        raise BenchError(f"CIFAR-10 file {path} lacks b'data' or b'labels' (keys: {', '.join(batch)})")
    data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise BenchError(
            f"CIFAR-10 file {path}: b'data' is {data.dtype} {data.shape} with {len(labels)} labels, expected "
            "uint8 (N, 3072) with N labels"
        )
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise BenchError(f"CIFAR-10 file {path}: labels outside 0..9")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


@DATASETS.register("cifar10")
class CIFAR10(Dataset):
    name = "cifar10"
    version = "1"
    class_names = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")  # fmt: skip
    channels = 3
    native_size = 32

    def candidates(self) -> list[Path]:
        return data_roots(self.data_dir, FOLDER)

    def folder(self) -> Path:
        """The first candidate holding every file, else a BenchError naming the files and where they come from."""
        wanted = (META, *FILES["train"], *FILES["test"])
        for d in self.candidates():
            if all((d / f).is_file() for f in wanted):
                return d
        places = ", ".join(map(str, self.candidates())) or "(no --data-dir or BENCH_DATA_DIR given)"
        missing = next(
            (f"{d / f}" for d in self.candidates()[:1] for f in wanted if not (d / f).is_file()), ""
        )
        raise BenchError(
            f"CIFAR-10 not found: expected the folder {FOLDER}/ with {', '.join(wanted)} in one of: {places}"
            f"{f' (first missing: {missing})' if missing else ''}. Download {RELEASE} and extract it into the "
            "folder given with --data-dir or BENCH_DATA_DIR."
        )

    def data_files(self) -> list[Path]:
        folder = self.folder()
        return [folder / META, *(folder / f for split in FILES.values() for f in split)]

    def check(self) -> None:
        """Every file present and readable (a second for the real release): a broken one fails before any run."""
        for split in ("train", "test"):
            self.load_split(split)

    def load_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        folder = self.folder()
        meta = read_pickle(folder / META)
        names = tuple(n.decode("latin1") if isinstance(n, bytes) else n for n in meta.get("label_names", ()))
        if names != self.class_names:
            raise BenchError(
                f"{folder / META} names the classes {names}, not CIFAR-10's {self.class_names}: "
                "is this another dataset's folder?"
            )
        parts = [read_batch(folder / f) for f in FILES[split]]
        return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])
