"""Writers of small fixtures in the real on-disk formats: CIFAR-10 Python-2 pickles, aligned CelebA, image folders,
the FID Inception state dict, a saved tiny CLIP and a tiny external diffusers teacher."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from bench.data.celeba import ATTRIBUTES
from bench.data.cifar10 import CIFAR10

# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10: what Python 2's cPickle.dump(dict, f, 2) wrote. Strings are BINSTRINGs (they load as bytes, and not at
# all under Python 3's default ASCII decoding), numpy arrays are numpy.core.multiarray._reconstruct + BUILD.


def _py2_string(b: bytes) -> bytes:
    return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))) + b


def _py2_array(a: np.ndarray) -> bytes:
    assert a.dtype == np.uint8
    out = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + b"(K\x00t" + _py2_string(b"b") + b"\x87R"
    )
    dtype = b"cnumpy\ndtype\n" + _py2_string(b"u1") + b"K\x00K\x01\x87R"
    dtype += b"(K\x03" + _py2_string(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    shape = (
        b"(" + b"".join(b"M" + struct.pack("<H", n) if n > 255 else b"K" + bytes([n]) for n in a.shape) + b"t"
    )
    return out + b"(K\x01" + shape + dtype + b"\x89" + _py2_string(a.tobytes()) + b"tb"


def _py2(obj) -> bytes:
    if isinstance(obj, dict):
        return b"}(" + b"".join(_py2(k) + _py2(v) for k, v in obj.items()) + b"u"
    if isinstance(obj, list):
        return b"](" + b"".join(_py2(v) for v in obj) + b"e"
    if isinstance(obj, bool) or obj is None:
        raise TypeError(obj)
    if isinstance(obj, int):
        return (
            b"K" + bytes([obj])
            if 0 <= obj < 256
            else b"M" + struct.pack("<H", obj)
            if 0 <= obj < 65536
            else b"J" + struct.pack("<i", obj)
        )
    if isinstance(obj, str):
        return _py2_string(obj.encode("latin1"))
    if isinstance(obj, np.ndarray):
        return _py2_array(obj)
    raise TypeError(type(obj))


def py2_pickle(obj) -> bytes:
    return b"\x80\x02" + _py2(obj) + b"."


def cifar_image(label: int, rng: np.random.Generator) -> np.ndarray:
    """A 32x32x3 image whose colour and bright square depend on the class."""
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40], [200, 40, 200],
                        [40, 200, 200], [120, 120, 120], [250, 150, 50], [50, 100, 250], [20, 20, 20]])  # fmt: skip
    img = colours[label] + rng.normal(0, 20, (32, 32, 3))
    r, c = divmod(label, 5)
    img[4 + 12 * r : 14 + 12 * r, 2 + 6 * c : 8 + 6 * c] = 255
    return img.clip(0, 255).astype(np.uint8)


def write_cifar10(root: Path, *, per_class_batch: int = 1, per_class_test: int = 2) -> Path:
    """root/cifar-10-batches-py/ with data_batch_1..5 (per_class_batch images per class each), test_batch,
    batches.meta: Python-2 pickles as the official release has them."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def batch(label: str, n_per_class: int) -> dict:
        labels = [k for k in range(10) for _ in range(n_per_class)]
        rng.shuffle(labels)
        images = np.stack([cifar_image(k, rng) for k in labels])  # (N, 32, 32, 3)
        data = images.transpose(0, 3, 1, 2).reshape(len(labels), 3072)  # R plane, G plane, B plane
        names = [f"image_{i:05d}.png" for i in range(len(labels))]
        return {
            "batch_label": label,
            "labels": labels,
            "data": np.ascontiguousarray(data),
            "filenames": names,
        }

    for i in range(1, 6):
        (d / f"data_batch_{i}").write_bytes(py2_pickle(batch(f"training batch {i} of 5", per_class_batch)))
    (d / "test_batch").write_bytes(py2_pickle(batch("testing batch 1 of 1", per_class_test)))
    meta = {
        "num_cases_per_batch": 10 * per_class_batch,
        "label_names": list(CIFAR10.class_names),
        "num_vis": 3072,
    }
    (d / "batches.meta").write_bytes(py2_pickle(meta))
    return d


# ---------------------------------------------------------------------------------------------------------------
# CelebA: img_align_celeba/*.jpg (178x218) and the three annotation files with their real headers.

# (file number, identity, partition, Male, Smiling, Eyeglasses)
CELEBA_ROWS = [
    (1, 2880, 0, 0, 0, 0), (2, 2880, 0, 0, 1, 0), (3, 2880, 0, 0, 0, 1), (4, 2880, 2, 0, 1, 1),
    (5, 2937, 0, 1, 0, 0), (6, 2937, 0, 1, 1, 0), (7, 2937, 0, 1, 0, 1), (8, 2937, 2, 1, 1, 1),
    (9, 4126, 0, 1, 1, 1), (10, 4126, 0, 0, 1, 0), (11, 4126, 2, 1, 1, 0), (12, 4126, 2, 0, 1, 0),
]  # fmt: skip


def face_image(identity: int, male: int, smiling: int, glasses: int) -> Image.Image:
    """A 178x218 drawing of a face with the three attributes visible inside the 128x128 crop."""
    img = Image.new("RGB", (178, 218), (60 + identity % 97, 90, 140))
    d = ImageDraw.Draw(img)
    d.ellipse((45, 60, 133, 180), fill=(230, 190 - 40 * male, 160))
    d.ellipse((65, 100, 80, 110), fill=(40, 30, 30))
    d.ellipse((98, 100, 113, 110), fill=(40, 30, 30))
    if glasses:
        d.rectangle((58, 94, 87, 116), outline=(0, 0, 0), width=4)
        d.rectangle((91, 94, 120, 116), outline=(0, 0, 0), width=4)
    if smiling:
        d.chord((68, 130, 110, 160), 0, 180, fill=(250, 250, 250))
    else:
        d.line((72, 145, 106, 145), fill=(120, 40, 40), width=3)
    if male:
        d.rectangle((60, 160, 118, 178), fill=(70, 50, 40))
    return img


def write_celeba(root: Path, *, crlf: bool = False) -> Path:
    """root/celeba/ laid out as torchvision keeps the aligned release: a dozen JPEGs and three annotation files."""
    d = root / "celeba"
    (d / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    nl = "\r\n" if crlf else "\n"
    attr_lines = [str(len(CELEBA_ROWS)), " ".join(ATTRIBUTES) + " "]
    ids, parts = [], []
    for num, identity, partition, male, smiling, glasses in CELEBA_ROWS:
        name = f"{num:06d}.jpg"
        face_image(identity, male, smiling, glasses).save(d / "img_align_celeba" / name, quality=90)
        values = rng.choice([-1, 1], len(ATTRIBUTES))
        for attr, v in (("Male", male), ("Smiling", smiling), ("Eyeglasses", glasses)):
            values[ATTRIBUTES.index(attr)] = 1 if v else -1
        attr_lines.append(name + " " + " ".join(f"{v:2d}" for v in values))
        ids.append(f"{name} {identity}")
        parts.append(f"{name} {partition}")
    (d / "list_attr_celeba.txt").write_text(nl.join(attr_lines) + nl)
    (d / "identity_CelebA.txt").write_text(nl.join(ids) + nl)
    (d / "list_eval_partition.txt").write_text(nl.join(parts) + nl)
    return d


def write_imagefolder(
    root: Path, *, classes=("bird", "cat", "dog"), per_class: int = 4, test: bool = False
) -> Path:
    """root/train/<class>/*.png of non-square RGB images (and root/test/ when asked)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 2)) if test else (("train", per_class),):
        for k, c in enumerate(classes):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 60, (24, 20, 3)) + np.array([200 if j == k else 0 for j in range(3)])
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / split / c / f"{i:03d}.png")
    return root


# ---------------------------------------------------------------------------------------------------------------
# Weights: the FID Inception state dict, a tiny CLIP, a tiny external teacher.


def write_inception(path: Path, *, num_classes: int = 1008) -> Path:
    """The real architecture (torchvision's Inception3 without aux logits, 1008 classes: the same 566 tensors as
    torch-fidelity's extractor) with random weights, saved as the real file is: torch.save of a state dict."""
    import torch
    from torchvision.models import Inception3

    torch.manual_seed(0)
    net = Inception3(num_classes=num_classes, aux_logits=False, init_weights=False, transform_input=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


def write_tiny_clip(d: Path) -> Path:
    """A CLIP built from a tiny config with a character-level BPE tokenizer, saved with save_pretrained."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": i + len(chars) for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=CLIPTokenizer(vocab=vocab, merges=[]),
    )
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=64, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"])  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                  patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return d


def write_external_teacher(d: Path, *, image_size: int = 16, channels: int = 3, num_classes: int = 10,
                           pipeline: bool = False) -> Path:  # fmt: skip
    """A tiny class-conditional diffusers UNet2DModel (num_classes + 1 embeddings) saved as diffusers saves it:
    a model folder (config.json + safetensors) or, with `pipeline`, a DDPMPipeline folder with unet/ and scheduler/."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=channels,
                       block_out_channels=(8, 16), layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       num_class_embeds=num_classes + 1)  # fmt: skip
    if pipeline:
        scheduler = DDPMScheduler(
            num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear"
        )
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(d)
    else:
        unet.save_pretrained(d)
    return d


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
