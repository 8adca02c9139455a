"""Protocol fixes of the fidelity audit (issue 12): what each metric is scored against, each control's objective."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bench.api import EvalContext, SampleSet
from bench.cli import main
from bench.config import resolve_config
from bench.data.fashion_mnist import FashionMNIST
from bench.registry import EVALUATORS, METHODS


class Oracle(nn.Module):
    """A judge that reads the class off the first pixel (hand-made images say what it must answer)."""

    def forward(self, x):
        return torch.nn.functional.one_hot(x[:, 0, 0, 0].round().long(), 10).float() * 50


def to_anchor(predicted: list[int], anchors: tuple[int, ...]) -> float:
    images = torch.zeros(len(predicted) + 2, 1, 4, 4)
    images[: len(predicted), 0, 0, 0] = torch.tensor(predicted, dtype=torch.float)
    images[len(predicted) :, 0, 0, 0] = 5  # two retained-class images
    labels = torch.tensor([0] * len(predicted) + [5, 5])
    ds = FashionMNIST(image_size=4)
    ctx = EvalContext(dataset=ds, forget_set=ds.forget_set("class-0"), judge=Oracle(), device=torch.device("cpu"),
                      anchors=anchors)  # fmt: skip
    samples = SampleSet(images=images, labels=labels, nfe=1, sample_s=0, unlearn_s=0, peak_mem_mb=0)
    return {m.name: v for m, v, _ in EVALUATORS.get("forget_accuracy")()(samples, ctx)}["to_anchor"]


def test_to_anchor_scores_against_the_anchor_the_method_used():
    assert to_anchor([1, 1, 3, 3], ()) == 0.5  # the forget set's default anchor (class 1)
    assert to_anchor([1, 1, 3, 3], (3,)) == 0.5 and to_anchor([3, 3, 3, 1], (3,)) == 0.75
    assert to_anchor([1, 2, 3, 0], tuple(range(1, 10))) == 0.75  # random anchors: any retained class


def test_methods_report_their_anchors():
    ds = FashionMNIST(image_size=16)
    fs = ds.forget_set("class-0")

    def anchors(method, **overrides):
        cls = METHODS.get(method)
        return cls(resolve_config(cls, "default", overrides)).anchors(fs)

    assert (
        anchors("sfd") == (1,)
        and anchors("sfd", anchor="3") == (3,)
        and anchors("sfd", anchor="random") == fs.retain
    )
    assert anchors("salun") == (1,) and anchors("salun", relabel="random") == fs.retain
    assert anchors("esd") == (1,)


@pytest.mark.slow
def test_the_run_records_and_scores_the_anchor_it_used(tmp_path, fmnist_dir):
    results = tmp_path / "r"
    argv = ["run", "--methods", "sfd", "--preset", "smoke", "--set", "sfd.anchor=3", "--results", str(results),
            "--data-dir", str(fmnist_dir)]  # fmt: skip
    assert main(argv) == 0
    (run,) = (results / "runs").iterdir()
    assert json.loads((run / "spec.json").read_text())["anchors_used"] == [3]


def test_salun_alpha_keeps_cifar10s_weight_per_element():
    """The forget term is a per-element mean, the retained term a per-pixel sum: alpha x D stays CIFAR-10's."""
    import dataclasses

    from methods.salun import SalUnConfig, effective_alpha

    cfg = SalUnConfig()
    assert effective_alpha(cfg, (3, 32, 32)) == cfg.alpha == 1e-3  # the paper's setting: unchanged
    assert effective_alpha(cfg, (1, 16, 16)) * 256 == cfg.alpha * 3072  # the default preset: 12x
    assert abs(effective_alpha(cfg, (1, 16, 16)) - 0.012) < 1e-12
    assert effective_alpha(dataclasses.replace(cfg, alpha_pixels=0), (1, 16, 16)) == 1e-3


def test_sa_replay_is_what_the_official_pngs_hold(tmp_path):
    """Against torchvision's own save_image(normalize=True) round trip, as SA's sample_classes writes them."""
    import numpy as np
    from PIL import Image
    from torchvision.utils import save_image

    from bench.training import random_flip
    from methods.sa import as_saved_png

    g = torch.Generator().manual_seed(0)
    images = (torch.rand(6, 1, 8, 8, generator=g) * 2.4 - 1.2) * torch.linspace(0.2, 1, 6).view(-1, 1, 1, 1)
    mine = as_saved_png(images)
    for k in range(len(images)):
        save_image(((images[k] + 1) / 2).clamp(0, 1), tmp_path / f"{k}.png", normalize=True)
        png = np.asarray(Image.open(tmp_path / f"{k}.png"))[..., 0]
        assert np.array_equal(png, mine[k, 0].numpy()), k
    flipped = random_flip(images, torch.Generator().manual_seed(1))
    same = [torch.equal(flipped[k], images[k]) for k in range(6)]
    assert (
        all(s or torch.equal(flipped[k], images[k].flip(-1)) for k, s in enumerate(same))
        and 0 < sum(same) < 6
    )


class FakeEps:
    """Stands for a model's guided eps: any smooth function of x and t will do for comparing two samplers."""

    def eps(self, x, t, labels, guidance):
        return torch.sin(3 * x + float(t) / 100) * guidance * 0.5


def ldm_ddim_till(z, *, steps: int, till: int, guidance: float):
    """An independent transcription of ldm's DDIMSampler.ddim_sampling@a2189e9 as train-esd.py calls it (uniform
    grid + 1, t_start=-1, till_T=till, eta 0), in float64 numpy."""
    import numpy as np

    from bench.models.unet import noise_schedule

    abar = noise_schedule().alphas_cumprod.double().numpy()
    ddim_timesteps = np.asarray(list(range(0, 1000, 1000 // steps))) + 1
    alphas = abar[ddim_timesteps]
    alphas_prev = np.asarray([abar[0], *abar[ddim_timesteps[:-1]].tolist()])
    timesteps = ddim_timesteps[:-1]
    total = timesteps.shape[0]
    img = z.double()
    for i, step in enumerate(np.flip(timesteps)):
        index = total - i - 1
        e = FakeEps().eps(img, int(step), None, guidance)
        pred_x0 = (img - np.sqrt(1 - alphas[index]) * e) / np.sqrt(alphas[index])
        img = np.sqrt(alphas_prev[index]) * pred_x0 + np.sqrt(1 - alphas_prev[index]) * e
        if index + 1 == till:
            break
    return img


def test_esd_x_t_is_the_old_scripts():
    from methods.esd import old_esd_time, old_esd_xt

    z = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for steps in (50, 25):
        for k in (0, 1, 2, 17, steps - 1):
            mine = old_esd_xt(FakeEps(), z, None, ddim_steps=steps, k=k, guidance=3.0)
            ref = ldm_ddim_till(z, steps=steps, till=k, guidance=3.0)
            assert torch.allclose(mine.double(), ref, atol=1e-4, rtol=1e-4), (steps, k)
    g = torch.Generator().manual_seed(0)
    for k in (0, 7, 49):
        drawn = {old_esd_time(k, 50, g) for _ in range(400)}
        assert drawn == set(
            range(20 * k, 20 * k + 20)
        )  # train-esd.py: t_enc_ddpm in [20 t_enc, 20 t_enc + 20)


def test_esd_new_trains_what_esd_sd_trains():
    """esd_sd.py's rule: the parameters of Linear and Conv2d modules outside the cross-attention."""
    from methods.esd import CONDITIONING, trained_parameters
    from tests.helpers import tiny_teacher

    unet = tiny_teacher().unet
    ref = {f"{m}.{n}" for m, mod in unet.named_modules() if type(mod).__name__ in ("Linear", "Conv2d")
           and not any(p in m.split(".") for p in CONDITIONING) for n, _ in mod.named_parameters()}  # fmt: skip
    new = trained_parameters(unet, "esd-u", "linear-conv")
    assert new == ref and any(n.startswith("time_embedding.") for n in new) and "conv_out.weight" in new
    assert not any("norm" in n or "class_embedding" in n or "time_emb_proj" in n for n in new)
    old = trained_parameters(unet, "esd-u", "noxattn")
    assert "conv_out.weight" not in old and any("norm" in n for n in old)
    assert METHODS.get("esd").Config().timing == "old" and METHODS.get("esd-new").Config().timing == "new"
    assert METHODS.get("esd-new").Config().train_rule == "linear-conv"


@pytest.mark.slow
def test_fid_rows_name_their_reference_and_the_paper_preset_uses_the_train_split(tmp_path, capsys):
    from bench.presets import get_preset
    from bench.store import read_metrics
    from tests.test_inputs import write_fmnist

    assert get_preset("paper").fid_reference == "train" and get_preset("default").fid_reference == "test"
    data = write_fmnist(tmp_path / "data")  # 500 train images, 100 test images
    got = {}
    for reference in ("test", "train"):
        results = tmp_path / reference
        assert main(["run", "--methods", "original", "--preset", "smoke", "--results", str(results), "--data-dir",
                     str(data), "--fid-reference", reference, "--evaluators", "fid"]) == 0  # fmt: skip
        (run,) = (results / "runs").iterdir()
        (row,) = [r for r in read_metrics(run / "metrics.jsonl") if r["metric"] == "fd_judge"]
        assert (
            row["reference"] == f"{reference} split, retained classes" and row["sampler"] == "ddim-10 eta 0"
        )
        got[reference] = row
    labels = fixture_labels()
    assert got["train"]["reference_n"] == int((labels != 0).sum())
    assert got["test"]["reference_n"] == int((labels[:100] != 0).sum())
    assert got["train"]["value"] != got["test"]["value"]


def fixture_labels():
    from tests.conftest import fixture_images

    return fixture_images()[1]


def test_the_official_ddpm_loss_sums_over_pixels_and_draws_antithetic_times():
    from bench.presets import get_preset
    from bench.training import ddpm_loss
    from tests.helpers import tiny_teacher

    unet = tiny_teacher().unet
    x0, labels = torch.randn(6, 1, 8, 8), torch.arange(6)

    def loss(**kw):
        return ddpm_loss(unet, x0, labels, torch.Generator().manual_seed(0), device=torch.device("cpu"), **kw)

    assert torch.allclose(loss(reduction="sum"), loss(reduction="mean") * 64, rtol=1e-5)
    assert torch.allclose(loss(reduction="none").mean(), loss(reduction="mean"), rtol=1e-5)
    seen = []
    real = unet.forward
    unet.forward = lambda x, t, **kw: (seen.append(t.clone()), real(x, t, **kw))[1]
    loss(antithetic=True)
    t = seen[0]
    assert torch.equal(t[4:], 999 - t[:2])  # cat(t, 999 - t)[:n] for n // 2 + 1 draws, as SA and SalUn do
    paper, default = get_preset("paper").teacher, get_preset("default").teacher
    assert (paper.loss, paper.antithetic, paper.flip, paper.warmup_steps, paper.dropout) == (
        "sum",
        True,
        True,
        0,
        0.1,
    )
    assert (default.loss, default.antithetic, default.flip) == ("mean", False, False)  # the shipped teacher's
    for method in ("finetune", "retrain"):
        cfg = resolve_config(METHODS.get(method), "paper", {})
        assert (cfg.loss, cfg.antithetic) == ("sum", True), method
