"""What a sweep needs before its runs (prerequisite jobs on SLURM), found up front."""

from __future__ import annotations

from bench import prerequisites
from bench.config import RunSpec
from bench.context import Runtime
from tests.fixtures_real import write_imagefolder


def spec(method: str, dataset: str) -> RunSpec:
    return RunSpec(method=method, dataset=dataset, forget_set="class-0", seed=0, preset="smoke")


def test_missing_models_come_first_and_caches_wait_for_them(tmp_path, isolated_stores, fmnist_dir):
    folder = write_imagefolder(tmp_path / "images", per_class=6)
    images = f"imagefolder:{folder}"
    specs = [
        spec("original", images),
        spec("sa", images),
        spec("sa", images),
        spec("original", "fashion-mnist"),
    ]
    needs = prerequisites.find_needs(specs, Runtime(data_dir=fmnist_dir))
    assert [n.kind for n in needs] == ["models", "prepare"]  # once each; fashion-mnist's models ship
    assert needs[1].after == (needs[0].key,) and needs[1].spec.method == "sa"


def test_a_filled_cache_needs_no_job(tmp_path, isolated_stores, fmnist_dir):
    runtime = Runtime(data_dir=fmnist_dir, progress=False)
    (need,) = prerequisites.find_needs([spec("sa", "fashion-mnist")], runtime)
    assert need.kind == "prepare" and not need.after  # the shipped teacher has no SA cache in this store yet
    prerequisites.satisfy(need, runtime, tmp_path / "jobs")  # what its job does
    assert prerequisites.find_needs([spec("sa", "fashion-mnist")], runtime) == []
