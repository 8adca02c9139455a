"""The performance benchmarks at toy sizes: each writes its figures and its table, and the figures hold together.
Speed itself is never asserted: only counts (FLOPs, steps) and the arithmetic between the measured figures."""

import json

import pytest
import torch

from bench.cli import main
from bench.models.unet import build_unet
from bench.presets import get_preset
from bench.report import make_report
from benchmarks import evaluation, limits, paper_scale, sampling, time_to_forget
from tests.helpers import TINY

CPU = torch.device("cpu")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Benchmarks write under ./results/benchmarks: run them in a scratch folder."""
    monkeypatch.chdir(tmp_path)
    return tmp_path / "results" / "benchmarks"


@pytest.mark.slow
def test_limits_counts_the_flops_of_each_step(in_tmp):
    figures = limits.run(CPU, sample_batch=8, train_batch=4, sfd_iterations=2)
    rows = {r["name"].split(" (")[0]: r for r in figures["rows"]}
    forward = rows["teacher UNet forward"]["gflop_per_unit"]
    # a training step is a forward and a backward (twice the forward: gradients of inputs and of weights)
    assert 2.8 < rows["teacher training step"]["gflop_per_unit"] / forward < 3.2
    # one SFD iteration at batch 16 + 16 costs 22 forwards per pair of images: per term, the fake-score step is a
    # generator forward plus a fake forward and backward (4), the generator step a generator forward and backward
    # (3) plus teacher and fake forwards with backwards to their inputs only (2 + 2)
    assert 21 < rows["SFD iteration"]["gflop_per_unit"] / (16 * forward) < 23
    assert all(r["fraction_of_peak"] > 0 and r["gflop_per_s"] > 0 for r in rows.values())
    assert json.loads((in_tmp / "limits.json").read_text())["rows"] == figures["rows"]
    assert "SFD iteration" in limits.table(figures)


@pytest.mark.slow  # moved out of the fast suite (its 3-minute limit); runs in CI
def test_sampling_compares_the_samplers_on_one_batch(in_tmp):
    figures = sampling.run(CPU, batch_size=4, ddpm_steps=10)
    rows = figures["rows"]
    p = get_preset("default")
    passes = 1 if p.guidance == 1 else 2  # guidance: a conditional and an unconditional pass per step
    assert [r["nfe"] for r in rows.values()] == [1, passes * p.sampler_steps, passes * 10]
    one_step = rows["sfd one-step"]["images_per_s"]
    assert all(r["one_step_speedup"] == pytest.approx(one_step / r["images_per_s"]) for r in rows.values())
    assert (in_tmp / "sampling.json").is_file()


@pytest.mark.slow
def test_evaluation_times_the_judge_fd_and_inception(in_tmp):
    figures = evaluation.run(CPU, inception_images=2)
    names = [r["name"].split(":")[0] for r in figures["rows"]]
    assert names == ["judge", "fd_judge", "fid_inception"]
    inception = figures["rows"][-1]
    assert inception["images"] == 2
    assert inception["images_per_s"] == inception["images"] / inception["seconds"]
    per_run = 9 * 100 / inception["images_per_s"]  # the generated images of the 9 retained classes
    assert figures["fid_inception_run_s"] == pytest.approx(per_run)
    assert (in_tmp / "evaluation.json").is_file()


def test_paper_architecture_has_the_official_size():
    unet = build_unet(get_preset("paper").teacher, image_size=32, channels=3, num_classes=10)
    # The official Conditional_Model at cifar10_train.yml: the DDPM CIFAR-10 UNet (35.7M) plus its class path.
    assert sum(p.numel() for p in unet.parameters()) == 38_632_323


@pytest.mark.slow
def test_paper_scale_projects_from_the_largest_batch(in_tmp):
    figures = paper_scale.run(CPU, batch_sizes=(1, 2), iterations=1, recipe=TINY)
    big = figures["rows"][-1]
    assert figures["projected_from_batch"] == 2
    assert figures["projected_seconds_per_iteration"] == pytest.approx(big["seconds_per_image"] * 128)
    hours = figures["projected_seconds_per_iteration"] * 50_000 / 3600
    assert figures["projected_hours"] == pytest.approx(hours)
    assert "projected from batch 2" in paper_scale.table(figures)


@pytest.mark.slow
def test_time_to_forget_probes_complete_default_runs(in_tmp):
    figures = time_to_forget.run(CPU, methods=("sfd", "esd-new"), preset="smoke", probes=2, forget_per_class=4,
                                 retain_per_class=2, out=in_tmp)  # fmt: skip
    steps = {m: [p["step"] for p in figures["points"] if p["method"] == m] for m in ("sfd", "esd-new")}
    assert steps == {"sfd": [2, 4], "esd-new": [1, 2, 3]}  # smoke: 4 and 3 iterations
    for run in figures["runs"]:
        t = run["timings"]
        assert 0 <= t["overhead_fraction"] < 1 and t["probe_s"] > 0
        assert t["unlearn_compute_s"] + t["unlearn_service_s"] <= run["unlearn_s"] + 1e-6  # probes excluded
        assert run["peak_mem_mb"] > 0
    assert len(list((in_tmp / "runs").rglob("DONE"))) == 2
    report = make_report(in_tmp.parent)
    assert any(p.name == "time_to_forget.png" for p in report.paths)


def test_perf_rejects_an_unknown_benchmark(capsys):
    assert main(["perf", "nope"]) != 0
    assert "limits" in capsys.readouterr().err


@pytest.mark.slow
def test_the_text_sweep_benchmark_times_every_run(in_tmp, fmnist_dir, monkeypatch):
    from benchmarks import text_sweep

    monkeypatch.setenv("BENCH_DATA_DIR", str(fmnist_dir.parent))
    figures = text_sweep.run(CPU, preset="smoke", methods=("text-uce",), out=in_tmp)
    assert [r["method"] for r in figures["runs"]] == ["text-uce"]
    assert all(0 < r["sample_s"] <= r["total_s"] < figures["total_s"] for r in figures["runs"])
    assert figures["within_budget"] and "text-uce" in text_sweep.table(figures)


@pytest.mark.slow  # moved out of the fast suite (its 3-minute limit); runs in CI
def test_the_text_budget_calibration_clocks_every_budgeted_text_method(in_tmp, fmnist_dir, monkeypatch):
    """Each text method that takes a budget shows its model to the clock after every iteration (the probe), and
    the calibration's arithmetic holds: fixed + n per-iteration is the measured clock; the shipped file gains the
    text dataset's key beside the class tier's."""
    from benchmarks import budget_calibration_text
    from benchmarks.budget_calibration import TEXT_METHODS

    monkeypatch.setenv("BENCH_DATA_DIR", str(fmnist_dir.parent))
    asset = in_tmp.parent / "budgets.json"
    asset.parent.mkdir(parents=True, exist_ok=True)
    asset.write_text(json.dumps({"default/fashion-mnist": {"methods": {}}}))
    figures = budget_calibration_text.run(CPU, preset="smoke", out=in_tmp, asset=asset)
    costs = figures["methods"]
    assert set(costs) == set(TEXT_METHODS)
    for cost in costs.values():
        assert cost["fixed_s"] + cost["iterations"] * cost["per_iteration_s"] == pytest.approx(
            cost["measured_s"], abs=0.05
        )
    shipped = json.loads(asset.read_text())
    assert set(shipped) == {"default/fashion-mnist", "smoke/fashion-mnist-text"}
    assert shipped["smoke/fashion-mnist-text"]["command"].endswith("bench perf budget_calibration_text")
    assert "text-sfd" in budget_calibration_text.table(figures)
