"""ESD, SA, SalUn and Retrain: their losses against a direct computation, and the contract every method keeps."""

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from bench.api import Dataset
from bench.config import resolve_config
from bench.data.fashion_mnist import FashionMNIST
from bench.errors import BenchError
from bench.models.unet import noise_schedule
from bench.registry import METHODS
from bench.sampling import load_sampler
from methods import esd, sa, salun
from methods.retrain import RECIPE_FIELDS, Retrain
from tests.helpers import Killed, kill_after_saves, same_weights, tiny_context, tiny_teacher

# ---- ESD --------------------------------------------------------------------------------------------------


def test_esd_target_matches_the_paper_and_the_new_code():
    e_c, e_0 = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([0.5, -1.0, -1.0])
    # paper: e_0 - eta (e_c - e_0)
    assert esd.esd_target(e_c, e_0, 1.0).tolist() == [0.0, -4.0, -1.0]
    assert esd.esd_target(e_c, e_0, 3.0).tolist() == [-1.0, -10.0, -1.0]
    # esd_sd.py: e_c - eta (e_c - e_0), which is the paper's target with eta - 1
    assert esd.esd_target(e_c, e_0, 2.0, "concept").tolist() == [0.0, -4.0, -1.0]
    x, y = torch.randn(5), torch.randn(5)
    assert torch.allclose(esd.esd_target(x, y, 2.7, "concept"), esd.esd_target(x, y, 1.7))


def test_esd_train_methods_split_the_unet():
    names = [n for n, _ in tiny_teacher().unet.named_parameters()]
    x = {n for n in names if esd.trainable(n, "esd-x")}
    u = {n for n in names if esd.trainable(n, "esd-u")}
    assert x == {n for n in names if n.startswith("class_embedding") or ".time_emb_proj." in n}
    assert not x & u
    left_out = set(names) - x - u
    assert left_out == {
        n for n in names if n.split(".")[0] in ("time_embedding", "conv_norm_out", "conv_out")
    }
    assert all(esd.trainable(n, "full") for n in names)
    with pytest.raises(BenchError, match="train_method"):
        esd.trainable("conv_in.weight", "xattn")


def test_partial_ddim_stops_where_full_sampling_passes():
    model = tiny_teacher()
    sched = DDIMScheduler.from_config(noise_schedule().config)
    sched.set_timesteps(5)
    z, labels = torch.randn(2, 1, 8, 8), torch.tensor([0, 3])
    with torch.no_grad():
        x0, t0 = esd.partial_ddim(model, z, labels, scheduler=sched, stop=0, guidance=3.0)
        assert torch.equal(x0, z) and t0 == int(sched.timesteps[0])
        x3, t3 = esd.partial_ddim(model, z, labels, scheduler=sched, stop=3, guidance=3.0)
        assert t3 == int(sched.timesteps[3])
        # finishing the last two steps by hand gives the sampler's output
        x = x3
        for t in sched.timesteps[3:]:
            x = sched.step(model.eps(x, t, labels, 3.0), t, x, eta=0.0).prev_sample
        full = model._sample_batch(z, None, labels, steps=5, guidance=3.0, eta=0.0, amp=False)
    assert torch.allclose(x, full, atol=1e-6)


def test_esd_trains_only_the_chosen_weights(tmp_path, fmnist_dir):
    ctx = tiny_context(tmp_path, fmnist_dir.parent)
    teacher = tiny_teacher()
    model = esd.ESD(resolve_config(esd.ESD, "smoke", {"train_method": "esd-x", "lr": 1e-2})).unlearn(
        teacher, ctx.forget_set, ctx
    )
    before, after = teacher.unet.state_dict(), model.unet.state_dict()
    for name in before:
        moved = not torch.equal(before[name], after[name])
        if not esd.trainable(name, "esd-x"):
            assert not moved, name
    assert not torch.equal(before["class_embedding.weight"][0], after["class_embedding.weight"][0])
    # only the forgotten class's embedding row gets a gradient
    assert torch.equal(before["class_embedding.weight"][1:], after["class_embedding.weight"][1:])


# ---- SA ---------------------------------------------------------------------------------------------------


def test_denoising_loss_on_the_surrogate_is_the_pixel_sum_batch_mean():
    unet = tiny_teacher().unet
    g = torch.Generator().manual_seed(0)
    x_f = sa.surrogate_images(3, (1, 8, 8), g)
    assert x_f.min() >= -1 and x_f.max() <= 1
    t, noise, labels = torch.tensor([0, 500, 999]), torch.randn(3, 1, 8, 8), torch.tensor([0, 0, 0])
    got = sa.denoising_loss(unet, x_f, labels, t, noise)
    abar = noise_schedule().alphas_cumprod
    direct = []
    with torch.no_grad():
        for i in range(3):
            x_t = abar[t[i]].sqrt() * x_f[i : i + 1] + (1 - abar[t[i]]).sqrt() * noise[i : i + 1]
            pred = unet(x_t, t[i : i + 1], class_labels=labels[i : i + 1]).sample
            direct.append(((noise[i] - pred[0]) ** 2).sum().item())
    assert got.item() == pytest.approx(np.mean(direct), rel=1e-5)


def test_surrogate_is_uniform_on_minus_one_one():
    x = sa.surrogate_images(2000, (1, 4, 4), torch.Generator().manual_seed(0))
    assert x.min() >= -1 and x.max() <= 1
    assert x.mean().item() == pytest.approx(0.0, abs=0.01)
    assert x.var().item() == pytest.approx(1 / 3, abs=0.01)


def test_ewc_penalty_matches_a_direct_sum():
    rng = np.random.default_rng(0)
    theta = {"a": rng.normal(size=(2, 3)), "b": rng.normal(size=4)}
    star = {k: rng.normal(size=v.shape) for k, v in theta.items()}
    fisher = {k: rng.random(v.shape) for k, v in theta.items()}
    direct = sum(np.sum(fisher[k] * (theta[k] - star[k]) ** 2) for k in theta)
    t = {k: torch.tensor(v) for k, v in theta.items()}
    got = sa.ewc_penalty(
        t, {k: torch.tensor(v) for k, v in star.items()}, {k: torch.tensor(v) for k, v in fisher.items()}
    )
    assert got.item() == pytest.approx(direct, rel=1e-12)
    assert sa.ewc_penalty(t, t, {k: torch.tensor(v) for k, v in fisher.items()}).item() == 0


def test_antithetic_and_stratified_timesteps():
    g = torch.Generator().manual_seed(0)
    t = sa.antithetic_timesteps(7, g)
    assert len(t) == 7 and torch.equal(t[:3] + t[4:7], torch.full((3,), 999))
    assert torch.equal(sa.stratified_timesteps(1000, g), torch.arange(1000))
    s = sa.stratified_timesteps(50, g)
    assert torch.equal(s // 20, torch.arange(50))


def test_fisher_is_the_mean_of_squared_per_sample_gradients():
    unet = tiny_teacher().unet
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([2, 7])
    fisher = sa.diagonal_fisher(unet, x, y, timesteps=4, label_dropout=0.5, g=torch.Generator().manual_seed(3),
                                device=torch.device("cpu"))  # fmt: skip
    # Redo it one timestep at a time with the same draws: sum the gradients per sample, square, average.
    g = torch.Generator().manual_seed(3)
    abar = noise_schedule().alphas_cumprod
    expected = {n: torch.zeros_like(p) for n, p in unet.named_parameters()}
    for i in range(2):
        t = sa.stratified_timesteps(4, g)
        noise = torch.randn(4, 1, 8, 8, generator=g)
        labels = sa.drop_labels(y[i].expand(4), 0.5, 10, g)
        unet.zero_grad()
        for j in range(4):
            x_t = abar[t[j]].sqrt() * x[i : i + 1] + (1 - abar[t[j]]).sqrt() * noise[j : j + 1]
            pred = unet(x_t, t[j : j + 1], class_labels=labels[j : j + 1]).sample
            (250 * ((noise[j] - pred[0]) ** 2).sum()).backward()  # 1000 / 4 timesteps
        for n, p in unet.named_parameters():
            expected[n] += p.grad**2 / 2
    got, want = (torch.cat([d[n].flatten() for n in expected]) for d in (fisher, expected))
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6 * want.max().item())
    assert sum(f.sum() for f in fisher.values()) > 0


def test_teacher_statistics_are_cached_per_teacher(tmp_path, fmnist_dir, monkeypatch):
    monkeypatch.setenv("BENCH_MODEL_DIR", str(tmp_path / "store"))
    ctx = tiny_context(tmp_path / "run", fmnist_dir.parent)
    method = sa.SelectiveAmnesia(resolve_config(sa.SelectiveAmnesia, "smoke", {}))
    teacher = tiny_teacher()
    x, y, fisher = method._teacher_statistics(teacher, ctx)
    assert sorted(y.tolist()) == sorted(list(range(10)) * 2)
    files = sorted((tmp_path / "store" / "sa").rglob("*.safetensors"))
    assert len(files) == 2 and files[0].parent.name == sa.teacher_digest(teacher.unet)

    def boom(*args, **kwargs):
        raise AssertionError("recomputed a cached Fisher")

    monkeypatch.setattr(sa, "diagonal_fisher", boom)
    x2, _, fisher2 = method._teacher_statistics(tiny_teacher(), ctx)  # same weights: cache hit
    assert torch.equal(x, x2) and all(torch.equal(fisher[k], fisher2[k]) for k in fisher)
    with pytest.raises(AssertionError, match="recomputed"):
        method._teacher_statistics(tiny_teacher(seed=1), ctx)  # another teacher: never the same cache


# ---- SalUn ------------------------------------------------------------------------------------------------


def test_saliency_mask_keeps_the_global_top_half():
    grads = {"a": torch.tensor([[0.1, -5.0], [2.0, 0.0]]), "b": torch.tensor([3.0, -0.2, 1.0, 0.05])}
    mask = salun.saliency_mask(grads, 0.5)  # 8 weights: keep |g| in {5, 3, 2, 1}
    assert mask["a"].tolist() == [[0.0, 1.0], [1.0, 0.0]]
    assert mask["b"].tolist() == [1.0, 0.0, 1.0, 0.0]
    big = {"w": torch.randn(1000), "v": torch.randn(10, 30)}
    m = salun.saliency_mask(big, 0.5)
    assert sum(v.sum() for v in m.values()) == 650
    kept = torch.cat([big[k].abs().flatten()[m[k].flatten() > 0] for k in big])
    dropped = torch.cat([big[k].abs().flatten()[m[k].flatten() == 0] for k in big])
    assert kept.min() >= dropped.max()


def test_relabel_loss_is_elementwise_mse_without_gradient_to_the_target():
    a = torch.tensor([[1.0, 2.0], [0.0, -1.0]], requires_grad=True)
    b = torch.tensor([[0.0, 0.0], [1.0, 1.0]], requires_grad=True)
    loss = salun.relabel_loss(a, b)
    assert loss.item() == pytest.approx((1 + 4 + 1 + 4) / 4)
    loss.backward()
    assert b.grad is None and torch.allclose(a.grad, (a - b).detach() / 2)


def test_relabel_targets():
    ds = FashionMNIST()
    g = torch.Generator().manual_seed(0)
    assert salun.relabel_targets("next", torch.tensor([0, 0]), ds.forget_set("class-0"), g).tolist() == [1, 1]
    assert salun.relabel_targets("next", torch.tensor([9]), ds.forget_set("class-9"), g).tolist() == [0]
    two = ds.forget_set("classes-0-1")
    assert salun.relabel_targets("next", torch.tensor([0, 1]), two, g).tolist() == [2, 2]
    rand = salun.relabel_targets("random", torch.zeros(3000, dtype=torch.long), two, g)
    assert set(rand.tolist()) == set(range(2, 10))
    with pytest.raises(BenchError, match="relabel"):
        salun.SalUn(salun.SalUnConfig(relabel="shuffle")).validate(two)


def test_salun_masked_weights_never_move(tmp_path, fmnist_dir):
    ctx = tiny_context(tmp_path, fmnist_dir.parent, requires={"forget", "retain"}, checkpoint_every=1)
    teacher = tiny_teacher()
    cfg = resolve_config(salun.SalUn, "smoke", {"lr": 1e-2})
    model = salun.SalUn(cfg).unlearn(teacher, ctx.forget_set, ctx)
    mask = torch.load(ctx.state_path, weights_only=True)["mask"]
    before, after = dict(teacher.unet.named_parameters()), dict(model.unet.named_parameters())
    total = sum(m.numel() for m in mask.values())
    assert sum(m.sum().item() for m in mask.values()) == int(total * cfg.mask_ratio)
    moved = 0
    for name, m in mask.items():
        assert torch.equal(before[name][~m], after[name][~m]), name  # frozen exactly, despite Adam
        moved += (before[name][m] != after[name][m]).sum().item()
    assert moved > 0.9 * int(total * cfg.mask_ratio)


# ---- Retrain ----------------------------------------------------------------------------------------------


def test_retrain_budget_is_the_teachers():
    from bench.presets import PRESETS

    for name in ("default",):
        recipe = PRESETS[name].teacher
        cfg = resolve_config(Retrain, name, {})
        assert {k: getattr(cfg, k) for k in RECIPE_FIELDS} == {k: getattr(recipe, k) for k in RECIPE_FIELDS}
    cfg = resolve_config(Retrain, "paper", {})
    assert cfg.steps == PRESETS["paper"].teacher.steps
    assert Retrain.oracle and Retrain.requires == frozenset({"retain"})


def test_retrain_never_sees_the_forgotten_class(tmp_path, fmnist_dir, monkeypatch):
    seen = []
    real = Dataset.images

    def spy(self, split, classes=None):
        seen.append(classes)
        return real(self, split, classes)

    monkeypatch.setattr(Dataset, "images", spy)
    monkeypatch.setenv("BENCH_MODEL_DIR", str(tmp_path / "store"))
    ctx = tiny_context(tmp_path, fmnist_dir.parent, requires=Retrain.requires)
    teacher = tiny_teacher()
    model = Retrain(resolve_config(Retrain, "smoke", {})).unlearn(teacher, ctx.forget_set, ctx)
    assert seen == [tuple(range(1, 10))]
    architecture = lambda unet: {k: v for k, v in unet.config.items() if not k.startswith("_")}  # noqa: E731
    assert architecture(model.unet) == architecture(teacher.unet)


def test_retrain_keeps_its_oracle_and_the_next_run_loads_it(tmp_path, fmnist_dir, monkeypatch):
    monkeypatch.setenv("BENCH_MODEL_DIR", str(tmp_path / "store"))
    method = Retrain(resolve_config(Retrain, "smoke", {}))
    ctx = tiny_context(tmp_path / "a", fmnist_dir.parent, requires=Retrain.requires)
    trained = method.unlearn(tiny_teacher(), ctx.forget_set, ctx)
    assert ctx.reused is None
    stored = list((tmp_path / "store").rglob("MANIFEST.json"))
    assert len(stored) == 1 and "oracles/class-0/seed0-" in stored[0].as_posix()

    def forbidden(*args, **kwargs):
        raise AssertionError("a stored oracle was trained again")

    monkeypatch.setattr(Dataset, "images", forbidden)
    again = tiny_context(tmp_path / "b", fmnist_dir.parent, requires=Retrain.requires)
    loaded = method.unlearn(tiny_teacher(seed=5), again.forget_set, again)  # other weights, same architecture
    assert same_weights(trained.unet, loaded.unet)
    assert again.reused["what"] == "oracle" and again.reused["seconds"] > 0
    # Another recipe, seed or forget set is another oracle.
    other = tiny_context(tmp_path / "c", fmnist_dir.parent, requires=Retrain.requires, seed=1)
    with pytest.raises(AssertionError, match="trained again"):
        method.unlearn(tiny_teacher(), other.forget_set, other)
    # A damaged oracle is named, not used.
    weights = next(stored[0].parent.rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(BenchError, match="checksum"):
        method.unlearn(tiny_teacher(), again.forget_set, again)


# ---- The contract of every registered method --------------------------------------------------------------

ALL = METHODS.names()
# The slowest (3-9 s each): in the slow set, still in CI.
SLOW_CONTRACTS = ("sfd", "sfd-2stage", "sid", "sa", "erasediff")
CLASS_TIER = [m for m in ALL if METHODS.get(m).tier != "text"]  # the text tier's: tests/test_text_methods.py


def _run(name, tmp, data_dir, *, seed=0, checkpoint_every=2, kill_after=None, probe=None):
    """One smoke run with a model store of its own (a stored oracle or cache would stand in for the training)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BENCH_MODEL_DIR", str(tmp / "store"))
        return _run_in_store(name, tmp, data_dir, seed=seed, checkpoint_every=checkpoint_every,
                             kill_after=kill_after, probe=probe)  # fmt: skip


def _run_in_store(name, tmp, data_dir, *, seed, checkpoint_every, kill_after, probe):
    cls = METHODS.get(name)
    ctx = tiny_context(tmp, data_dir, requires=cls.requires, seed=seed, checkpoint_every=checkpoint_every)
    if probe:
        ctx.runtime = dataclasses.replace(ctx.runtime, probe=probe, probe_every=1)
    if kill_after:
        kill_after_saves(ctx, kill_after)
    return cls(resolve_config(cls, "smoke", {})).unlearn(tiny_teacher(), ctx.forget_set, ctx)


@pytest.mark.parametrize("name", [pytest.param(m, marks=pytest.mark.slow) if m in SLOW_CONTRACTS else m
                                  for m in CLASS_TIER])  # fmt: skip
def test_contract(name, tmp_path, fmnist_dir, monkeypatch):
    """A few smoke steps on a tiny teacher: the weights change (except `original`), a run killed after a state
    dump resumes to the very weights of an uninterrupted run with the same seed (so it is also deterministic),
    another seed differs, the model saves, reloads and samples identically, a data-free method reads no image, and
    a probe that samples the model after every step sees the current model and changes nothing."""
    if not METHODS.get(name).requires:

        def forbidden(*args, **kwargs):
            raise AssertionError(f"{name} read dataset images")

        monkeypatch.setattr(Dataset, "images", forbidden)
        monkeypatch.setattr(FashionMNIST, "load_split", forbidden)
    data = fmnist_dir.parent
    full = _run(name, tmp_path / "full", data, checkpoint_every=1)
    assert same_weights(full.unet, tiny_teacher().unet) == (name == "original")

    killed = False
    try:
        _run(name, tmp_path / "killed", data, checkpoint_every=1, kill_after=2)
    except Killed:
        killed = True
    assert killed or name == "original", "the smoke config must dump state at least twice"
    resumed = _run(name, tmp_path / "killed", data, checkpoint_every=1)
    assert same_weights(full.unet, resumed.unet)
    if name != "original":
        assert not same_weights(full.unet, _run(name, tmp_path / "seed1", data, seed=1).unet)

    seen = []

    def probe(step, seconds, sampler):
        sampler.sample(torch.tensor([0, 1]), [3, 4], steps=2, guidance=2.0)
        seen.append((step, seconds, {k: v.clone() for k, v in sampler.unet.state_dict().items()}))

    probed = _run(name, tmp_path / "probed", data, checkpoint_every=1, probe=probe)
    assert same_weights(full.unet, probed.unet)
    if name != "original":
        config = resolve_config(METHODS.get(name), "smoke", {})
        steps = config.steps if name == "retrain" else config.iterations
        if name == "sfd-2stage":  # stage 1 (sid at the same preset) first, then its own iterations
            steps += resolve_config(METHODS.get("sid"), "smoke", {}).iterations
        assert [s for s, _, _ in seen] == list(range(1, steps + 1))
        assert all(a < b for (_, a, _), (_, b, _) in itertools.pairwise(seen))
        last = seen[-1][2]
        assert all(torch.equal(last[k], v) for k, v in full.unet.state_dict().items())

    full.save(tmp_path / "saved")
    again = load_sampler(tmp_path / "saved")
    assert type(again) is type(full) and same_weights(again.unet, full.unet)
    labels, seeds = torch.tensor([0, 5]), [11, 12]
    a = full.sample(labels, seeds, steps=2, guidance=2.0)
    assert torch.equal(a, again.sample(labels, seeds, steps=2, guidance=2.0)) and a.shape == (2, 1, 8, 8)


@pytest.mark.parametrize("name", ALL)
def test_contract_card_cites_every_default_and_scales_smoke(name):
    cls = METHODS.get(name)
    card = cls.card()
    assert all(source for _, source in card["defaults"].values()), "every default cites its source"
    for preset, scaled in cls.scaled.items():
        resolve_config(cls, preset, {})  # the overrides name real fields
        assert scaled.why, f"{name}: preset {preset} says why it scales"
    if {"iterations", "steps", "epochs"} & set(card["defaults"]):  # UCE's closed form has nothing to scale
        assert "smoke" in cls.scaled and "default" in cls.scaled, "a trainable method scales to both presets"
