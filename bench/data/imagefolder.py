"""`imagefolder:PATH`: any labelled image set laid out as PATH/train/<class>/*.png|jpg (and optionally PATH/test/).

The helpers here (data roots, decoding with a crop, the on-disk cache of decoded arrays) also serve CelebA.

Protocol: classes are the sorted subfolder names of train/. Every image is converted to RGB (to grayscale when
all images are grayscale), center-cropped to a square and resized to the run's resolution; the native
resolution is the shorter side of the smallest image. Without a test/ folder, a fixed split keeps 10% of each
class (at least one image, chosen with a seed-0 permutation of the sorted file names) as the test split.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from bench.api import Dataset
from bench.errors import BenchError
from bench.models.store import cache_dir
from bench.registry import DATASETS

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F", "P;L"}
TEST_FRACTION = 0.1
Box = tuple[float, float, float, float]


def data_root(data_dir: Path | None) -> Path | None:
    """The folder the user named for the data: --data-dir, else BENCH_DATA_DIR, else None. It is authoritative:
    data is read from it or not at all, so a missing folder is an error, never a fall-back elsewhere."""
    root, flag = (
        (data_dir, "--data-dir") if data_dir else (os.environ.get("BENCH_DATA_DIR"), "BENCH_DATA_DIR")
    )
    if not root:
        return None
    root = Path(root).expanduser()
    if not root.is_dir():
        raise BenchError(f"{flag} {root}: {'not a folder' if root.exists() else 'no such folder'}")
    return root


def data_roots(data_dir: Path | None, subdir: str) -> list[Path]:
    """Where a dataset may live inside the user's data folder (data_root): <root>/<subdir>, or <root> itself."""
    root = data_root(data_dir)
    return [root / subdir, root] if root else []


def center_square(width: int, height: int) -> Box:
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def decode_image(
    path: Path, *, size: int, gray: bool, box: Callable[[int, int], Box] = center_square
) -> np.ndarray:
    """One image as uint8 (size, size, C): the crop `box(width, height)` resized with antialiasing."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            left, top, right, bottom = box(width, height)
            if img.format == "JPEG":
                # Decode at the smallest DCT scale that still covers the crop at `size`: 4-8x faster for small sizes.
                scale = size / min(right - left, bottom - top)
                img.draft("L" if gray else "RGB", (math.ceil(width * scale), math.ceil(height * scale)))
            s = img.size[0] / width
            img = img.convert("L" if gray else "RGB")
            img = img.resize(
                (size, size), Image.Resampling.BILINEAR, box=(left * s, top * s, right * s, bottom * s)
            )
            arr = np.asarray(img, dtype=np.uint8)
    except FileNotFoundError as e:
        raise BenchError(f"image {path} is missing") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BenchError(f"cannot decode image {path} (corrupted or truncated?): {e}") from e
    return arr[..., None] if gray else arr


def decode_images(paths: list[Path], *, size: int, gray: bool, desc: str,
                  box: Callable[[int, int], Box] = center_square) -> np.ndarray:  # fmt: skip
    """Decode many images in threads (PIL releases the GIL while decoding) into (N, size, size, C) uint8."""
    out = np.empty((len(paths), size, size, 1 if gray else 3), np.uint8)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        images = pool.map(lambda p: decode_image(p, size=size, gray=gray, box=box), paths, chunksize=64)
        for i, arr in enumerate(tqdm(images, total=len(paths), desc=desc, unit="img", mininterval=2,
                                     disable=len(paths) < 5000)):  # fmt: skip
            out[i] = arr
    return out


def fingerprint(paths: list[Path], extra: object = None) -> str:
    """A digest of file names, sizes and modification times: it changes when any file is replaced."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for p in paths:
        try:
            st = p.stat()
        except FileNotFoundError as e:
            raise BenchError(f"image {p} is missing") from e
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def cached_arrays(kind: str, key: str, build: Callable[[], tuple[np.ndarray, np.ndarray]]):
    """(images, labels) from the decoded-image cache, built and stored atomically on a miss.

    Decoding the 162,770 CelebA training JPEGs takes minutes; every run process would otherwise pay it again.
    """
    path = cache_dir() / "data" / f"{kind}-{key}.npz"
    if path.is_file():
        try:
            with np.load(path) as f:
                return f["images"], f["labels"]
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is rebuilt below
    images, labels = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, images=images, labels=labels)
    os.replace(tmp, path)
    return images, labels


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS and not p.name.startswith(".")
    )


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


@DATASETS.register("imagefolder")
class ImageFolder(Dataset):
    """A user's folder of labelled images, named on the command line as `imagefolder:PATH`."""

    version = "1"
    takes_path = True  # named as imagefolder:PATH
    kind = "imagefolder"  # its name on the command line (and in its messages)

    def __init__(
        self, data_dir: Path | None = None, image_size: int | None = None, path: str | Path | None = None
    ):
        self.data_dir = Path(data_dir) if data_dir else None
        self.root = Path(path).expanduser().resolve() if path else None
        self._image_size = image_size

    # Properties of the files, read lazily (headers only) so that `bench ls` needs no folder.
    @property
    def image_size(self) -> int:
        return self._image_size or self.native_size

    @cached_property
    def _layout(self) -> dict:
        self._check_folders()
        train = self.root / "train"
        classes = [d.name for d in _subfolders(train)]
        files = {"train": [(f, k) for k, c in enumerate(classes) for f in _image_files(train / c)]}
        if (self.root / "test").is_dir():
            unknown = [d.name for d in _subfolders(self.root / "test") if d.name not in classes]
            if unknown:
                raise BenchError(
                    f"{self.root / 'test'} has class folders that {train} lacks: {', '.join(unknown)}"
                )
            files["test"] = [(f, k) for k, c in enumerate(classes) if (self.root / "test" / c).is_dir()
                             for f in _image_files(self.root / "test" / c)]  # fmt: skip
            if not files["test"]:
                raise BenchError(f"{self.root / 'test'} holds no images; remove it to split train/ instead")
        else:
            files = _seeded_split(files["train"], classes, train)
        for k, c in enumerate(classes):
            if not any(label == k for _, label in files["train"]):
                raise BenchError(f"class folder {train / c} holds no images ({', '.join(EXTENSIONS)})")
        sizes, gray = [], True
        for f, _ in files["train"] + files.get("test", []):
            try:
                with Image.open(f) as img:
                    sizes.append(min(img.size))
                    gray &= img.mode in GRAY_MODES
            except (OSError, SyntaxError, ValueError) as e:
                raise BenchError(f"cannot read image {f} (corrupted?): {e}") from e
        return {"classes": tuple(classes), "files": files, "native": min(sizes), "gray": gray}

    @property
    def class_names(self) -> tuple[str, ...]:
        return self._layout["classes"]

    @property
    def channels(self) -> int:
        return 1 if self._layout["gray"] else 3

    @property
    def native_size(self) -> int:
        return self._layout["native"]

    @cached_property
    def name(self) -> str:  # the model-store key: the folder's name and a digest of its files
        files = [f for split in self._layout["files"].values() for f, _ in split]
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.root.name)
        return f"imagefolder-{slug}-{fingerprint(files)[:8]}"

    def data_files(self) -> list[Path]:
        return [f for split in self._layout["files"].values() for f, _ in split]

    def check(self) -> None:
        """Layout, headers and both splits decoded into the cache: a broken file fails before any run."""
        for split in ("train", "test"):
            self.load_split(split)

    def _check_folders(self) -> None:
        if self.root is None:
            raise BenchError(f"dataset {self.kind} needs its folder: --datasets {self.kind}:PATH")
        if not (self.root / "train").is_dir():
            raise BenchError(
                f"{self.kind}: {self.root / 'train'} not found; expected {self.root}/train/<class name>/*.png|jpg "
                f"(one subfolder per class) and optionally {self.root}/test/<class name>/"
            )
        if len(_subfolders(self.root / "train")) < 2:
            raise BenchError(f"{self.kind}: {self.root / 'train'} needs at least two class subfolders")

    def forget_sets(self) -> list[str]:
        if self.root is None:
            return ["class-K", "classes-A-B-..."]
        return super().forget_sets()

    def load_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images at `image_size` (decoding straight to it is cheaper than at native size) and labels."""
        pairs = self._layout["files"][split]
        paths, labels = [p for p, _ in pairs], np.array([k for _, k in pairs], np.int64)
        if not paths:
            raise BenchError(f"{self.kind} {self.root}: the {split} split is empty")
        key = fingerprint(paths, [self.image_size, self._layout["gray"]])
        return cached_arrays(
            f"{self.name}-{split}-{self.image_size}", key,
            lambda: (decode_images(paths, size=self.image_size, gray=self._layout["gray"], desc=split), labels),
        )  # fmt: skip

    def describe(self) -> dict:
        return {**super().describe(), "path": str(self.root)}


def _seeded_split(pairs: list[tuple[Path, int]], classes: list[str], train: Path) -> dict[str, list]:
    """The fixed test split of a folder without test/: TEST_FRACTION of each class, at least one image."""
    rng = np.random.default_rng(0)
    out: dict[str, list] = {"train": [], "test": []}
    for k, c in enumerate(classes):
        files = [f for f, label in pairs if label == k]
        if len(files) < 2:
            raise BenchError(f"class folder {train / c} needs at least two images to split off a test image")
        order = rng.permutation(len(files))
        n_test = max(1, round(TEST_FRACTION * len(files)))
        test = set(order[:n_test].tolist())
        for i, f in enumerate(files):
            out["test" if i in test else "train"].append((f, k))
    return out
