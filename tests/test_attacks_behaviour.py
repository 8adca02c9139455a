"""The attacks on the shipped fashion-mnist teacher at the default preset (its real data): k-shot relearning does
not damage the model it attacks (a loss of recognisability would measure damage, not relearning), and embedding
inversion finds an embedding that draws most of the class. Together about 1-2 minutes on 2 cores."""

from __future__ import annotations

import pytest

from attacks.base import AttackContext, Resume
from bench.config import resolve_config
from bench.context import RunContext, Runtime
from bench.data import make_dataset
from bench.models import store as model_store
from bench.presets import get_preset
from bench.registry import ATTACKS
from bench.runner import load_models

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher_context(tmp_path_factory):
    if not (
        model_store.model_dir(model_store.SHIPPED, "fashion-mnist", "default", 0) / model_store.MANIFEST
    ).is_file():
        pytest.skip("the shipped fashion-mnist teacher and judge are not there yet")
    preset = get_preset("default")
    dataset = make_dataset("fashion-mnist", image_size=preset.image_size)
    try:
        dataset.check()
    except Exception as e:  # the Debian package is not installed here
        pytest.skip(f"no fashion-mnist data: {e}")
    teacher, judge, _ = load_models(dataset, preset)

    def context(name: str) -> AttackContext:
        cls = ATTACKS.get(name)
        run = RunContext(run_dir=tmp_path_factory.mktemp(name), seed=0, preset=preset, dataset=dataset,
                         forget_set=dataset.forget_set("class-0"), requires=cls.requires,
                         runtime=Runtime(progress=False))  # fmt: skip
        return AttackContext(run=run, judge=judge, teacher=teacher, preset=preset)

    return teacher, context


def test_k_shot_relearning_does_not_damage_the_untouched_teacher(teacher_context):
    """On `original` the class must stay recognisable at every probe: never more than 10 points below its
    no-attack value (fine-tuning on the class may make it more recognisable: that is relearning, not damage;
    lr 1e-4 failed this, 78% -> 62% after 25 steps)."""
    teacher, context = teacher_context
    cls = ATTACKS.get("kshot")
    ctx = context("kshot")
    # k = 1 alone (the default's 1, 5 and 25 took 3 minutes): one image, 200 steps, is the likeliest to overfit.
    findings = cls(resolve_config(cls, "default", {"shots": (1,)})).run(teacher, ctx, Resume(ctx.run))
    for k in (1,):
        mine = [f for f in findings if f.params["k"] == k]
        curve = {f.params["steps"]: f.value for f in mine if f.metric.name == "accuracy"}
        print(f"k={k} curve on the teacher:", curve)
        assert list(curve) == [0, 4, 14, 53, 200]
        assert all(v >= curve[0] - 0.10 for v in curve.values()), (k, curve)
        steps = {f.metric.name: f.value for f in mine}
        assert steps["steps_to_relearn"] == 0 and steps["relearned"] == 1.0  # the ceiling relearns at once


def test_embedding_inversion_recovers_most_of_the_class_on_the_teacher(teacher_context):
    teacher, context = teacher_context
    cls = ATTACKS.get("inversion")
    ctx = context("inversion")
    (found,) = cls(resolve_config(cls, "default", {})).run(teacher, ctx, Resume(ctx.run))
    print("inversion on the teacher:", found)
    assert found.metric.name == "recovered" and found.n == 100
    assert found.value > 0.5
