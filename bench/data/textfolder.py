"""`textfolder:PATH`: a user's own concepts for the text tier, an image folder plus the words for each class.

PATH holds what `imagefolder:PATH` reads (train/<class>/*.png|jpg, optionally test/) and `captions.json`:

    {"templates": ["a photo of a {}", ...],                 # the prompts the teacher is trained and unlearned on
     "held_out_templates": ["an image of a {}", ...],       # evaluation only (the paraphrase prompts); >= 1
     "concepts": {"<class folder>": {"names": ["cat", "kitty"],    # >= 1; the words ESD and UCE erase
                                     "held_out": ["kitten"],        # evaluation only (may be empty)
                                     "neighbours": ["dog"]}, ...}}  # classes erasure must keep (may be empty)

Every class folder needs an entry and every entry a folder. The judge is the image folder's: the class tier's judge
of `imagefolder:PATH`, trained on these images by its recipe when the store has none (as for an external
teacher), so the same folder scores both tiers alike. With `--teacher` a Stable Diffusion folder is unlearned on
these concepts (its VAE must decode to the dataset's image size); without, the tiny text teacher is trained on
them. For the tiny teacher, held-out words must be made of tokens that occur in the training captions
(bench/text/captions.py says why); a real CLIP text encoder knows them anyway.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path

from bench.data.imagefolder import ImageFolder, fingerprint
from bench.errors import BenchError
from bench.registry import DATASETS
from bench.text.captions import Captions, Concept
from bench.text.concepts import ConceptForgetSet, concept_forget_set

CAPTIONS_FILE = "captions.json"


@DATASETS.register("textfolder")
class TextFolder(ImageFolder):
    """A user's labelled images with captions.json, named on the command line as `textfolder:PATH`."""

    tier = "text"
    kind = "textfolder"

    @cached_property
    def image_folder(self) -> ImageFolder:
        """The same images as a class-tier dataset: whose judge scores this one."""
        return ImageFolder(data_dir=self.data_dir, image_size=self._image_size, path=self.root)

    @property
    def image_dataset(self) -> str:
        return self.image_folder.name

    @cached_property
    def captions(self) -> Captions:
        return read_captions(self.root / CAPTIONS_FILE, self.class_names)

    @cached_property
    def name(self) -> str:  # the model-store key: the folder's name and a digest of its files and captions
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.root.name)
        return f"textfolder-{slug}-{fingerprint(self.data_files())[:8]}"

    def data_files(self) -> list[Path]:
        return [*super().data_files(), self.root / CAPTIONS_FILE]

    def check(self) -> None:
        self.captions  # noqa: B018 (read and checked before the images)
        super().check()

    def forget_sets(self) -> list[str]:
        if self.root is None:  # `bench ls`: no folder named
            return ["concept-<class folder>"]
        return [f"concept-{slug}" for slug in self.captions.slugs()]

    def forget_set(self, name: str) -> ConceptForgetSet:
        return concept_forget_set(self.captions, name)

    def describe(self) -> dict:
        return {**super().describe(), "captions": str(self.root / CAPTIONS_FILE)}


def slug(name: str) -> str:
    """A class folder's name as a forget set's: `Ankle Boot` -> `ankle-boot`."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def read_captions(path: Path, classes: tuple[str, ...]) -> Captions:
    """captions.json (module docstring) as Captions, its concepts in the class order of the folders."""
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise BenchError(f"textfolder: {path} not found; it names each class folder's words (the format is in "
                         "bench/data/textfolder.py and the README's text tier)") from None  # fmt: skip
    except (OSError, ValueError) as e:
        raise BenchError(f"textfolder: cannot read {path}: {e}") from e

    def strings(value, where: str, *, least: int) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise BenchError(f"{path}: {where} must be a list of non-empty strings, not {value!r}")
        if len(value) < least:
            raise BenchError(f"{path}: {where} needs at least {least}")
        return tuple(value)

    if not isinstance(spec, dict) or not isinstance(spec.get("concepts"), dict):
        raise BenchError(f'{path}: expected an object with "templates", "held_out_templates" and "concepts"')
    templates = strings(spec.get("templates"), "templates", least=1)
    held_out_templates = strings(spec.get("held_out_templates"), "held_out_templates", least=1)
    for t in (*templates, *held_out_templates):
        if t.count("{}") != 1:
            raise BenchError(f"{path}: template {t!r} needs exactly one {{}} where the concept's name goes")
    entries = spec["concepts"]
    missing, extra = [c for c in classes if c not in entries], [c for c in entries if c not in classes]
    if missing or extra:
        raise BenchError(f"{path}: its concepts must be the class folders ({', '.join(classes)}); "
                         + "; ".join(x for x in (missing and f"missing: {', '.join(missing)}",
                                                 extra and f"no such folder: {', '.join(extra)}") if x))  # fmt: skip
    slugs = [slug(c) for c in classes]
    if len(set(slugs)) < len(slugs) or not all(slugs):
        raise BenchError(f"{path}: class folders {', '.join(classes)} do not give distinct forget-set names")
    concepts = []
    for c, s in zip(classes, slugs, strict=True):
        entry = entries[c]
        if not isinstance(entry, dict) or set(entry) - {"names", "held_out", "neighbours"}:
            raise BenchError(
                f'{path}: concept {c!r} takes "names", "held_out" and "neighbours", not {entry!r}'
            )
        near = strings(entry.get("neighbours", []), f"{c}.neighbours", least=0)
        unknown = [n for n in near if n not in classes or n == c]
        if unknown:
            raise BenchError(f"{path}: {c}.neighbours names {', '.join(unknown)}: not another class folder")
        concepts.append(Concept(s, strings(entry.get("names"), f"{c}.names", least=1),
                                strings(entry.get("held_out", []), f"{c}.held_out", least=0),
                                tuple(classes.index(n) for n in near)))  # fmt: skip
    return Captions(tuple(concepts), templates, held_out_templates)
