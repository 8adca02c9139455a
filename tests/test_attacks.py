"""Robustness attacks on tiny models: the rows are identical on a rerun and after a kill, benign relearning never
reads a forgotten image, one-step generators get the analogue their card states (or no row), and the curve
figures (area, steps to relearn) are computed as documented."""

from __future__ import annotations

import math

import pytest
import torch

from attacks.base import AttackContext, Finding, Resume
from attacks.finetune import log_auc, log_probes, steps_to_reach
from bench.api import Dataset
from bench.config import resolve_config
from bench.registry import ATTACKS
from bench.sampling import OneStepGenerator
from tests.helpers import Killed, kill_after_saves, tiny_context, tiny_teacher

ALL = ("kshot", "benign", "inversion", "concealment", "conditions")


def test_probe_grid_auc_and_steps_to_relearn():
    assert log_probes(200, 4) == (0, 4, 14, 53, 200)
    assert log_probes(2, 2) == (0, 1, 2)
    flat = [(0, 3, 10), (4, 3, 10), (200, 3, 10)]
    assert log_auc(flat) == pytest.approx(0.3)
    rising = [(0, 0, 10), (9, 10, 10)]  # linear in log(1 + step) from 0 to 1: half the area
    assert log_auc(rising) == pytest.approx(0.5)
    curve = [(0, 1, 10), (4, 3, 10), (14, 6, 10), (53, 9, 10)]
    assert steps_to_reach(curve, 0.5) == 14
    assert steps_to_reach(curve, 0.95) is None


class TemplateJudge(torch.nn.Module):
    """A judge for tiny tests that is right often enough to matter (a random CNN calls every image the same
    class): the class whose mean fixture image is nearest."""

    def __init__(self, templates: torch.Tensor):
        super().__init__()
        self.register_buffer("templates", templates.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -2 * torch.cdist(x.flatten(1), self.templates) ** 2


def _judge(run) -> torch.nn.Module:
    x, y = run.dataset.images("train")
    return TemplateJudge(torch.stack([x[y == c].mean(0) for c in range(10)])).eval()


def _context(tmp_path, fmnist_dir, name, *, seed=0, teacher=None):
    cls = ATTACKS.get(name)
    run = tiny_context(
        tmp_path / name, fmnist_dir.parent, requires=cls.requires, seed=seed, checkpoint_every=1
    )
    return AttackContext(run=run, judge=_judge(run), teacher=teacher or tiny_teacher(), preset=run.preset)


def _attack(name):
    cls = ATTACKS.get(name)
    return cls(resolve_config(cls, "smoke", {}))


def _rows(findings: list[Finding]) -> list[tuple]:
    return [(f.metric.name, f.metric.subset, f.value, f.n, sorted(f.params.items())) for f in findings]


def _run(tmp_path, fmnist_dir, name, model, **kw):
    ctx = _context(tmp_path, fmnist_dir, name, **kw)
    return _attack(name).run(model, ctx, Resume(ctx.run)), ctx


@pytest.mark.parametrize("name", ALL)
def test_every_attack_gives_identical_rows_on_a_rerun(tmp_path, fmnist_dir, name):
    model = tiny_teacher(seed=3)
    first, _ = _run(tmp_path / "a", fmnist_dir, name, model)
    second, _ = _run(tmp_path / "b", fmnist_dir, name, tiny_teacher(seed=3))
    assert first and _rows(first) == _rows(second)
    assert all(math.isfinite(f.value) and f.n > 0 for f in first)
    assert {f.metric for f in first} <= set(ATTACKS.get(name).metrics)


# Killed after this many state dumps: mid-way through each attack's units (and probes).
KILL_AFTER = {"kshot": 3, "benign": 2, "inversion": 1, "concealment": 2, "conditions": 3}


@pytest.mark.parametrize("name", ALL)
def test_a_killed_attack_resumes_to_the_same_rows(tmp_path, fmnist_dir, name):
    straight, _ = _run(tmp_path / "a", fmnist_dir, name, tiny_teacher(seed=3))
    ctx = _context(tmp_path / "b", fmnist_dir, name)
    kill_after_saves(ctx.run, KILL_AFTER[name])
    with pytest.raises(Killed):
        _attack(name).run(tiny_teacher(seed=3), ctx, Resume(ctx.run))
    assert ctx.run.state_path.is_file()
    again = _context(tmp_path / "b", fmnist_dir, name)
    resumed = _attack(name).run(tiny_teacher(seed=3), again, Resume(again.run))
    assert _rows(resumed) == _rows(straight)


def test_the_attacked_model_is_never_changed(tmp_path, fmnist_dir):
    model = tiny_teacher(seed=3)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    for name in ("kshot", "inversion"):
        _run(tmp_path / name, fmnist_dir, name, model)
    assert all(torch.equal(before[k], v) for k, v in model.unet.state_dict().items())


def test_benign_relearning_never_reads_a_forgotten_image(tmp_path, fmnist_dir, monkeypatch):
    real = Dataset.images

    def retained_only(self, split, classes=None):
        if classes is None or 0 in classes:
            raise AssertionError(f"benign relearning read images of classes {classes}")
        return real(self, split, classes)

    ctx = _context(tmp_path, fmnist_dir, "benign")  # the test's judge reads every class: before the patch
    monkeypatch.setattr(Dataset, "images", retained_only)
    findings = _attack("benign").run(tiny_teacher(seed=3), ctx, Resume(ctx.run))
    assert ctx.run.requires == frozenset({"retain"})
    assert [f.params["steps"] for f in findings if f.metric.name == "accuracy"] == [0, 1, 2]


def test_benign_relearning_cannot_ask_for_forgotten_images(tmp_path, fmnist_dir):
    ctx = _context(tmp_path, fmnist_dir, "benign")
    with pytest.raises(Exception, match="requires"):
        ctx.data("forget")


def test_k_shot_images_are_the_same_for_every_method_and_nested(tmp_path, fmnist_dir):
    ctx = _context(tmp_path, fmnist_dir, "kshot")
    x, y = ctx.data("forget")
    a = ctx.choose(x, y, 5, "kshot/images", exemplars=False)
    b = _context(tmp_path / "other", fmnist_dir, "kshot").choose(x, y, 5, "kshot/images", exemplars=False)
    assert torch.equal(a, b) and (y[a.flatten()] == 0).all()
    assert torch.equal(ctx.choose(x, y, 1, "kshot/images", exemplars=False), a[:, :1])  # k = 1 is among k = 5
    other_seed = _context(tmp_path / "s1", fmnist_dir, "kshot", seed=1)
    assert not torch.equal(a, other_seed.choose(x, y, 5, "kshot/images", exemplars=False))
    chosen = ctx.choose(x, y, 2, "kshot/images", exemplars=True).flatten()
    assert ctx.hits(x[chosen], y[chosen]).all()  # exemplars: images the judge is sure of


def test_one_step_generators_get_their_analogue_or_no_row(tmp_path, fmnist_dir):
    generator = OneStepGenerator(tiny_teacher(seed=3).unet, t_init=440)
    conceal = _attack("concealment")
    assert "one-step" in conceal.applies(generator) and conceal.applies(tiny_teacher()) == ""
    conditions, _ = _run(tmp_path / "c", fmnist_dir, "conditions", generator)
    ws = [f.params["w"] for f in conditions if f.metric.name == "accuracy"]
    assert ws == [1.0]  # guidance does not apply: the other scales get no row
    assert set(_attack("conditions").not_applicable(generator)) == {"w=2", "w=3", "w=5"}
    for name in ("kshot", "benign", "inversion"):
        findings, _ = _run(tmp_path / name, fmnist_dir, name, generator)
        assert findings and all(math.isfinite(f.value) for f in findings)


def test_steps_to_relearn_is_written_only_when_reached(tmp_path, fmnist_dir):
    from attacks.kshot import curve_findings

    never = curve_findings([(0, 0, 10), (4, 1, 10)], params={"k": 1}, reference=0.8)
    names = {f.metric.name: f for f in never}
    assert "steps_to_relearn" not in names and names["relearned"].value == 0.0
    reached = {
        f.metric.name: f for f in curve_findings([(0, 0, 10), (4, 5, 10)], params={"k": 1}, reference=0.8)
    }
    assert reached["steps_to_relearn"].value == 4 and reached["relearned"].value == 1.0
    assert reached["relearned"].params["threshold"] == pytest.approx(0.4)


def _official_unet():
    from bench.models.unet import build_unet
    from bench.presets import TeacherRecipe

    recipe = TeacherRecipe(block_out_channels=(32, 32), layers_per_block=1, attention=(False, False),
                           norm_num_groups=32, steps=0, batch_size=1, lr=1e-3, warmup_steps=0, ema_decay=0.9,
                           backbone="official-ddpm")  # fmt: skip
    torch.manual_seed(3)
    return build_unet(recipe, image_size=8, channels=1, num_classes=10).eval()


@pytest.mark.parametrize("backbone", ["diffusers-unet2d", "official-ddpm"])
def test_inversion_adds_one_trainable_embedding_and_leaves_the_rest(backbone):
    from attacks.inversion import with_new_class

    unet = tiny_teacher(seed=3).unet if backbone == "diffusers-unet2d" else _official_unet()
    net, new, index = with_new_class(unet)
    assert index == 11 and [p for p in net.parameters() if p.requires_grad] == [new]
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    same = net(x, t, class_labels=torch.tensor([0, 10])).sample
    assert torch.allclose(same, unet(x, t, class_labels=torch.tensor([0, 10])).sample)
    null = net(x, t, class_labels=torch.tensor([10, 10])).sample
    new_class = net(x, t, class_labels=torch.tensor([11, 11])).sample
    assert torch.allclose(new_class, null)  # it starts at the null row
    new_class.pow(2).mean().backward()
    assert new.grad is not None and new.grad.abs().sum() > 0
