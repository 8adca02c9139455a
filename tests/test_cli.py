"""End to end through the CLI: a smoke sweep's rows, skipping, and every kind of bad input (exit code 2)."""

import json
import shutil

import pytest

from bench import store
from bench.cli import main
from bench.models import store as model_store

ROW_KEYS = set(store.COLUMNS)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, fmnist_dir):
    results = tmp_path_factory.mktemp("results")
    args = ["run", "--methods", "original,finetune,sfd", "--preset", "smoke", "--results", str(results),
            "--data-dir", str(fmnist_dir.parent)]  # fmt: skip
    assert main(args) == 0
    return results, args


def test_smoke_run_writes_rows_for_all_three_evaluators(smoke):
    results, _ = smoke
    df = store.load_results(results)
    assert set(df.columns) >= ROW_KEYS
    assert set(df["method"]) == {"original", "finetune", "sfd"}
    for method, rows in df.groupby("method"):
        assert set(rows["evaluator"]) == {"forget_accuracy", "fid", "wallclock"}, method
        got = set(zip(rows["metric"], rows["subset"], strict=True))
        assert {("accuracy", "forget"), ("accuracy", "retain"), ("prob", "forget"), ("entropy", "forget"),
                ("fd_judge", "retain"), ("unlearn_s", "all"), ("nfe", "all"), ("peak_mem_mb", "all")} <= got  # fmt: skip
    assert df["value"].notna().all()
    nfe = df[df.metric == "nfe"].set_index("method")["value"]
    assert nfe["sfd"] == 1 and nfe["original"] == 10  # smoke preset: 10 DDIM steps, no guidance
    n = df[(df.metric == "accuracy") & (df.subset == "forget")]["n"]
    assert (n == 20).all()  # 20 images of the forgotten class on the smoke grid
    for d in (results / "runs").iterdir():
        assert {"spec.json", "env.json", "metrics.jsonl", "DONE", "samples.safetensors", "model"} <= {
            p.name for p in d.iterdir()
        }
        assert json.loads((d / "env.json").read_text())["versions"]["torch"]


def test_finished_runs_are_skipped_and_reported(smoke, capsys):
    results, args = smoke
    before = {p: p.stat().st_mtime_ns for p in results.rglob("metrics.jsonl")}
    assert main(args) == 0
    assert "3 runs, 0 to do" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in results.rglob("metrics.jsonl")}


def test_dry_run_lists_runs(smoke, capsys):
    _, args = smoke
    assert main([*args, "--seeds", "0,1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "6 runs, 3 to do" in out and out.count("todo") == 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "nope"], "unknown method 'nope'; valid methods: .*finetune.*sfd"),
        (["--datasets", "mnist"], "unknown dataset 'mnist'; valid datasets: .*fashion-mnist"),
        (["--forget-sets", "class-42"], "class 42 does not exist"),
        (["--preset", "huge"], "unknown preset 'huge'; valid presets: default, paper, smoke"),
        (["--evaluators", "fidd"], "unknown evaluator 'fidd'; valid evaluators: .*fid"),
        (["--methods", "sfd", "--set", "sfd.anchor=0"], "inside forget set 'class-0'"),
        (["--methods", "sfd", "--set", "sfd.itrations=3"], "no field 'itrations'"),
        (["--device", "cuda:7"], "CUDA is not available|cuda:7"),
    ],
)
def test_bad_input_exits_2_and_touches_nothing(smoke, capsys, extra, message):
    results, args = smoke
    before = {p: p.read_bytes() for p in results.rglob("*") if p.is_file()}
    assert main([*args, *extra]) == 2
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)
    assert before == {p: p.read_bytes() for p in results.rglob("*") if p.is_file()}


def test_unknown_launcher_is_a_usage_error(smoke, capsys):
    _, args = smoke
    with pytest.raises(SystemExit) as e:
        main([*args, "--launcher", "cloud"])
    assert e.value.code == 2 and "invalid choice: 'cloud'" in capsys.readouterr().err


def test_missing_data_folder_says_what_to_put_where(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("bench.data.fashion_mnist.DEBIAN_DIR", tmp_path / "none")
    monkeypatch.delenv("BENCH_DATA_DIR", raising=False)
    (tmp_path / "empty").mkdir()
    code = main(["run", "--methods", "original", "--preset", "smoke", "--results", str(tmp_path / "r"),
                 "--data-dir", str(tmp_path / "empty")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and ("t10k-images-idx3-ubyte" in err or "train-images-idx3-ubyte" in err)
    assert "apt-get install dataset-fashion-mnist" in err and not (tmp_path / "r").exists()


def test_broken_metrics_file_is_named(smoke, capsys):
    results, args = smoke
    path = next(results.rglob("metrics.jsonl"))
    good = path.read_text()
    try:
        path.write_text(good[: len(good) // 2])
        assert main(args) == 2
        assert str(path) in capsys.readouterr().err
    finally:
        path.write_text(good)


def test_tampered_checkpoint_is_named(tmp_path, monkeypatch, fmnist_dir, capsys):
    shipped = model_store.find_models("fashion-mnist", "default", 0)
    copy = model_store.model_dir(tmp_path, "fashion-mnist", "default", 0)
    shutil.copytree(shipped, copy)
    weights = copy / "teacher" / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(model_store, "SHIPPED", tmp_path)
    code = main(["run", "--methods", "original", "--preset", "smoke", "--results", str(tmp_path / "r"),
                 "--data-dir", str(fmnist_dir.parent)])  # fmt: skip
    assert code == 2 and str(weights) in capsys.readouterr().err
    weights.write_bytes(bytes(data[:1000]))  # truncated
    assert main(["run", "--methods", "original", "--preset", "smoke", "--results", str(tmp_path / "r"),
                 "--data-dir", str(fmnist_dir.parent)]) == 2  # fmt: skip
    assert str(weights) in capsys.readouterr().err


def test_ls_and_show(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    assert (
        "sfd" in out and "fashion-mnist" in out and "class-0" in out and "smoke" in out and "fd_judge" in out
    )
    assert "kshot" in out and "k-shot relearning" in out and "concealment" in out  # the attacks too
    assert main(["show", "sfd"]) == 0
    out = capsys.readouterr().out
    assert "cifar10_sfd.yml" in out and "arXiv 2409.11219" in out and "preset default" in out
    assert main(["show", "nope"]) == 2
