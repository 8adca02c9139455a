"""SFR-on, EraseDiff, GA and RL: their losses against independent re-implementations of the official formulas on
hand-made tensors (values and gradients), and the properties of their loops that the contract tests do not see."""

import numpy as np
import pytest
import torch

from bench.config import resolve_config
from bench.data.fashion_mnist import FashionMNIST
from bench.errors import BenchError
from bench.models.unet import noise_schedule
from methods import erasediff, ga, rl, sfron
from methods.sa import antithetic_timesteps
from tests.helpers import tiny_context, tiny_teacher

# ---- SFR-on -----------------------------------------------------------------------------------------------


def test_adaptive_loss_weights_small_losses_most():
    # official: coef = 1 / (l^lambda + 1e-8), (coef / sum coef) * l * n, mean over the batch
    losses = torch.tensor([1.0, 4.0, 9.0], requires_grad=True)
    got = sfron.adaptive_loss(losses, 0.5)
    coef = 1 / (np.array([1.0, 4.0, 9.0]) ** 0.5 + 1e-8)  # 1, 1/2, 1/3
    w = coef / coef.sum()  # 6/11, 3/11, 2/11
    assert got.item() == pytest.approx(float(np.sum(w * [1.0, 4.0, 9.0])), rel=1e-6)
    assert got.item() == pytest.approx(36 / 11, rel=1e-6)
    got.backward()  # the weights come from detached losses: the gradient is w itself
    assert np.allclose(losses.grad.numpy(), w, rtol=1e-6)
    flat = torch.tensor([2.0, 3.0, 7.0])
    assert sfron.adaptive_loss(flat, 0.0).item() == pytest.approx(4.0)  # lambda 0: the plain mean


def test_cosine_forget_weight():
    assert sfron.cosine_weight(10.0, 0, 150) == 10.0
    assert sfron.cosine_weight(10.0, 75, 150) == pytest.approx(5.0)
    assert sfron.cosine_weight(10.0, 149, 150) == pytest.approx(10 * (1 + np.cos(np.pi * 149 / 150)) / 2)


def test_fisher_mask_is_the_ratio_rule():
    forget = {"a": torch.tensor([2.0, 1.0, 0.0, 0.0]), "b": torch.tensor([[3.0, 1e-3]])}
    remain = {"a": torch.tensor([1.0, 2.0, 1.0, 0.0]), "b": torch.tensor([[3.0, 1e-2]])}
    mask = sfron.fisher_mask(forget, remain, 1.0)
    # 2/1 >= 1, 1/2 < 1, 0/1 < 1, (0 + 1e-15) / (0 + 1e-15) = 1 >= 1 (an unused weight counts as salient)
    assert mask["a"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert mask["b"].tolist() == [[1.0, 0.0]]
    assert sfron.fisher_mask(forget, remain, 0.05)["b"].tolist() == [[1.0, 1.0]]


def test_batch_fisher_is_the_mean_of_squared_clipped_batch_gradients():
    unet = tiny_teacher().unet
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 0, 3, 4, 0])
    got = sfron.batch_fisher(unet, x, y, batch_size=2, guidance=3.0, grad_clip=1.0, g=torch.Generator().manual_seed(1),
                             device=torch.device("cpu"))  # fmt: skip
    g = torch.Generator().manual_seed(1)
    abar, names = noise_schedule().alphas_cumprod, [n for n, _ in unet.named_parameters()]
    perm, want = torch.randperm(5, generator=g), {n: 0.0 for n in names}
    for idx in (perm[0:2], perm[2:4], perm[4:5]):
        t, noise = antithetic_timesteps(len(idx), g), torch.randn(len(idx), 1, 8, 8, generator=g)
        x_t = abar[t].sqrt().view(-1, 1, 1, 1) * x[idx] + (1 - abar[t]).sqrt().view(-1, 1, 1, 1) * noise
        cond = unet(x_t, t, class_labels=y[idx]).sample
        uncond = unet(x_t, t, class_labels=torch.full_like(y[idx], 10)).sample
        pred = (1 + 2.0) * cond - 2.0 * uncond  # the official cond_scale 2
        grads = torch.autograd.grad(((noise - pred) ** 2).sum(dim=(1, 2, 3)).mean(), list(unet.parameters()))
        scale = min(1.0, 1.0 / (torch.sqrt(sum((gr**2).sum() for gr in grads)).item() + 1e-6))
        for n, gr in zip(names, grads, strict=True):
            want[n] = want[n] + (gr * scale) ** 2 / 3
    for n in names:
        torch.testing.assert_close(got[n], want[n], rtol=1e-3, atol=1e-9)


def test_sfron_forget_steps_move_only_salient_weights(tmp_path, fmnist_dir):
    """With the remain steps' weight 0, the masked weights never move (Adam's moments stay zero)."""
    ctx = tiny_context(tmp_path, fmnist_dir.parent, requires={"forget", "retain"}, checkpoint_every=1)
    teacher = tiny_teacher()
    cfg = resolve_config(sfron.SFRon, "smoke", {"lr": 1e-2, "remain_alpha": 0.0})
    model = sfron.SFRon(cfg).unlearn(teacher, ctx.forget_set, ctx)
    mask = torch.load(ctx.state_path, weights_only=True)["mask"]
    before, after = dict(teacher.unet.named_parameters()), dict(model.unet.named_parameters())
    salient = sum(m.sum().item() for m in mask.values())
    assert 0 < salient < sum(m.numel() for m in mask.values())
    for name, m in mask.items():
        assert torch.equal(before[name][~m], after[name][~m]), name
    assert sum((before[n][m] != after[n][m]).sum().item() for n, m in mask.items()) > 0.5 * salient


# ---- EraseDiff --------------------------------------------------------------------------------------------


def test_bome_lambda_is_eta_minus_the_gradient_cosine():
    def official(g_dr, g_q, eta):  # ddpm/runners/diffusion.py l.834-855, in numpy
        q = np.linalg.norm(g_q)
        if q == 0:
            return 0.0
        tmp = np.dot(g_dr, g_q) / (np.linalg.norm(g_dr) * q + 1e-8)
        return eta - tmp if eta > tmp else 0.0

    cases = [([1.0, 0.0], [0.0, 2.0]), ([1.0, 1.0], [2.0, 2.0]), ([1.0, -2.0], [-1.0, 2.0]), ([3.0, 1.0], [0, 0]),
             ([0.3, -0.2, 0.9], [0.5, 0.1, -0.4])]  # fmt: skip
    for a, b in cases:
        got = erasediff.bome_lambda(torch.tensor(a), torch.tensor(b, dtype=torch.float), 0.1)
        assert got == pytest.approx(official(np.array(a), np.array(b, dtype=float), 0.1), abs=1e-6)
    assert erasediff.bome_lambda(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), 0.1) == pytest.approx(
        0.1
    )
    assert erasediff.bome_lambda(torch.tensor([1.0, -2.0]), torch.tensor([-1.0, 2.0]), 0.1) == pytest.approx(
        1.1
    )


def test_upper_objective_treats_the_inner_value_as_a_constant():
    remain, forget = torch.tensor(5.0, requires_grad=True), torch.tensor(0.25, requires_grad=True)
    loss = erasediff.upper_objective(remain, forget, 0.75, 0.1)
    assert loss.item() == pytest.approx(5.0 + 0.1 * (0.25 - 0.75))
    loss.backward()
    assert remain.grad.item() == 1.0 and forget.grad.item() == pytest.approx(0.1)


def test_pseudo_labels_are_one_retained_class_per_batch():
    ds = FashionMNIST()
    g = torch.Generator().manual_seed(0)
    fs = ds.forget_set("class-3")  # the official randint(1, 10) could pick 3 itself and never picks 0
    seen = set()
    for _ in range(300):
        c = erasediff.pseudo_labels(fs.retain, 16, g)
        assert len(set(c.tolist())) == 1
        seen.add(int(c[0]))
    assert seen == set(fs.retain)


def test_lower_level_restores_the_weights_and_keeps_adams_moments(tmp_path, fmnist_dir):
    unet = tiny_teacher().unet.train()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.Adam(unet.parameters(), lr=1e-2)
    method = erasediff.EraseDiff(
        resolve_config(erasediff.EraseDiff, "smoke", {"inner_images": 5, "batch_size": 2})
    )
    x, y = torch.randn(7, 1, 8, 8), torch.zeros(7, dtype=torch.long)
    calls = []

    def forget_loss(x0, labels, t, noise):
        loss = unet(x0 + noise, t, class_labels=labels).sample.square().mean()
        calls.append((len(labels), loss.item()))
        return loss

    inner = method._lower_level(unet, opt, x, y, forget_loss, torch.Generator().manual_seed(0))
    assert [n for n, _ in calls] == [2, 2, 1] * 2  # K = 2 passes over 5 images in batches of 2
    last = calls[3:]
    assert inner == pytest.approx(
        sum(n * v for n, v in last) / 5
    )  # batch-size-weighted mean of the last pass
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert all(s["step"] == 6 and s["exp_avg"].abs().sum() > 0 for s in opt.state.values())


def test_erasediff_adaptive_lambda_runs(tmp_path, fmnist_dir):
    ctx = tiny_context(tmp_path, fmnist_dir.parent, requires={"forget", "retain"})
    cfg = resolve_config(erasediff.EraseDiff, "smoke", {"lambda_bome": -1.0})
    erasediff.EraseDiff(cfg).unlearn(tiny_teacher(), ctx.forget_set, ctx)
    logged = [line for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert len(logged) == cfg.iterations and all('"lambda_bome": ' in line for line in logged)


# ---- GA and RL --------------------------------------------------------------------------------------------


def test_ga_objective_ascends_the_forget_loss():
    pred_f = torch.tensor([[[[1.0, 0.0]]], [[[2.0, -1.0]]]], requires_grad=True)  # (2, 1, 1, 2)
    noise_f = torch.tensor([[[[0.0, 0.0]]], [[[1.0, 1.0]]]])
    pred_r = torch.tensor([[[[0.5, 0.5]]]], requires_grad=True)
    noise_r = torch.tensor([[[[0.0, 1.0]]]])
    loss = ga.ga_objective(pred_f, noise_f, pred_r, noise_r, 0.5)
    # -mean_b sum_px (e - p)^2 + alpha mean_b sum_px (e - p)^2: -(1 + (1 + 4)) / 2 + 0.5 (0.25 + 0.25)
    assert loss.item() == pytest.approx(-3.0 + 0.25)
    loss.backward()
    assert torch.allclose(pred_f.grad, 2 * (noise_f - pred_f).detach() / 2)  # d/dp of -(e - p)^2 / B
    assert torch.allclose(pred_r.grad, -0.5 * 2 * (noise_r - pred_r).detach())


def test_rl_objective_is_salun_rl_without_mask():
    eps_f = torch.tensor([[[[1.0, 2.0]]], [[[0.0, -1.0]]]], requires_grad=True)
    eps_new = torch.tensor([[[[0.0, 0.0]]], [[[1.0, 1.0]]]], requires_grad=True)
    pred_r, noise_r = torch.tensor([[[[1.0, 1.0]]]], requires_grad=True), torch.zeros(1, 1, 1, 2)
    loss = rl.rl_objective(eps_f, eps_new, pred_r, noise_r, 1e-3)
    # torch MSELoss (mean over the 4 elements) + alpha * 2
    assert loss.item() == pytest.approx((1 + 4 + 1 + 4) / 4 + 1e-3 * 2)
    loss.backward()
    assert eps_new.grad is None and torch.allclose(eps_f.grad, (eps_f - eps_new).detach() / 2)
    assert torch.allclose(pred_r.grad, 1e-3 * 2 * pred_r.detach())


def test_relabel_predictions_drop_each_pass_independently():
    unet = tiny_teacher().unet
    x_t, t = torch.randn(4, 1, 8, 8), torch.tensor([1, 500, 998, 10])
    labels, targets = torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    eps_f, eps_new = rl.relabel_predictions(unet, x_t, t, labels, targets, 0.0, g)
    with torch.no_grad():
        assert torch.allclose(eps_f, unet(x_t, t, class_labels=labels).sample)
        assert torch.allclose(eps_new, unet(x_t, t, class_labels=targets).sample)
    assert eps_f.requires_grad and not eps_new.requires_grad
    null = torch.full_like(labels, 10)
    eps_f, eps_new = rl.relabel_predictions(unet, x_t, t, labels, targets, 1.0, g)
    with torch.no_grad():
        assert torch.allclose(eps_f, unet(x_t, t, class_labels=null).sample) and torch.allclose(
            eps_f, eps_new
        )


def test_rl_checks_its_relabel_choice():
    with pytest.raises(BenchError, match="relabel"):
        resolve_config(rl.RandomLabel, "smoke", {"relabel": "shuffle"})
