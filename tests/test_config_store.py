"""Registry, config overrides, run ids, atomic results."""

import json
import os
import subprocess
import sys

import pytest

from bench import store
from bench.config import RunSpec, parse_sets, resolve_config
from bench.errors import BenchError
from bench.registry import DATASETS, EVALUATORS, METHODS, Registry


def test_registry_lists_valid_names_on_unknown():
    with pytest.raises(BenchError, match="valid methods: .*finetune.*original"):
        METHODS.get("nope")
    assert {"original", "finetune", "sfd", "sid"} <= set(METHODS.names())
    assert "fashion-mnist" in DATASETS and {"forget_accuracy", "fid", "wallclock"} <= set(EVALUATORS.names())
    r = Registry("thing")
    r.register("a")(int)
    with pytest.raises(ValueError, match="twice"):
        r.register("a")(float)


def test_every_method_config_default_cites_a_source():
    for name in METHODS.names():
        for field, (_, source) in METHODS.get(name).card()["defaults"].items():
            assert source, f"{name}.{field} has no source"


def test_set_overrides_are_typed_and_checked():
    configs = {"sfd": METHODS.get("sfd").Config}
    assert parse_sets(["sfd.lr_fake=3e-5", "sfd.iterations=7", "sfd.anchor=random"], configs) == {
        "sfd": {"lr_fake": 3e-5, "iterations": 7, "anchor": "random"}
    }
    with pytest.raises(BenchError, match="no field 'lr'.*lr_fake"):
        parse_sets(["sfd.lr=1"], configs)
    with pytest.raises(BenchError, match="expected a int"):
        parse_sets(["sfd.iterations=many"], configs)
    with pytest.raises(BenchError, match="not in --methods"):
        parse_sets(["esd.lr=1"], configs)
    cfg = resolve_config(METHODS.get("sfd"), "default", {"iterations": 5})
    assert cfg.iterations == 5 and cfg.lr_fake == 1e-4  # preset scaling under the user's override
    assert resolve_config(METHODS.get("sfd"), "paper", {}).lr_fake == 1e-5


def test_run_id_is_stable_and_sensitive():
    spec = RunSpec("sfd", "fashion-mnist", "class-0", 0, "default", (("iterations", 5),))
    code = "from bench.config import RunSpec; print(RunSpec('sfd','fashion-mnist','class-0',0,'default',(('iterations',5),)).run_id)"
    other_process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other_process.stdout.strip() == spec.run_id
    assert spec.run_id.startswith("sfd-fashion-mnist-class-0-s0-default-")
    assert RunSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    variants = [RunSpec("sfd", "fashion-mnist", "class-0", 1, "default", (("iterations", 5),)),
                RunSpec("sfd", "fashion-mnist", "class-0", 0, "default", (("iterations", 6),)),
                RunSpec("sfd", "fashion-mnist", "class-1", 0, "default", (("iterations", 5),))]  # fmt: skip
    assert len({spec.run_id, *(v.run_id for v in variants)}) == 4


def test_atomic_write_never_leaves_half_a_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    store.write_metrics(path, [{"a": 1}])
    real_replace = os.replace

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        store.write_metrics(path, [{"a": 2}, {"a": 3}])
    monkeypatch.setattr(os, "replace", real_replace)
    assert path.read_text() == '{"a": 1}\n'


def test_broken_metrics_file_is_named(tmp_path):
    path = tmp_path / "runs" / "x" / "metrics.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text('{"run_id": "x"\n')
    with pytest.raises(BenchError, match=r"broken results file .*metrics.jsonl, line 1"):
        store.read_metrics(path)
    path.write_text('{"run_id": "x"}\n')
    with pytest.raises(BenchError, match="missing columns"):
        store.load_results(tmp_path)
    assert store.load_results(tmp_path, strict=False).empty
