"""SFD: its losses against a direct computation, where gradients go, data-freeness, anchors."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from bench.api import Dataset
from bench.errors import BenchError
from bench.sampling import OneStepGenerator
from methods.sfd import (
    SFD,
    Draw,
    Schedule,
    SFDConfig,
    SiD,
    anchor_labels,
    fake_score_loss,
    fake_score_step,
    generator_step,
    sid_loss,
)
from tests.helpers import same_weights, tiny_context, tiny_teacher


def test_fake_score_loss_is_pixel_sum_batch_mean():
    eps_pred = torch.tensor([[[[1.0, 2.0]]], [[[0.0, -1.0]]]])
    eps = torch.tensor([[[[0.0, 0.0]]], [[[1.0, 1.0]]]])
    # sample 1: 1 + 4 = 5; sample 2: 1 + 4 = 5; mean 5
    assert fake_score_loss(eps_pred, eps).item() == pytest.approx(5.0)


def test_sid_loss_matches_the_equation_elementwise():
    rng = np.random.default_rng(0)
    f_real, f_fake, x_g = (rng.normal(size=(3, 1, 2, 2)) for _ in range(3))
    alpha = 1.2
    expected = []
    for i in range(3):
        omega = max(np.mean(np.abs(f_real[i] - x_g[i])), 1e-5)
        d = f_real[i] - f_fake[i]
        expected.append(np.sum(d * ((f_real[i] - x_g[i]) - alpha * d)) / omega)
    got = sid_loss(*(torch.tensor(a) for a in (f_real, f_fake, x_g)), alpha)
    assert got.item() == pytest.approx(np.mean(expected), rel=1e-10)
    # alpha = 1 reduces to the official simplified form (f_real - f_fake)(f_fake - x_g) / omega
    simple = np.mean([np.sum((f_real[i] - f_fake[i]) * (f_fake[i] - x_g[i])) / np.mean(np.abs(f_real[i] - x_g[i]))
                      for i in range(3)])  # fmt: skip
    assert sid_loss(*(torch.tensor(a) for a in (f_real, f_fake, x_g)), 1.0).item() == pytest.approx(simple)


def test_omega_is_not_differentiated():
    f_real = torch.randn(2, 1, 2, 2)
    x_g = torch.randn(2, 1, 2, 2, requires_grad=True)
    f_fake = torch.randn(2, 1, 2, 2)
    sid_loss(f_real, f_fake, x_g, 1.2).backward()
    omega = (f_real - x_g.detach()).abs().mean(dim=(1, 2, 3), keepdim=True)
    # d/dx_g of sum(d * (f_real - x_g - a d)) / omega = -d / omega, divided by batch size 2
    assert torch.allclose(x_g.grad, -(f_real - f_fake) / omega / 2)


class Recorder(torch.nn.Module):
    """Wraps a UNet and records the class labels it is called with."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls = unet, []

    def forward(self, x, t, class_labels):
        self.calls.append(class_labels.tolist())
        return self.unet(x, t, class_labels=class_labels)


def _nets():
    teacher = tiny_teacher().unet
    frozen = copy.deepcopy(teacher).requires_grad_(False)
    fake = copy.deepcopy(teacher)
    gen = OneStepGenerator(copy.deepcopy(teacher))
    return frozen, fake, gen


def test_generator_step_grads_reach_only_theta_and_use_the_right_labels():
    frozen, fake, gen = _nets()
    fake.requires_grad_(False)
    before = copy.deepcopy(frozen)
    rec_t, rec_f = Recorder(frozen), Recorder(fake)
    g = torch.Generator().manual_seed(0)
    cfg = SFDConfig()
    sched = Schedule(torch.device("cpu"))
    c_f, c_o, c_r = torch.full((2,), 0), torch.full((2,), 1), torch.tensor([3, 4])
    generator_step(gen, rec_t, rec_f, sched, [(1.0, c_r, c_r, Draw.new(2, (1, 8, 8), cfg, g, "cpu")),
                                              (0.01, c_o, c_f, Draw.new(2, (1, 8, 8), cfg, g, "cpu"))], 1.2, False)  # fmt: skip
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.unet.parameters() if p.ndim > 1)
    assert all(p.grad is None for p in frozen.parameters()) and all(p.grad is None for p in fake.parameters())
    # the forgetting term asks the teacher about the anchor and the fake score about the forgotten class
    assert rec_t.calls == [[3, 4], [1, 1]] and rec_f.calls == [[3, 4], [0, 0]]
    assert same_weights(frozen, before)


def test_fake_score_step_grads_reach_only_psi():
    frozen, fake, gen = _nets()
    g = torch.Generator().manual_seed(0)
    d = Draw.new(2, (1, 8, 8), SFDConfig(), g, "cpu")
    fake_score_step(gen, fake, Schedule(torch.device("cpu")), [(1.0, torch.tensor([3, 4]), d)], False)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in fake.parameters())
    assert all(p.grad is None for p in gen.unet.parameters())
    assert all(p.grad is None for p in frozen.parameters())


def test_fake_score_step_matches_a_direct_computation():
    _, fake, gen = _nets()
    g = torch.Generator().manual_seed(0)
    d = Draw.new(3, (1, 8, 8), SFDConfig(), g, "cpu")
    labels = torch.tensor([1, 2, 3])
    loss = fake_score_step(gen, fake, Schedule(torch.device("cpu")), [(0.5, labels, d)], False)
    from diffusers import DDPMScheduler

    abar = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod
    with torch.no_grad():
        a0, b0 = abar[440].sqrt(), (1 - abar[440]).sqrt()
        x_g = (b0 * d.z - b0 * gen.unet(b0 * d.z, torch.full((3,), 440), class_labels=labels).sample) / a0
        a, b = abar[d.t].sqrt().view(-1, 1, 1, 1), (1 - abar[d.t]).sqrt().view(-1, 1, 1, 1)
        pred = fake(a * x_g + b * d.eps, d.t, class_labels=labels).sample
        direct = 0.5 * ((pred - d.eps) ** 2).sum(dim=(1, 2, 3)).mean()
    assert loss.item() == pytest.approx(direct.item(), rel=1e-5)


def test_noise_levels_and_generator_constants():
    cfg = SFDConfig()
    t = Draw.new(20000, (1, 1, 1), cfg, torch.Generator().manual_seed(0), "cpu").t
    assert t.min().item() == 38 and t.max().item() == 711
    gen = OneStepGenerator(tiny_teacher().unet, t_init=440)
    assert gen.b / gen.a == pytest.approx(2.5, abs=0.02)  # sigma* of SiD's init_sigma


def test_sfd_reads_no_image(tmp_path, fmnist_dir, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("SFD read dataset images")

    monkeypatch.setattr(Dataset, "images", forbidden)
    monkeypatch.setattr(
        type(tiny_context(tmp_path / "x", fmnist_dir.parent).dataset), "load_split", forbidden
    )
    ctx = tiny_context(tmp_path / "run", fmnist_dir.parent)
    teacher = tiny_teacher()
    before = copy.deepcopy(teacher.unet)
    cfg = dataclasses.replace(SFDConfig(), iterations=2, batch_size=2)
    model = SFD(cfg).unlearn(teacher, ctx.forget_set, ctx)
    assert isinstance(model, OneStepGenerator) and model.nfe(steps=25, guidance=2.0) == 1
    assert SFD.requires == frozenset()
    assert same_weights(teacher.unet, before)  # the teacher never changes
    assert not same_weights(model.unet, before)


def test_anchor_choices():
    from bench.data.fashion_mnist import FashionMNIST

    fs = FashionMNIST().forget_set("class-0")
    g = torch.Generator().manual_seed(0)
    assert anchor_labels("fixed", fs, 3, g).tolist() == [1, 1, 1]
    assert anchor_labels("5", fs, 2, g).tolist() == [5, 5]
    rand = anchor_labels("random", fs, 2000, g)
    assert set(rand.tolist()) == set(range(1, 10))
    with pytest.raises(BenchError, match="inside forget set"):
        anchor_labels("0", fs, 1, g)
    with pytest.raises(BenchError, match="expected 'fixed', 'random'"):
        anchor_labels("dog", fs, 1, g)


def test_sid_is_sfd_without_forgetting():
    assert SiD.Config().fake_forget_weight == 0 and SiD.Config().generator_forget_weight == 0
    assert SFDConfig().fake_forget_weight == 0.01 and SFDConfig().generator_forget_weight == 0.01
    assert {f.name for f in dataclasses.fields(SiD.Config)} == {f.name for f in dataclasses.fields(SFDConfig)}


@pytest.mark.parametrize(("method", "distilled"), [(SFD, set(range(1, 10))), (SiD, set(range(10)))])
def test_sid_distils_every_class_and_sfd_the_retained_ones(
    tmp_path, fmnist_dir, monkeypatch, isolated_stores, method, distilled
):
    """The official stage 1 (cifar10_sid.yml, --label_to_forget -1) distils class 0 too; train_sfd does not."""
    import methods.sfd as sfd_module

    seen, real = set(), sfd_module.generator_step

    def spy(gen, teacher, fake, sched, terms, alpha, amp):
        seen.update(terms[0][1].tolist())  # the retained term's labels
        return real(gen, teacher, fake, sched, terms, alpha, amp)

    monkeypatch.setattr(sfd_module, "generator_step", spy)
    ctx = tiny_context(tmp_path / "run", fmnist_dir.parent)
    cfg = dataclasses.replace(method.Config(), iterations=15, batch_size=8)
    method(cfg).unlearn(tiny_teacher(), ctx.forget_set, ctx)
    assert seen == distilled
    assert SiD.Config().lr_fake == 3e-5 and SiD.Config().lr_generator == 1e-5  # cifar10_sid.yml
