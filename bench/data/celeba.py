"""CelebA (Liu et al., ICCV 2015) from the aligned release, with two forgetting protocols: attributes and identities.

Files (the official layout of https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html, flat as torchvision keeps them
or in the Drive's Img/, Anno/ and Eval/ subfolders): `img_align_celeba/` (202,599 aligned 178x218 JPEGs of
img_align_celeba.zip), `list_attr_celeba.txt` (a count line, a line of the 40 attribute names, then one line of
-1/1 values per image), `identity_CelebA.txt` and `list_eval_partition.txt` (one `<file> <number>` line per
image, in the same order). Files that disagree (length, order, values) are an error that names them.

Images: the 128x128 box centred at (x=89, y=121) of each 178x218 image (the CelebA 64x64 crop of the DDIM and
NCSN code), resized with antialiasing to 64x64 natively (the `paper` preset) or to a CPU preset's 16x16.

No paper defines a forgetting protocol on CelebA for these methods, so ours is:

(a) `celeba`, attribute forgetting. The model is conditioned on three binary attributes, Male x Smiling x
    Eyeglasses, i.e. 8 classes with index 4*Male + 2*Smiling + Eyeglasses ("woman", "woman with eyeglasses",
    "smiling woman", ..., "smiling man with eyeglasses"). Forget set `attr-<Attribute>` (attr-Male,
    attr-Smiling, attr-Eyeglasses) forgets every class that has the attribute and retains the other four; its
    anchor is class 0, "woman" (none of the three attributes), the one class every attr-* set retains.
    A forget set has one anchor, so e.g. "smiling man with eyeglasses" is mapped to "woman", not to its
    counterpart "smiling man". `class-K` and `classes-A-B-...` work as on every dataset. Splits: the official
    partition (train = 0, 162,770 images; test = 2, 19,962 images; validation unused).
(b) `celeba-id`, identity forgetting among the K = 10 most frequent identities (ties: smaller identity number
    first), in that order as classes "identity <number>". Forget set `id-<number>` (e.g. id-2880, CelebA's
    identity numbers) forgets one of them; its anchor is the next class in frequency order (wrapping around).
    The official partitions split identities apart, so each identity's images are split here instead: sorted by
    file name, the last 20% (at least one) are its test images.

The harness trains a separate judge for each protocol (a classifier of the 8 attribute classes, or of the K
identities) like the Fashion-MNIST one: they are two datasets with two model-store keys.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from bench.api import Dataset, ForgetSet
from bench.data.imagefolder import cached_arrays, data_roots, decode_images, fingerprint
from bench.errors import BenchError
from bench.registry import DATASETS

ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
    "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open",
    "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)  # fmt: skip
CONDITIONS = ("Male", "Smiling", "Eyeglasses")  # class index = 4*Male + 2*Smiling + Eyeglasses
ALIGNED_SIZE = (178, 218)
CROP = (25, 57, 153, 185)  # left, top, right, bottom: 128x128 centred at x=89, y=121
TOP_IDENTITIES = 10
ID_TEST_FRACTION = 0.2
RELEASE = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
IMAGES = ("img_align_celeba", "Img/img_align_celeba")
ANNOTATIONS = {
    "attr": ("list_attr_celeba.txt", "Anno/list_attr_celeba.txt"),
    "identity": ("identity_CelebA.txt", "Anno/identity_CelebA.txt"),
    "partition": ("list_eval_partition.txt", "Eval/list_eval_partition.txt"),
}


@dataclass(frozen=True)
class Annotations:
    files: tuple[str, ...]
    attributes: np.ndarray  # (N, 40) int8 in {-1, 1}
    identity: np.ndarray  # (N,) int64
    partition: np.ndarray  # (N,) int64


def _read_lines(path: Path) -> list[list[str]]:
    try:
        text = path.read_text(encoding="latin1")
    except OSError as e:
        raise BenchError(f"cannot read CelebA annotation file {path}: {e}") from e
    return [line.split() for line in text.splitlines()]


def read_attributes(path: Path) -> tuple[tuple[str, ...], np.ndarray]:
    """list_attr_celeba.txt: the image count, the attribute names, then `<file> v1 ... v40` with v in {-1, 1}."""
    lines = _read_lines(path)
    if len(lines) < 2 or len(lines[0]) != 1 or not lines[0][0].isdigit():
        raise BenchError(f"{path}: the first line should be the number of images (202599 in the real file)")
    header, rows = lines[1], [r for r in lines[2:] if r]
    missing = [a for a in CONDITIONS if a not in header]
    if missing:
        raise BenchError(
            f"{path}: the second line should name the 40 attributes; {', '.join(missing)} missing"
        )
    if len(rows) != int(lines[0][0]):
        raise BenchError(f"{path} says {lines[0][0]} images on its first line but lists {len(rows)}")
    bad = next((i for i, r in enumerate(rows) if len(r) != len(header) + 1), None)
    if bad is not None:
        raise BenchError(f"{path} line {bad + 3}: {len(rows[bad]) - 1} values, expected {len(header)}")
    try:
        values = (
            np.array([r[1:] for r in rows]).astype(np.int8) if rows else np.zeros((0, len(header)), np.int8)
        )
    except ValueError as e:
        raise BenchError(f"{path}: attribute values must be -1 or 1 ({e})") from e
    if not np.isin(values, (-1, 1)).all():
        raise BenchError(f"{path}: attribute values must be -1 or 1")
    keep = [header.index(a) for a in ATTRIBUTES if a in header]
    full = np.zeros((len(rows), len(ATTRIBUTES)), np.int8)
    full[:, [ATTRIBUTES.index(header[k]) for k in keep]] = values[:, keep]
    return tuple(r[0] for r in rows), full


def read_numbers(path: Path, files: tuple[str, ...], what: str) -> np.ndarray:
    """identity_CelebA.txt / list_eval_partition.txt: `<file> <number>` per image, in the order of `files`."""
    rows = [r for r in _read_lines(path) if r]
    if len(rows) != len(files):
        raise BenchError(
            f"CelebA annotation files disagree in length: {path.name} lists {len(rows)} images, "
            f"list_attr_celeba.txt lists {len(files)} ({path})"
        )
    for i, r in enumerate(rows):
        if len(r) != 2 or r[0] != files[i] or not r[1].isdigit():
            raise BenchError(
                f"{path} line {i + 1}: expected `{files[i]} <{what}>` (the order of list_attr_celeba.txt), "
                f"got {' '.join(r)!r}"
            )
    return np.array([int(r[1]) for r in rows], np.int64)


def _crop_box(width: int, height: int) -> tuple[float, float, float, float]:
    if (width, height) != ALIGNED_SIZE:
        raise BenchError(
            f"a CelebA image is {width}x{height}; the aligned images (img_align_celeba.zip, not the in-the-wild "
            f"img_celeba) are all {ALIGNED_SIZE[0]}x{ALIGNED_SIZE[1]}"
        )
    return CROP


class _CelebAFiles(Dataset):
    """The files both protocols read; subclasses choose classes, labels and splits."""

    version = "1"
    channels = 3
    native_size = 64

    def candidates(self) -> list[Path]:
        return data_roots(self.data_dir, "celeba")

    @cached_property
    def paths(self) -> dict[str, Path]:
        """The image folder and the three annotation files of the first candidate root that holds them all."""
        missing = ""
        for root in self.candidates():
            found = {"images": next((root / p for p in IMAGES if (root / p).is_dir()), None)}
            found |= {
                k: next((root / p for p in alts if (root / p).is_file()), None)
                for k, alts in ANNOTATIONS.items()
            }
            if all(found.values()):
                return found
            if any(found.values()) and not missing:  # a partial copy: say what it lacks
                lacks = [
                    (IMAGES if k == "images" else ANNOTATIONS[k])[0] for k, v in found.items() if v is None
                ]
                missing = f" ({root} lacks {', '.join(lacks)})"
        places = ", ".join(map(str, self.candidates())) or "(no --data-dir or BENCH_DATA_DIR given)"
        raise BenchError(
            f"CelebA not found: expected img_align_celeba/ (the aligned 178x218 JPEGs of img_align_celeba.zip), "
            f"list_attr_celeba.txt, identity_CelebA.txt and list_eval_partition.txt (flat, or in Img/, Anno/ and "
            f"Eval/) in one of: {places}{missing}. Download them from {RELEASE} (Align&Cropped Images, Anno, "
            "Eval) into the folder given with --data-dir or BENCH_DATA_DIR."
        )

    def data_files(self) -> list[Path]:
        images = self.paths["images"]
        return [self.paths[k] for k in ANNOTATIONS] + [images / f for f in self.annotations.files]

    @cached_property
    def annotations(self) -> Annotations:
        files, attributes = read_attributes(self.paths["attr"])
        identity = read_numbers(self.paths["identity"], files, "identity number")
        partition = read_numbers(self.paths["partition"], files, "partition 0/1/2")
        return Annotations(files, attributes, identity, partition)

    def check(self) -> None:
        """Parse the annotations and decode both splits into the cache: a broken file fails before any run."""
        for split in ("train", "test"):
            self.load_split(split)

    def _load(self, indices: np.ndarray, labels: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Decode the chosen images (through the decoded-image cache) at `image_size`."""
        if len(indices) == 0:
            raise BenchError(f"{self.name}: the {split} split is empty in {self.paths['attr'].parent}")
        paths = [self.paths["images"] / self.annotations.files[i] for i in indices]
        key = fingerprint(paths, [self.name, self.version, self.image_size, CROP, labels.tolist()])
        return cached_arrays(
            f"{self.name}-{split}-{self.image_size}", key,
            lambda: (decode_images(paths, size=self.image_size, gray=False, desc=f"{self.name} {split}",
                                   box=_crop_box), labels),
        )  # fmt: skip


@DATASETS.register("celeba")
class CelebA(_CelebAFiles):
    """Attribute protocol (module docstring, (a)): 8 classes of Male x Smiling x Eyeglasses."""

    name = "celeba"
    class_names = ("woman", "woman with eyeglasses", "smiling woman", "smiling woman with eyeglasses",
                   "man", "man with eyeglasses", "smiling man", "smiling man with eyeglasses")  # fmt: skip
    ANCHOR = 0  # "woman": none of the three attributes, retained by every attr-* forget set
    SPLITS = {"train": 0, "test": 2}  # official partition numbers

    def labels(self) -> np.ndarray:
        a = self.annotations.attributes
        bits = [(a[:, ATTRIBUTES.index(c)] > 0).astype(np.int64) for c in CONDITIONS]
        return 4 * bits[0] + 2 * bits[1] + bits[2]

    def forget_sets(self) -> list[str]:
        return [f"attr-{c}" for c in CONDITIONS] + super().forget_sets()

    def forget_set(self, name: str) -> ForgetSet:
        m = re.fullmatch(r"attr-(\w+)", name)
        if not m:
            return super().forget_set(name)
        if m.group(1) not in CONDITIONS:
            raise BenchError(
                f"forget set {name!r}: celeba is conditioned on {', '.join(CONDITIONS)}; "
                f"valid: {', '.join(f'attr-{c}' for c in CONDITIONS)}"
            )
        bit = 2 ** (len(CONDITIONS) - 1 - CONDITIONS.index(m.group(1)))
        forget = tuple(k for k in range(self.num_classes) if k & bit)
        retain = tuple(k for k in range(self.num_classes) if not k & bit)
        return ForgetSet(name, forget, retain, self.ANCHOR)

    def load_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images at `image_size` (decoding straight to it is cheaper than at 64x64) and class labels."""
        indices = np.flatnonzero(self.annotations.partition == self.SPLITS[split])
        return self._load(indices, self.labels()[indices], split)


@DATASETS.register("celeba-id")
class CelebAIdentity(_CelebAFiles):
    """Identity protocol (module docstring, (b)): the K most frequent identities are the classes."""

    name = "celeba-id"
    K = TOP_IDENTITIES

    @cached_property
    def identities(self) -> tuple[int, ...]:
        """The K most frequent identity numbers, most frequent first (ties: smaller number first)."""
        counts = Counter(self.annotations.identity.tolist())
        ranked = sorted(counts, key=lambda i: (-counts[i], i))[: self.K]
        if len(ranked) < 2 or counts[ranked[-1]] < 2:
            raise BenchError(
                f"celeba-id needs at least two identities with two images or more in {self.paths['identity']}"
            )
        return tuple(ranked)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(f"identity {i}" for i in self.identities)

    def forget_sets(self) -> list[str]:
        return [f"id-<number> (one of the {self.K} most frequent identities)", "class-K", "classes-A-B-..."]

    def forget_set(self, name: str) -> ForgetSet:
        m = re.fullmatch(r"id-(\d+)", name)
        if not m:
            return super().forget_set(name)
        number = int(m.group(1))
        if number not in self.identities:
            raise BenchError(
                f"forget set {name!r}: identity {number} is not among the {len(self.identities)} most frequent "
                f"CelebA identities; valid: {', '.join(f'id-{i}' for i in self.identities)}"
            )
        fs = super().forget_set(f"class-{self.identities.index(number)}")
        return ForgetSet(f"id-{number}", fs.forget, fs.retain, fs.anchor)  # id-007 is id-7

    def load_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images at `image_size` and labels; each identity's last 20% (by file name) are its test images."""
        files, identity = self.annotations.files, self.annotations.identity
        indices, labels = [], []
        for k, number in enumerate(self.identities):
            mine = sorted(np.flatnonzero(identity == number).tolist(), key=lambda i: files[i])
            n_test = max(1, round(ID_TEST_FRACTION * len(mine)))
            chosen = mine[-n_test:] if split == "test" else mine[:-n_test]
            indices += chosen
            labels += [k] * len(chosen)
        return self._load(np.array(indices, np.int64), np.array(labels, np.int64), split)
