"""CIFAR-10, CelebA and image-folder datasets read from fixtures in their real on-disk formats, bad input, and
end-to-end smoke runs that train their own tiny teacher and judge."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest

from bench.cli import main
from bench.config import RunSpec
from bench.data import canonical_name, make_dataset
from bench.data.celeba import CelebA, CelebAIdentity
from bench.data.cifar10 import CIFAR10, read_batch
from bench.data.imagefolder import ImageFolder
from bench.errors import BenchError
from bench.models import store as model_store
from bench.presets import get_preset
from tests.fixtures_real import CELEBA_ROWS, py2_pickle, write_celeba, write_cifar10, write_imagefolder

pytestmark = pytest.mark.usefixtures("isolated_stores")


def copy_of(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10


def test_cifar10_fixture_is_a_python2_pickle(data_dir):
    raw = (data_dir / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    assert (
        raw.startswith(b"\x80\x02}(")
        and b"U\x04data" in raw
        and b"cnumpy.core.multiarray\n_reconstruct" in raw
    )
    with pytest.raises(
        UnicodeDecodeError
    ):  # what happens to the real files under Python 3's default decoding
        pickle.loads(raw)
    keys = pickle.loads(raw, encoding="bytes").keys()
    assert {b"data", b"labels", b"batch_label", b"filenames"} == set(keys)


def test_cifar10_reader_layout(tmp_path):
    data = np.arange(2 * 3072, dtype=np.int64).reshape(2, 3072).astype(np.uint8)
    (tmp_path / "b").write_bytes(py2_pickle({"data": data, "labels": [3, 9]}))
    x, y = read_batch(tmp_path / "b")
    assert x.shape == (2, 32, 32, 3) and y.tolist() == [3, 9]
    # Row-major planes: R then G then B; pixel (row 1, col 2) of the green plane is byte 1024 + 32 + 2.
    assert x[0, 1, 2, 1] == data[0, 1024 + 32 + 2] and x[1, 0, 0, 2] == data[1, 2048]


def test_cifar10_reads_fixture(data_dir):
    ds = CIFAR10(data_dir=data_dir, image_size=16)
    ds.check()
    x, y = ds.images("train")
    assert x.shape == (50, 3, 16, 16) and sorted(set(y.tolist())) == list(range(10))
    xt, yt = CIFAR10(data_dir=data_dir / "cifar-10-batches-py", image_size=32).images("test")
    assert xt.shape == (20, 3, 32, 32) and xt.min() >= -1 and xt.max() <= 1
    red = xt[yt == 0].mean(dim=(0, 2, 3))  # class 0 of the fixture is drawn red
    assert red[0] > red[1] + 0.5 and red[0] > red[2] + 0.5
    assert ds.forget_set("class-3").forget == (3,) and ds.class_names[3] == "cat"


def test_cifar10_missing_names_file_and_release(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(BenchError, match=r"data_batch_4.*cs\.toronto\.edu"):
        CIFAR10(data_dir=tmp_path).check()
    with pytest.raises(BenchError, match="no --data-dir or BENCH_DATA_DIR"):
        CIFAR10().check()


def test_cifar10_corrupted_pickle_is_named(tmp_path):
    d = write_cifar10(tmp_path)
    raw = (d / "data_batch_3").read_bytes()
    (d / "data_batch_3").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(BenchError, match="data_batch_3.*corrupted"):
        CIFAR10(data_dir=tmp_path).load_split("train")
    (d / "batches.meta").write_bytes(py2_pickle({"label_names": ["apple", "bee"]}))
    with pytest.raises(BenchError, match="not CIFAR-10's"):
        CIFAR10(data_dir=tmp_path).load_split("test")


# ---------------------------------------------------------------------------------------------------------------
# CelebA


def test_celeba_attribute_protocol(data_dir):
    ds = CelebA(data_dir=data_dir, image_size=16)
    ds.check()
    x, y = ds.images("train")
    expected = [4 * m + 2 * s + g for _, _, p, m, s, g in CELEBA_ROWS if p == 0]
    assert x.shape == (8, 3, 16, 16) and y.tolist() == expected
    assert ds.images("test")[1].tolist() == [4 * m + 2 * s + g for _, _, p, m, s, g in CELEBA_ROWS if p == 2]
    fs = ds.forget_set("attr-Eyeglasses")
    assert fs.forget == (1, 3, 5, 7) and fs.retain == (0, 2, 4, 6) and fs.anchor == 0
    assert ds.class_names[fs.forget[-1]] == "smiling man with eyeglasses"
    assert ds.forget_set("attr-Male").forget == (4, 5, 6, 7)
    with pytest.raises(BenchError, match="attr-Male, attr-Smiling, attr-Eyeglasses"):
        ds.forget_set("attr-Bald")


def test_celeba_crop_keeps_the_face(data_dir):
    x, _ = CelebA(data_dir=data_dir, image_size=64).load_split("train")
    assert x.shape == (8, 64, 64, 3)
    # The fixture's background is blue-grey; the 128x128 crop centred at (89, 121) is mostly the pinkish face.
    centre = x[:, 16:48, 16:48].astype(float).mean(axis=(0, 1, 2))
    assert centre[0] > centre[2] + 40


def test_celeba_identity_protocol(data_dir):
    ds = CelebAIdentity(data_dir=data_dir, image_size=16)
    assert ds.class_names == ("identity 2880", "identity 2937", "identity 4126")  # 4 images each: by number
    fs = ds.forget_set("id-2937")
    assert fs.forget == (1,) and fs.anchor == 2 and fs.retain == (0, 2)
    _, ytr = ds.load_split("train")
    _, yte = ds.load_split("test")
    assert ytr.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and yte.tolist() == [0, 1, 2]
    with pytest.raises(BenchError, match="identity 17 is not among the 3 most frequent.*id-2880"):
        ds.forget_set("id-17")


def test_celeba_drive_layout_and_crlf(tmp_path):
    d = write_celeba(tmp_path, crlf=True)
    for sub, names in (
        ("Anno", ("list_attr_celeba.txt", "identity_CelebA.txt")),
        ("Eval", ("list_eval_partition.txt",)),
    ):
        (d / sub).mkdir()
        for n in names:
            (d / n).rename(d / sub / n)
    (d / "Img").mkdir()
    (d / "img_align_celeba").rename(d / "Img" / "img_align_celeba")
    ds = CelebA(data_dir=tmp_path, image_size=16)
    assert ds.paths["attr"] == d / "Anno" / "list_attr_celeba.txt"
    assert len(ds.load_split("train")[1]) == 8


def test_celeba_missing_names_files_and_release(tmp_path):
    d = write_celeba(tmp_path)
    (d / "identity_CelebA.txt").unlink()
    with pytest.raises(BenchError, match=r"celeba lacks identity_CelebA\.txt.*mmlab\.ie\.cuhk\.edu\.hk"):
        CelebA(data_dir=tmp_path).check()


def test_celeba_annotations_that_disagree(tmp_path):
    d = write_celeba(tmp_path)
    lines = (d / "list_eval_partition.txt").read_text().splitlines()
    (d / "list_eval_partition.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(BenchError, match="disagree in length: list_eval_partition.txt lists 11 images"):
        CelebA(data_dir=tmp_path).check()
    (d / "list_eval_partition.txt").write_text("\n".join(lines[1:] + lines[:1]) + "\n")
    with pytest.raises(BenchError, match="line 1: expected `000001.jpg"):
        CelebA(data_dir=tmp_path).check()
    attr = (d / "list_attr_celeba.txt").read_text().splitlines()
    (d / "list_attr_celeba.txt").write_text("\n".join(["202599", *attr[1:]]) + "\n")
    with pytest.raises(BenchError, match="says 202599 images on its first line but lists 12"):
        CelebA(data_dir=tmp_path).check()


def test_celeba_corrupted_jpeg_is_named(tmp_path):
    d = write_celeba(tmp_path)
    jpeg = d / "img_align_celeba" / "000005.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    with pytest.raises(BenchError, match="000005.jpg.*corrupted or truncated"):
        CelebA(data_dir=tmp_path, image_size=16).load_split("train")
    jpeg.write_bytes(b"not a jpeg at all")
    with pytest.raises(BenchError, match="000005.jpg"):
        CelebA(data_dir=tmp_path, image_size=16).load_split("train")


def test_celeba_in_the_wild_images_are_refused(tmp_path):
    d = write_celeba(tmp_path)
    from PIL import Image

    Image.new("RGB", (500, 400)).save(d / "img_align_celeba" / "000002.jpg")
    with pytest.raises(BenchError, match="500x400.*aligned.*178x218"):
        CelebA(data_dir=tmp_path, image_size=16).load_split("train")


def test_decoded_images_are_cached(data_dir, monkeypatch):
    first = CelebA(data_dir=data_dir, image_size=16).load_split("test")[0]

    def boom(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr("bench.data.celeba.decode_images", boom)
    np.testing.assert_array_equal(CelebA(data_dir=data_dir, image_size=16).load_split("test")[0], first)


# ---------------------------------------------------------------------------------------------------------------
# imagefolder:PATH


def test_imagefolder_seeded_split_and_name(tmp_path):
    root = write_imagefolder(tmp_path / "pets")
    ds = make_dataset(f"imagefolder:{root}", image_size=8)
    assert isinstance(ds, ImageFolder) and ds.class_names == ("bird", "cat", "dog")
    assert ds.channels == 3 and ds.native_size == 20  # the shorter side of the 20x24 images
    assert ds.images("train")[0].shape == (9, 3, 8, 8) and ds.images("test")[1].tolist() == [0, 1, 2]
    again = make_dataset(f"imagefolder:{root}", image_size=8)
    assert again.name == ds.name and again._layout["files"] == ds._layout["files"]  # the fixed split
    assert ds.name.startswith("imagefolder-pets-")


def test_imagefolder_test_folder_and_grayscale(tmp_path):
    root = write_imagefolder(tmp_path / "g", test=True)
    from PIL import Image

    for p in root.rglob("*.png"):
        Image.open(p).convert("L").save(p)
    ds = ImageFolder(path=root)
    assert ds.channels == 1 and ds.image_size == 20
    assert ds.load_split("test")[0].shape == (6, 20, 20, 1)


def test_imagefolder_bad_layouts(tmp_path):
    with pytest.raises(BenchError, match="train/<class name>"):
        ImageFolder(path=tmp_path).check()
    (tmp_path / "train" / "only").mkdir(parents=True)
    with pytest.raises(BenchError, match="at least two class subfolders"):
        ImageFolder(path=tmp_path).check()
    with pytest.raises(BenchError, match="imagefolder:PATH"):
        make_dataset("imagefolder").check()
    with pytest.raises(BenchError, match="takes no path"):
        make_dataset("cifar10:/x")


def test_run_ids_of_path_datasets(tmp_path):
    name = canonical_name("imagefolder:relative/pets")
    assert name.startswith("imagefolder:/") and name.endswith("/relative/pets")
    spec = RunSpec(method="sfd", dataset=name, forget_set="class-0", seed=0, preset="smoke")
    assert spec.run_id.startswith("sfd-imagefolder-pets-class-0-s0-smoke-") and "/" not in spec.run_id
    assert "teacher_path" not in spec.to_dict() and "options" not in spec.to_dict()  # old ids are unchanged


# ---------------------------------------------------------------------------------------------------------------
# Models for datasets without shipped ones, and end to end


def test_smoke_trains_its_own_models_only_without_shipped_ones(tmp_path, monkeypatch):
    smoke = get_preset("smoke")
    own = model_store.recipe_preset("cifar10", smoke)
    assert own.model_key == "smoke" and own.teacher == smoke.teacher and own.teacher.steps <= 100
    shipped = tmp_path / "shipped"
    d = model_store.model_dir(shipped, "cifar10", "default", 0)
    d.mkdir(parents=True)
    (d / model_store.MANIFEST).write_text("{}")
    monkeypatch.setattr(model_store, "SHIPPED", shipped)
    assert model_store.recipe_preset("cifar10", smoke) is get_preset("default")


@pytest.mark.slow  # moved out of the fast suite (its 3-minute limit); runs in CI
def test_smoke_run_on_cifar10_and_celeba(data_dir, tmp_path, capsys):
    results = tmp_path / "results"
    argv = ["run", "--datasets", "cifar10,celeba", "--methods", "original,sfd", "--preset", "smoke",
            "--data-dir", str(data_dir), "--results", str(results)]  # fmt: skip
    assert main(argv) == 0
    rows = [
        json.loads(line) for p in results.glob("runs/*/metrics.jsonl") for line in p.read_text().splitlines()
    ]
    cells = {(r["dataset"], r["method"]) for r in rows}
    assert cells == {(d, m) for d in ("cifar10", "celeba") for m in ("original", "sfd")}
    assert {"accuracy", "fd_judge", "unlearn_s"} <= {r["metric"] for r in rows}
    assert not {"fid_inception", "clip_score"} & {r["metric"] for r in rows}  # no weights given
    for ds in ("cifar10", "celeba"):
        manifest = json.loads((tmp_path / "models" / ds / "smoke" / "seed0" / "MANIFEST.json").read_text())
        assert manifest["preset"] == "smoke" and manifest["teacher_recognised"]["per_class_n"] == 20
    # The same command again: every run is done, and the cached models are not trained again.
    capsys.readouterr()
    assert main(argv) == 0
    assert "4 runs, 0 to do" in capsys.readouterr().out


@pytest.mark.slow
def test_smoke_run_on_celeba_attribute_and_imagefolder(data_dir, tmp_path):
    pets = write_imagefolder(tmp_path / "pets")
    results = tmp_path / "results"
    assert main(["run", "--datasets", "celeba", "--forget-sets", "attr-Eyeglasses", "--methods", "original",
                 "--preset", "smoke", "--data-dir", str(data_dir), "--results", str(results)]) == 0  # fmt: skip
    assert main(["run", "--datasets", f"imagefolder:{pets}", "--methods", "original", "--preset", "smoke",
                 "--results", str(results)]) == 0  # fmt: skip
    specs = [json.loads(p.read_text()) for p in results.glob("runs/*/spec.json")]
    assert {s["forget_set"] for s in specs} == {"attr-Eyeglasses", "class-0"}
    assert any(s["dataset"] == f"imagefolder:{pets}" for s in specs)


def test_bad_data_exits_2_and_writes_nothing(tmp_path, capsys):
    d = write_celeba(tmp_path / "data")
    jpeg = d / "img_align_celeba" / "000006.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:400])
    results = tmp_path / "results"
    argv = ["run", "--datasets", "celeba", "--methods", "original", "--preset", "smoke",
            "--data-dir", str(tmp_path / "data"), "--results", str(results)]  # fmt: skip
    assert main(argv) == 2
    assert "000006.jpg" in capsys.readouterr().err
    assert not list(results.glob("runs/*")) and not list((tmp_path / "models").rglob("*.safetensors"))
    assert main([*argv[:-4], "--data-dir", str(tmp_path / "nowhere"), "--results", str(results)]) == 2
    assert "nowhere: no such folder" in capsys.readouterr().err  # --data-dir is authoritative: no fall-back
    (tmp_path / "nowhere").mkdir()
    assert main([*argv[:-4], "--data-dir", str(tmp_path / "nowhere"), "--results", str(results)]) == 2
    assert "list_attr_celeba.txt" in capsys.readouterr().err
