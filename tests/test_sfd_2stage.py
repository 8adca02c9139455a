"""SFD-Two-Stage: stage 1 (`sid`) is cached per teacher, config and seed and shared by every forget set; stage 2
starts from it as the official train_sfd does, and a run says whether stage 1 came from the cache."""

import pytest

from bench.config import resolve_config
from methods.sfd import SiD
from methods.sfd_2stage import SFD2Stage
from tests.helpers import Killed, kill_after_saves, same_weights, tiny_context, tiny_teacher


def _run(cls, tmp, data, *, forget="class-0", kill_after=None, **overrides):
    ctx = tiny_context(tmp, data, requires=cls.requires, forget=forget, checkpoint_every=1)
    if kill_after:
        kill_after_saves(ctx, kill_after)
    model = cls(resolve_config(cls, "smoke", overrides)).unlearn(tiny_teacher(), ctx.forget_set, ctx)
    return model, ctx


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_MODEL_DIR", str(tmp_path / "store"))
    return tmp_path / "store"


def test_sid_distils_once_for_every_forget_set(tmp_path, fmnist_dir, store, monkeypatch):
    data = fmnist_dir.parent
    first, ctx = _run(SiD, tmp_path / "a", data, forget="class-0")
    assert ctx.reused is None and len(list(store.rglob("*-seed0.safetensors"))) == 1
    again, ctx = _run(SiD, tmp_path / "b", data, forget="class-3")
    assert ctx.reused["what"] == "sid stage 1" and ctx.reused["seconds"] > 0
    assert same_weights(first.unet, again.unet)
    # It is the same distillation the other forget set would have computed: the forget set is not in it.
    monkeypatch.setenv("BENCH_MODEL_DIR", str(tmp_path / "other-store"))
    fresh, ctx = _run(SiD, tmp_path / "c", data, forget="class-3")
    assert ctx.reused is None and same_weights(first.unet, fresh.unet)


@pytest.mark.slow  # moved out of the fast suite (its 3-minute limit); runs in CI
def test_sfd_2stage_starts_from_sids_cache_or_distils_stage_1_itself(
    tmp_path, fmnist_dir, store, monkeypatch
):
    data = fmnist_dir.parent
    _run(SiD, tmp_path / "sid", data)
    cached, ctx = _run(SFD2Stage, tmp_path / "cached", data)
    assert ctx.reused["what"] == "sid stage 1"
    monkeypatch.setenv("BENCH_MODEL_DIR", str(tmp_path / "empty-store"))
    alone, ctx = _run(SFD2Stage, tmp_path / "alone", data)
    assert ctx.reused is None  # its unlearning time includes stage 1
    assert same_weights(cached.unet, alone.unet)  # stage 2 has its own random stream
    clean, _ = _run(SFD2Stage, tmp_path / "clean", data, teacher="original")
    assert not same_weights(clean.unet, alone.unet)


@pytest.mark.slow
def test_sfd_2stage_killed_in_stage_2_resumes_and_still_counts_stage_1(
    tmp_path, fmnist_dir, store, monkeypatch
):
    data = fmnist_dir.parent
    full, _ = _run(SFD2Stage, tmp_path / "full", data)
    monkeypatch.setenv(
        "BENCH_MODEL_DIR", str(tmp_path / "second-store")
    )  # the killed run distils stage 1 itself
    iterations = resolve_config(SiD, "smoke", {}).iterations  # stage 1 dumps this many times, then stage 2
    with pytest.raises(Killed):
        _run(SFD2Stage, tmp_path / "killed", data, kill_after=iterations + 2)
    resumed, ctx = _run(SFD2Stage, tmp_path / "killed", data)
    assert same_weights(full.unet, resumed.unet)
    # The cache now holds stage 1, but this run distilled it in its first attempt: its time is counted, not reused.
    assert ctx.reused is None
