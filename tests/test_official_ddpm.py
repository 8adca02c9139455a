"""The official SA/SalUn/SFD class-conditional DDPM as a teacher backbone, and `bench import-teacher`.

`Reference` below is a second, plain implementation of the official `Conditional_Model`, written separately from
bench.models.ddpm_official in the official code's own structure and parameter names (ResnetBlock projecting
[temb, cemb] with cemb fixed at 512 channels, attention by explicit bmm, the null vector chosen by a keep mask,
guidance as `_forward_with_cond_scale`). Both networks get the same random weights and must agree.
"""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
import yaml
from torch import nn

from bench.cli import main
from bench.config import resolve_config
from bench.errors import BenchError
from bench.models.ddpm_official import OfficialConditionalUNet
from bench.models.import_official import import_teacher
from bench.models.store import check_external_teacher, load_external_teacher, load_teacher
from bench.models.unet import build_unet, load_unet, num_classes_of
from bench.presets import get_preset
from bench.registry import METHODS
from bench.sampling import DiffusionModel, load_sampler
from methods import esd
from tests.helpers import same_weights, tiny_context

# ---- The independent reference ------------------------------------------------------------------------------


def ref_timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    scale = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -scale)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1, 0, 0))
    return emb


def swish(x):
    return x * torch.sigmoid(x)


def group_norm(c):
    return nn.GroupNorm(num_groups=32, num_channels=c, eps=1e-6, affine=True)


class RefResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels, dropout, temb_channels=512, cemb_channels=512):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.temb_cemb_proj = nn.Linear(temb_channels + cemb_channels, out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x, temb, cemb):
        h = self.conv1(swish(self.norm1(x)))
        h = h + self.temb_cemb_proj(swish(torch.cat([temb, cemb], dim=-1)))[:, :, None, None]
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class RefAttnBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = group_norm(c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, h, w = q.shape
        q = q.reshape(b, c, h * w).permute(0, 2, 1)
        k = k.reshape(b, c, h * w)
        w_ = torch.bmm(q, k) * (int(c) ** (-0.5))
        w_ = torch.softmax(w_, dim=2)
        v = v.reshape(b, c, h * w)
        h_ = torch.bmm(v, w_.permute(0, 2, 1)).reshape(b, c, h, w)
        return x + self.proj_out(h_)


class RefDownsample(nn.Module):
    def __init__(self, c, with_conv):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(c, c, kernel_size=3, stride=2, padding=0)

    def forward(self, x):
        if self.with_conv:
            return self.conv(torch.nn.functional.pad(x, (0, 1, 0, 1), mode="constant", value=0))
        return torch.nn.functional.avg_pool2d(x, kernel_size=2, stride=2)


class RefUpsample(nn.Module):
    def __init__(self, c, with_conv):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        x = torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Reference(nn.Module):
    """The official Conditional_Model, re-implemented from its structure (config as a plain dict)."""

    def __init__(self, *, ch, ch_mult, num_res_blocks, attn_resolutions, dropout, in_channels, out_ch, resolution,
                 resamp_with_conv, n_classes):  # fmt: skip
        super().__init__()
        self.ch, self.temb_ch = ch, ch * 4
        self.num_resolutions, self.num_res_blocks, self.resolution = len(ch_mult), num_res_blocks, resolution
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, self.temb_ch), nn.Linear(self.temb_ch, self.temb_ch)])
        self.classes_emb = nn.Embedding(n_classes, ch)
        self.null_classes_emb = nn.Parameter(torch.randn(ch))
        self.cemb = nn.Module()
        self.cemb.dense = nn.ModuleList([nn.Linear(ch, self.temb_ch), nn.Linear(self.temb_ch, self.temb_ch)])
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        curr_res, in_ch_mult = resolution, (1, *ch_mult)
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(RefResnetBlock(block_in, block_out, dropout, temb_channels=self.temb_ch))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(RefAttnBlock(block_in))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i_level != self.num_resolutions - 1:
                down.downsample = RefDownsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = RefResnetBlock(block_in, block_in, dropout, temb_channels=self.temb_ch)
        self.mid.attn_1 = RefAttnBlock(block_in)
        self.mid.block_2 = RefResnetBlock(block_in, block_in, dropout, temb_channels=self.temb_ch)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out, skip_in = ch * ch_mult[i_level], ch * ch_mult[i_level]
            for i_block in range(num_res_blocks + 1):
                if i_block == num_res_blocks:
                    skip_in = ch * in_ch_mult[i_level]
                block.append(
                    RefResnetBlock(block_in + skip_in, block_out, dropout, temb_channels=self.temb_ch)
                )
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(RefAttnBlock(block_in))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = RefUpsample(block_in, resamp_with_conv)
                curr_res *= 2
            self.up.insert(0, up)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward_(self, x, t, c, keep):
        """eps for labels c (0..K-1); rows where `keep` is False get the null vector."""
        temb = self.temb.dense[1](swish(self.temb.dense[0](ref_timestep_embedding(t, self.ch))))
        cemb = self.classes_emb(c)
        cemb = torch.where(keep[:, None], cemb, self.null_classes_emb[None].expand(len(c), -1))
        cemb = self.cemb.dense[1](swish(self.cemb.dense[0](cemb)))
        hs = [self.conv_in(x)]
        for i_level in range(self.num_resolutions):
            for i_block in range(self.num_res_blocks):
                h = self.down[i_level].block[i_block](hs[-1], temb, cemb)
                if len(self.down[i_level].attn) > 0:
                    h = self.down[i_level].attn[i_block](h)
                hs.append(h)
            if i_level != self.num_resolutions - 1:
                hs.append(self.down[i_level].downsample(hs[-1]))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb, cemb)), temb, cemb)
        for i_level in reversed(range(self.num_resolutions)):
            for i_block in range(self.num_res_blocks + 1):
                h = self.up[i_level].block[i_block](torch.cat([h, hs.pop()], dim=1), temb, cemb)
                if len(self.up[i_level].attn) > 0:
                    h = self.up[i_level].attn[i_block](h)
            if i_level != 0:
                h = self.up[i_level].upsample(h)
        return self.conv_out(swish(self.norm_out(h)))

    def forward_with_cond_scale(self, x, t, c, cond_scale):
        logits = self.forward_(x, t, c, torch.ones(len(c), dtype=torch.bool))
        if cond_scale == 0:
            return logits
        null_logits = self.forward_(x, t, c, torch.zeros(len(c), dtype=torch.bool))
        return (1 + cond_scale) * logits - cond_scale * null_logits


# ---- Tiny configurations (ch 128 is the only one the official ResnetBlock runs) ----------------------------

SMALL = {"ch": 128, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4], "dropout": 0.1,
         "resamp_with_conv": True}  # fmt: skip
OTHER = {"ch": 128, "ch_mult": [1, 1], "num_res_blocks": 2, "attn_resolutions": [8], "dropout": 0.0,
         "resamp_with_conv": False}  # fmt: skip


def reference(model: dict, *, size: int, channels: int, classes: int) -> Reference:
    return Reference(**model, in_channels=channels, out_ch=channels, resolution=size, n_classes=classes)


def ours(model: dict, *, size: int, channels: int, classes: int) -> OfficialConditionalUNet:
    return OfficialConditionalUNet(sample_size=size, in_channels=channels, out_channels=channels,
                                   num_classes=classes, **model)  # fmt: skip


def randomise(net: nn.Module, seed: int, scale: float = 0.05) -> dict:
    """Random values for every weight (GroupNorm scales and biases included), returned as a state_dict."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
        for m in net.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.add_(1.0)
    return {k: v.clone() for k, v in net.state_dict().items()}


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 2e-5) -> float:
    diff = (a - b).abs().max().item()
    assert diff <= tol * max(1.0, b.abs().max().item()), diff
    return diff


@pytest.mark.parametrize("model,channels,classes", [(SMALL, 3, 5), (OTHER, 1, 10)])
def test_network_equals_the_independent_reference(model, channels, classes):
    torch.manual_seed(0)
    ref = reference(model, size=8, channels=channels, classes=classes).eval()
    weights = randomise(ref, seed=1)
    net = ours(model, size=8, channels=channels, classes=classes).eval()
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in weights.items()}
    net.load_state_dict(weights, strict=True)
    teacher = DiffusionModel(net)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, channels, 8, 8, generator=g)
    c = torch.tensor([0, classes - 1, 2, 1])
    with torch.no_grad():
        for t in (0, 437, 999):
            tt = torch.full((4,), t)
            cond = ref.forward_(x, tt, c, torch.ones(4, dtype=torch.bool))
            null = ref.forward_(x, tt, c, torch.zeros(4, dtype=torch.bool))
            close(teacher.eps(x, t, c), cond)  # guidance 1 = cond_scale 0
            close(net(x, tt, class_labels=torch.full((4,), classes)).sample, null)  # class K: the null vector
            for guidance in (3.0, 0.5):  # the paper's cond_scale 2, and one below 1
                close(teacher.eps(x, tt, c, guidance), (1 + guidance - 1) * cond - (guidance - 1) * null)
        close(net(x, tt).sample, null)  # no labels: unconditional
        close(teacher.eps(x, tt, c, 3.0), ref.forward_with_cond_scale(x, tt, c, cond_scale=2.0))
        assert torch.equal(ref.forward_with_cond_scale(x, tt, c, cond_scale=0.0), cond)
        # A mixed batch: some rows conditional, some null, at different times.
        keep = torch.tensor([True, False, True, False])
        tt = torch.tensor([5, 900, 300, 42])
        mixed = torch.where(keep, c, torch.full_like(c, classes))
        close(net(x, tt, class_labels=mixed).sample, ref.forward_(x, tt, c, keep))


def test_training_mode_dropout_and_gradients_reach_the_null_vector():
    net = ours(SMALL, size=8, channels=3, classes=5).train()
    x = torch.randn(2, 3, 8, 8)
    out = net(x, torch.tensor([3, 700]), class_labels=torch.tensor([5, 5])).sample
    out.square().sum().backward()
    assert net.null_classes_emb.grad.abs().sum() > 0 and net.classes_emb.weight.grad.abs().sum() == 0
    assert net.down[0].block[0].dropout.p == 0.1
    torch.manual_seed(0)
    a = net(x, 3, class_labels=torch.tensor([0, 1])).sample
    torch.manual_seed(1)
    assert not torch.equal(a, net(x, 3, class_labels=torch.tensor([0, 1])).sample)  # dropout acts in train()


def test_diffusers_format_round_trip(tmp_path):
    torch.manual_seed(0)
    net = ours(OTHER, size=8, channels=1, classes=10).eval()
    net.save_pretrained(tmp_path / "unet", safe_serialization=True)
    assert sorted(p.name for p in (tmp_path / "unet").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"]  # fmt: skip
    cfg = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert cfg["_class_name"] == "OfficialConditionalUNet" and cfg["ch_mult"] == [1, 1]
    again = load_unet(tmp_path / "unet")
    assert type(again) is OfficialConditionalUNet
    assert {k: v for k, v in again.config.items() if k != "_name_or_path"} == dict(net.config)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in net.state_dict().items())
    assert num_classes_of(again) == 10
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(net(x, 10, class_labels=torch.tensor([1, 10])).sample,
                       again.eval()(x, 10, class_labels=torch.tensor([1, 10])).sample)  # fmt: skip
    DiffusionModel(net).save(tmp_path / "teacher")
    teacher = load_teacher(tmp_path / "teacher")
    assert type(teacher.unet) is OfficialConditionalUNet and teacher.image_shape == (1, 8, 8)


def test_paper_preset_teacher_is_the_official_network():
    recipe = get_preset("paper").teacher
    assert recipe.backbone == "official-ddpm"
    unet = build_unet(recipe, image_size=32, channels=3, num_classes=10)
    assert isinstance(unet, OfficialConditionalUNet)
    c = unet.config
    assert (c.ch, tuple(c.ch_mult), c.num_res_blocks, tuple(c.attn_resolutions), c.dropout, c.resamp_with_conv) == (
        128, (1, 2, 2, 2), 2, (16,), 0.1, True)  # fmt: skip  # cifar10_train.yml
    assert sum(p.numel() for p in unet.parameters()) == 38_632_323  # the official Conditional_Model's count
    # A size that does not halve three times drops levels, as for the diffusers backbone (28 -> 14 -> 7).
    assert tuple(build_unet(recipe, image_size=28, channels=1, num_classes=10).config.ch_mult) == (1, 2, 2)
    for name in ("default", "smoke"):
        assert get_preset(name).teacher.backbone == "diffusers-unet2d"


def test_esd_and_retrain_see_the_official_names():
    net = ours(SMALL, size=8, channels=1, classes=10)
    names = [n for n, _ in net.named_parameters()]
    x = {n for n in names if esd.trainable(n, "esd-x")}
    u = {n for n in names if esd.trainable(n, "esd-u")}
    assert x == {n for n in names if n.split(".")[0] in ("classes_emb", "null_classes_emb", "cemb")
                 or ".temb_cemb_proj." in n}  # fmt: skip
    assert set(names) - x - u == {n for n in names if n.split(".")[0] in ("temb", "norm_out", "conv_out")}
    fresh = type(net).from_config(net.config)  # methods/retrain.py: the teacher's class, fresh weights
    assert type(fresh) is OfficialConditionalUNet and dict(fresh.config) == dict(net.config)


# ---- bench import-teacher ------------------------------------------------------------------------------------

TRAIN_YML = {
    "data": {"dataset": "CIFAR10", "image_size": 16, "channels": 1, "random_flip": True, "rescaled": True,
             "n_classes": 10},
    "model": {"type": "simple", "in_channels": 1, "out_ch": 1, "ch": 128, "ch_mult": [1, 1], "num_res_blocks": 1,
              "attn_resolutions": [8], "dropout": 0.1, "var_type": "fixedlarge", "ema_rate": 0.9999, "ema": True,
              "resamp_with_conv": True, "cond_drop_prob": 0.1},
    "diffusion": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "num_diffusion_timesteps": 1000},
    "training": {"batch_size": 128, "n_iters": 800000, "snapshot_freq": 5000},
    "optim": {"weight_decay": 0.0, "optimizer": "Adam", "lr": 0.0002, "beta1": 0.9, "eps": 1e-8, "grad_clip": 1.0},
}  # fmt: skip  # configs/cifar10_train.yml at 16x16, 1 channel, tiny


def official_of(cfg: dict) -> Reference:
    m, d = cfg["model"], cfg["data"]
    return Reference(ch=m["ch"], ch_mult=m["ch_mult"], num_res_blocks=m["num_res_blocks"],
                     attn_resolutions=m["attn_resolutions"], dropout=m["dropout"], in_channels=m["in_channels"],
                     out_ch=m["out_ch"], resolution=d["image_size"], resamp_with_conv=m["resamp_with_conv"],
                     n_classes=d["n_classes"])  # fmt: skip


@pytest.fixture(scope="module")
def official_run(tmp_path_factory):
    """A run folder as the official code leaves it: ckpts/ckpt.pth beside config.yml, random weights."""
    d = tmp_path_factory.mktemp("official")
    torch.manual_seed(0)
    ref = official_of(TRAIN_YML)
    raw = randomise(ref, seed=3)
    ema = randomise(ref, seed=4)
    opt = torch.optim.Adam(ref.parameters(), lr=2e-4)
    model_sd = {f"module.{k}": v for k, v in raw.items()}  # DataParallel
    (d / "ckpts").mkdir()
    torch.save([model_sd, opt.state_dict(), 3, 15000, ema], d / "ckpts" / "ckpt.pth")  # (epoch, step)
    (d / "config.yml").write_text(yaml.safe_dump(TRAIN_YML))
    return {"dir": d, "ckpt": d / "ckpts" / "ckpt.pth", "config": d / "config.yml", "raw": raw, "ema": ema}


@pytest.fixture(scope="module")
def imported(official_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "teacher"
    argv = [
        "import-teacher",
        str(official_run["ckpt"]),
        "--config",
        str(official_run["config"]),
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    return out


def test_import_takes_the_ema_weights_and_keeps_the_raw_ones(official_run, imported):
    teacher = load_sampler(imported)
    assert isinstance(teacher, DiffusionModel) and type(teacher.unet) is OfficialConditionalUNet
    assert teacher.image_shape == (1, 16, 16) and teacher.num_classes == 10
    sd = teacher.unet.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in official_run["ema"].items())
    raw = load_sampler(imported / "raw").unet.state_dict()
    assert all(torch.equal(raw[k], v) for k, v in official_run["raw"].items())
    record = json.loads((imported / "import.json").read_text())
    assert record["weights"] == "ema" and record["raw_weights"] == "raw/"
    assert record["checkpoint"]["step"] == 15000 and record["checkpoint"]["epoch"] == 3
    from bench.files import digests, sha256

    assert record["checkpoint"]["sha256"] == sha256(official_run["ckpt"])
    assert record["config"]["content"] == TRAIN_YML
    assert record["files"] == digests(imported, exclude=["import.json"])
    assert json.loads((imported / "scheduler" / "scheduler_config.json").read_text())["beta_end"] == 0.02
    assert not list(imported.parent.glob(".*importing*"))  # no temporary left


def test_imported_eps_equals_the_official_forward(official_run, imported):
    teacher = load_sampler(imported)
    ref = official_of(TRAIN_YML).eval()
    ref.load_state_dict(official_run["ema"])
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    c = torch.tensor([0, 9, 4])
    with torch.no_grad():
        for t, guidance in ((10, 1.0), (500, 3.0), (999, 2.0)):
            want = ref.forward_with_cond_scale(x, torch.full((3,), t), c, cond_scale=guidance - 1)
            close(teacher.eps(x, t, c, guidance), want)


def test_imported_teacher_serves_as_teacher_for_a_matching_dataset(imported, fmnist_dir, tmp_path, capsys):
    fits = {"dataset": "fashion-mnist", "image_size": 16, "channels": 1, "num_classes": 10}
    assert check_external_teacher(imported, **fits) == imported / "unet"
    assert check_external_teacher(imported / "raw", **fits) == imported / "raw" / "unet"
    teacher = load_external_teacher(imported, **fits)
    assert type(teacher.unet) is OfficialConditionalUNet
    x = teacher.sample(torch.tensor([0, 9]), [1, 2], steps=2, guidance=3.0)
    assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all()
    with pytest.raises(BenchError, match=r"is 16x16 and has 11 class embeddings.*32x32"):
        check_external_teacher(imported, **{**fits, "image_size": 32})
    with pytest.raises(BenchError, match="has 11 class embeddings.*6 class embeddings"):
        check_external_teacher(imported, **{**fits, "num_classes": 5})
    argv = ["run", "--methods", "sfd", "--preset", "smoke", "--data-dir", str(fmnist_dir.parent), "--dry-run",
            "--results", str(tmp_path / "results"), "--teacher", str(imported)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert "1 runs" in capsys.readouterr().out


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_a_checkpoint_that_needs_unpickling_is_refused_and_runs_nothing(
    official_run, tmp_path, capsys, writer
):
    marker, bad = tmp_path / "ran", tmp_path / "ckpt.pth"
    payload = [{"conv_in.weight": torch.zeros(1)}, Payload(marker), 0, 1]
    if writer == "torch":
        torch.save(payload, bad)
    else:
        bad.write_bytes(pickle.dumps(payload, protocol=2))
    argv = [
        "import-teacher",
        str(bad),
        "--config",
        str(official_run["config"]),
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "needs arbitrary unpickling" in err and "refused" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def _write_cfg(path, edit):
    cfg = json.loads(json.dumps(TRAIN_YML))
    edit(cfg)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_mismatches_name_the_key(official_run, tmp_path):
    ckpt = official_run["ckpt"]
    out = tmp_path / "out"

    def refused(edit, match, checkpoint=ckpt):
        with pytest.raises(BenchError, match=match):
            import_teacher(checkpoint, config=_write_cfg(tmp_path / "c.yml", edit), out=out)
        assert not out.exists()

    refused(lambda c: c["model"].update(ch_mult=[1, 2]), r"key `down\.1\.block\.0\.conv1\.weight` has shape")
    refused(
        lambda c: c["model"].update(attn_resolutions=[16]), r"key `down\.0\.attn\.0\.norm\.weight` is missing"
    )
    refused(
        lambda c: c["model"].update(attn_resolutions=[]),
        r"key `down\.1\.attn\.0\.norm\.weight` is in the check",
    )
    refused(lambda c: c["data"].update(n_classes=9), r"key `classes_emb\.weight` has shape \(10, 128\)")
    refused(lambda c: c["model"].pop("num_res_blocks"), r"`model\.num_res_blocks` is missing")
    refused(lambda c: c["model"].update(ch=64), r"`model\.ch` is 64")
    refused(lambda c: c["model"].update(type="bayesian"), r"`model\.type` is 'bayesian'")
    refused(lambda c: c["diffusion"].update(beta_end=0.03), r"`diffusion\.beta_end` is 0\.03")
    refused(lambda c: c["model"].update(ema=False), r"`model\.ema` is False")
    refused(lambda c: c["model"].update(ch_mult="1,2"), r"`model\.ch_mult` is '1,2'")
    # Several networks in one file (an SFD distillation checkpoint) are not a teacher.
    sd = {f"module.{k}": v for k, v in official_run["raw"].items()}
    torch.save([sd, {}, sd, {}, 7, official_run["ema"]], tmp_path / "sfd.pth")
    refused(lambda c: None, "several networks", checkpoint=tmp_path / "sfd.pth")
    # A checkpoint with a key of another network.
    torch.save(
        [{**sd, "module.logvar": torch.zeros(1000)}, {}, 7, official_run["ema"]], tmp_path / "extra.pth"
    )
    refused(
        lambda c: None, r"raw weights .* key `logvar` is in the checkpoint", checkpoint=tmp_path / "extra.pth"
    )
    # An existing folder is not overwritten.
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(BenchError, match="exists and is not an empty folder"):
        import_teacher(ckpt, config=official_run["config"], out=out)


def test_checkpoint_without_ema_imports_its_raw_weights(official_run, tmp_path):
    torch.save([{f"module.{k}": v for k, v in official_run["raw"].items()}, {}, 99], tmp_path / "noema.pth")
    cfg = _write_cfg(tmp_path / "c.yml", lambda c: c["model"].update(ema=False))
    record = import_teacher(tmp_path / "noema.pth", config=cfg, out=tmp_path / "out")
    assert record["weights"].startswith("raw") and not (tmp_path / "out" / "raw").exists()
    sd = load_sampler(tmp_path / "out").unet.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in official_run["raw"].items())


# ---- Every method on the official network, unchanged ----------------------------------------------------------

TINY_NET = {"ch": 128, "ch_mult": [1, 1], "num_res_blocks": 1, "attn_resolutions": [4], "dropout": 0.1,
            "resamp_with_conv": True}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", [m for m in METHODS.names() if METHODS.get(m).tier != "text"])
def test_every_method_runs_on_the_official_network(name, tmp_path, fmnist_dir, monkeypatch):
    """Each method's smoke config on a tiny official teacher: it runs, trains (except `original`), leaves the
    teacher untouched, returns the same backbone, and saves and reloads to the same samples."""
    monkeypatch.setenv("BENCH_MODEL_DIR", str(tmp_path / "store"))
    cls = METHODS.get(name)
    ctx = tiny_context(tmp_path / "run", fmnist_dir.parent, requires=cls.requires)
    torch.manual_seed(0)
    teacher = DiffusionModel(ours(TINY_NET, size=8, channels=1, classes=10).eval())
    before = {k: v.clone() for k, v in teacher.unet.state_dict().items()}
    model = cls(resolve_config(cls, "smoke", {})).unlearn(teacher, ctx.forget_set, ctx)
    assert type(model.unet) is OfficialConditionalUNet
    assert all(torch.equal(v, teacher.unet.state_dict()[k]) for k, v in before.items())
    assert same_weights(model.unet, teacher.unet) == (name == "original")
    model.save(tmp_path / "saved")
    again = load_sampler(tmp_path / "saved")
    labels, seeds = torch.tensor([0, 5]), [11, 12]
    a = model.sample(labels, seeds, steps=2, guidance=2.0)
    assert torch.equal(a, again.sample(labels, seeds, steps=2, guidance=2.0)) and a.shape == (2, 1, 8, 8)


def test_a_run_with_dropout_resumes_to_the_same_weights(tmp_path, fmnist_dir):
    """UNet dropout draws from torch's global generator: state dumps keep it, so resuming is still bit-exact."""
    from bench.sampling import DiffusionModel
    from methods.finetune import Finetune, FinetuneConfig
    from tests.helpers import Killed, kill_after_saves, same_weights, tiny_context

    def teacher():
        torch.manual_seed(0)
        net = ours({**SMALL, "ch_mult": [1]}, size=8, channels=1, classes=10)
        net.load_state_dict(randomise(net, 0))
        return DiffusionModel(net.eval())

    cfg = FinetuneConfig(iterations=4, batch_size=4)

    def run(folder, kill=None):
        ctx = tiny_context(folder, fmnist_dir.parent, requires={"retain"}, checkpoint_every=1)
        if kill:
            kill_after_saves(ctx, kill)
        torch.manual_seed(1)  # the runner seeds the global generator before unlearning
        return Finetune(cfg).unlearn(teacher(), ctx.forget_set, ctx)

    full = run(tmp_path / "full")
    with pytest.raises(Killed):
        run(tmp_path / "killed", kill=2)
    torch.manual_seed(123)  # whatever the new process's generator holds
    resumed = run(tmp_path / "killed")
    assert same_weights(full.unet, resumed.unet)
