"""Frechet distance in the judge's feature space (`fd_judge`), between generated and real retained-class images,
and real Inception FID (`fid_inception`) when the FID Inception-v3 weights are on disk.

fd_judge is not Inception FID and is never reported under that name: the judge is trained on this dataset, so the
distance is comparable across methods on one dataset and preset, not with published FIDs. fid_inception is
torch-fidelity's FID (its Inception-v3 feature extractor with TF1-compatible resizing to 299x299, and its
Frechet distance, computed in sample space when there are fewer images than features) between the generations
and the real images of the retained classes (the test split, or at the paper preset the train split, as the papers
compare with every training image of the remaining classes), both at the run's resolution (grayscale repeated to
RGB). The reference features of a split are computed once per weights file and resolution and cached
(models.store.cache_dir()); the statistics of any forget set's retained classes come from them.

Each distance carries a 95% bootstrap interval over the generated samples (bench.stats.frechet_bootstrap): the
generated features are resampled with replacement (fd_judge 1000 times, fid_inception 200: its 2048-d
statistics cost far more per resample), the reference statistics stay fixed, and the percentile interval is moved
by the resampling's bias. The replicates are the outcomes of the report's paired bootstrap test: a fixed seed makes
two runs with as many samples resample the same image indices.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from tqdm.auto import tqdm

from bench import stats
from bench.api import EvalContext, Evaluator, Measurement, Metric, SampleSet
from bench.errors import BenchError
from bench.models.store import cache_dir
from bench.registry import EVALUATORS

log = logging.getLogger(__name__)

FD_JUDGE = Metric("fd_judge", "retain", higher_is_better=False)
FID_INCEPTION = Metric("fid_inception", "retain", higher_is_better=False)
# torch-fidelity's / torchmetrics' file name, then pytorch-fid's: the same 566 tensors of the same network.
HUB_NAMES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
FD_RESAMPLES = stats.RESAMPLES
FID_RESAMPLES = 200


class JudgeFeatures(nn.Module):
    """torchmetrics feature extractor: the judge's penultimate features of images in [-1, 1]."""

    def __init__(self, judge: nn.Module):
        super().__init__()
        self.judge = judge
        self.num_features = judge.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.judge.forward_features(x.float())


def frechet_distance(
    judge: nn.Module, real: torch.Tensor, fake: torch.Tensor, *, device, batch_size: int = 1000
) -> float:
    """FID formula (torchmetrics) on judge features; images are float tensors in [-1, 1]."""
    return float(_judge_fid(judge, real, fake, device=device, batch_size=batch_size).compute())


def _judge_fid(judge: nn.Module, real: torch.Tensor, fake: torch.Tensor, *, device,
               batch_size: int = 1000) -> FrechetInceptionDistance:  # fmt: skip
    """torchmetrics' FID state after seeing both image sets, checked finite."""
    check_finite_images(fake, "generated images")
    judge.eval()
    fid = FrechetInceptionDistance(feature=JudgeFeatures(judge), reset_real_features=True).to(device)
    with torch.no_grad():
        for imgs, is_real in ((real, True), (fake, False)):
            for i in range(0, len(imgs), batch_size):
                fid.update(imgs[i : i + batch_size].to(device), real=is_real)
    # torchmetrics' eigvals segfaults (MKL) on a matrix with NaN: check the features' sums before any linear algebra.
    for which in ("real", "fake"):
        sums = (getattr(fid, f"{which}_features_sum"), getattr(fid, f"{which}_features_cov_sum"))
        if not all(bool(torch.isfinite(t).all()) for t in sums):
            raise BenchError(non_finite(f"judge features of the {which} images", "the judge"))
    return fid


def real_statistics(fid: FrechetInceptionDistance) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference mean and covariance as torchmetrics computes them from its running sums (float64)."""
    n = fid.real_features_num_samples.double()
    mean = fid.real_features_sum.double() / n
    cov = (fid.real_features_cov_sum.double() - n * torch.outer(mean, mean)) / (n - 1)
    return mean.cpu(), cov.cpu()


@torch.no_grad()
def judge_features(judge: nn.Module, images: torch.Tensor, *, device, batch_size: int = 1000) -> np.ndarray:
    """The judge's penultimate features (float64) of images in [-1, 1]."""
    feats = JudgeFeatures(judge.eval()).to(device)
    return torch.cat([feats(images[i : i + batch_size].to(device)).double().cpu()
                      for i in range(0, len(images), batch_size)]).numpy()  # fmt: skip


def bootstrapped(
    metric: Metric, value: float, real: tuple, fake: np.ndarray, resamples: int, device
) -> Measurement:
    """A Frechet distance with its bias-shifted bootstrap interval over the generated samples and the replicates."""
    reps = stats.frechet_bootstrap(*real, fake, stats.bootstrap_counts(len(fake), resamples), device=device)
    return Measurement(metric, value, len(fake), ci=stats.shifted_interval(value, reps),
                       ci_method=f"bootstrap-{resamples}-shifted", outcomes=reps, test=stats.BOOTSTRAP)  # fmt: skip


def non_finite(what: str, network: str) -> str:
    """The message for NaN or inf in features that a Frechet distance needs finite."""
    return f"non-finite {what} (NaN or inf) from finite images: {network} is broken; check its weights file"


def check_finite_images(images: torch.Tensor, what: str) -> None:
    """A BenchError when generated images hold NaN or inf (a diverged method), before any linear algebra."""
    bad = int((~torch.isfinite(images.flatten(1)).all(1)).sum())
    if bad:
        raise BenchError(
            f"the model produced non-finite images (NaN or inf in {bad} of {len(images)} {what}): the method "
            "diverged; see the run's train_log.jsonl for its losses, and lower its learning rate or change its "
            "config (--set METHOD.NAME=VALUE)"
        )


def hub_inception_file() -> Path | None:
    """The FID Inception weights in the torch hub cache ($TORCH_HOME/hub/checkpoints), if they are there."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    return next((folder / n for n in HUB_NAMES if (folder / n).is_file()), None)


@lru_cache(maxsize=2)
def _load_inception(
    path: str, stamp: tuple[int, int]
) -> tuple[nn.Module, str]:  # stamp: size, mtime (cache key)
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    wrong = (
        f"--inception-weights {path} is not the FID Inception-v3 state dict ({HUB_NAMES[0]} of torch-fidelity, "
        f"or pytorch-fid's {HUB_NAMES[1]})"
    )
    # The file is read once: its digest and its tensors come from the same bytes (a file swapped meanwhile changes
    # neither), and they are unpickled only as plain tensors.
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as e:
        raise BenchError(f"--inception-weights {path}: no such file") from e
    except OSError as e:
        raise BenchError(f"--inception-weights {path}: cannot read it ({e.strerror or e})") from e
    digest = hashlib.sha256(data).hexdigest()[:16]
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise BenchError(f"{wrong}: it does not load as a plain state dict ({e})") from e
    del data
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise BenchError(f"{wrong}: it holds a {type(state).__name__}, not a state dict of tensors")
    # torch-fidelity's constructor always loads weights itself, unpickling them with weights_only=False from the
    # path it is given (or downloading them when given none). It is never given the user's path: it gets the checked
    # tensors, serialised by us in memory, and load_state_dicts them (strictly).
    buffer = io.BytesIO()
    torch.save(state, buffer)
    del state
    buffer.seek(0)
    try:
        net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=buffer
        )
    except RuntimeError as e:  # its strict load_state_dict: missing or unexpected keys, shape mismatches
        first = str(e).splitlines()[1:3]
        raise BenchError(f"{wrong}: a different architecture ({' '.join(s.strip() for s in first)})") from e
    return net.eval(), digest


def load_inception(path: str | Path) -> tuple[nn.Module, str]:
    """torch-fidelity's Inception-v3 feature extractor with these weights and their digest (cached per process)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise BenchError(f"--inception-weights {p}: no such file") from e
    return _load_inception(str(p), (st.st_size, st.st_mtime_ns))


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8 (N, 3, H, W), grayscale repeated to three channels."""
    x = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


@torch.no_grad()
def inception_features(net: nn.Module, images: torch.Tensor, *, device, batch_size: int = 64) -> np.ndarray:
    """2048-d pool features (float64) of float images in [-1, 1]."""
    net.to(device)
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="inception", unit="batch", mininterval=2,
                  disable=len(images) < 2000):  # fmt: skip
        (feats,) = net(to_uint8_rgb(images[i : i + batch_size]).to(device))
        out.append(feats.double().cpu())
    return torch.cat(out).numpy()


def reference_features(dataset, net: nn.Module, digest: str, *, device, split: str = "test"):
    """Inception features and labels of a whole split of the dataset, cached per dataset, split, resolution and
    weights (the statistics of any forget set's retained classes come from them)."""
    x, y = dataset.images(split)
    h = hashlib.sha256(digest.encode())
    h.update(to_uint8_rgb(x).numpy().tobytes())
    h.update(y.numpy().tobytes())
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in dataset.name)
    path = cache_dir() / "fid_inception" / f"{slug}-{dataset.image_size}px-{split}-{h.hexdigest()[:16]}.npz"
    if path.is_file():
        try:
            with np.load(path) as f:
                return f["features"], f["labels"]
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is recomputed
    log.info(
        "fid: Inception features of the %d real %s images of %s (cached in %s)",
        len(x),
        split,
        dataset.name,
        path,
    )
    feats = inception_features(net, x, device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, features=feats, labels=y.numpy())
    os.replace(tmp, path)
    return feats, y.numpy()


def frechet_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    """torch-fidelity's FID of two feature sets (N, d) and (M, d).

    With fewer samples than dimensions (the usual case here: hundreds of images, d = 2048) the covariances have
    low rank, and torch-fidelity's eigvals of the 2048x2048 product (seconds, and complex round-off) is replaced
    by its exact sample-space form: for S1 = A^T A and S2 = B^T B (centred features / sqrt(n - 1)),
    tr sqrtm(S1 S2) is the nuclear norm of B A^T.
    """
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    for which, f in (("real", real), ("generated", fake)):
        if not np.isfinite(f).all():
            raise BenchError(non_finite(f"Inception features of the {which} images", "the Inception network"))
    n, m, d = len(real), len(fake), real.shape[1]
    if min(n, m) > d:
        stats = [fid_features_to_statistics(torch.from_numpy(f)) for f in (real, fake)]
        return float(fid_statistics_to_metric(*stats, verbose=False)[KEY_METRIC_FID])
    a = (real - real.mean(0)) / np.sqrt(n - 1)
    b = (fake - fake.mean(0)) / np.sqrt(m - 1)
    diff = real.mean(0) - fake.mean(0)
    nuclear = np.linalg.svd(b @ a.T, compute_uv=False).sum()
    return float(diff @ diff + (a * a).sum() + (b * b).sum() - 2 * nuclear)


def fid_inception(dataset, classes: tuple[int, ...], fake: torch.Tensor, weights: str, *, device,
                  split: str = "test") -> float:  # fmt: skip
    """FID between `fake` and the real `split` images of `classes` (Inception features by torch-fidelity)."""
    return frechet_from_features(*inception_pair(dataset, classes, fake, weights, device=device, split=split))


def inception_pair(dataset, classes: tuple[int, ...], fake: torch.Tensor, weights: str, *, device,
                   split: str = "test") -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Inception features of the real `split` images of `classes` (cached) and of `fake`."""
    check_finite_images(fake, "generated images")
    net, digest = load_inception(weights)
    real, labels = reference_features(dataset, net, digest, device=device, split=split)
    real = real[np.isin(labels, classes)]
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(
            "fid_inception needs at least two generated and two real images of the retained classes"
        )
    return real, inception_features(net, fake, device=device)


@EVALUATORS.register("fid")
class FID(Evaluator):
    """fd_judge on the retained classes: generations conditioned on them vs the real images of them (the test
    split, or the train split as the papers use at the paper preset: --fid-reference); and fid_inception on the
    same images when Inception weights are given (--inception-weights or the hub cache). Each row names its
    reference and how many real images it holds (`reference`, `reference_n`)."""

    name = "fid"
    version = "2"  # 2: bootstrap intervals and replicates
    metrics = (FD_JUDGE, FID_INCEPTION)

    @classmethod
    def resolve_options(cls, given, tier="class"):
        reference = {"fid_reference": given["fid_reference"]} if given.get("fid_reference") else {}
        path = given.get("inception_weights") or hub_inception_file()
        if not path:
            log.info(
                "fid: no Inception-v3 weights (--inception-weights PATH, or %s in %s): reporting only fd_judge, the "
                "Frechet distance in the judge's features, not comparable with published FIDs",
                HUB_NAMES[0], Path(torch.hub.get_dir()) / "checkpoints",
            )  # fmt: skip
            return reference
        path = Path(path).expanduser().resolve()
        load_inception(path)  # a wrong file fails here, before any run starts
        return {"inception_weights": str(path), **reference}

    @staticmethod
    def reference_split(ctx: EvalContext) -> str:
        return ctx.options.get("fid_reference", "test")

    def row_fields(self, ctx: EvalContext) -> dict:
        split = self.reference_split(ctx)
        n = len(ctx.dataset.images(split, ctx.forget_set.retain)[1])
        return {"reference": f"{split} split, retained classes", "reference_n": n}

    def __call__(self, samples: SampleSet, ctx: EvalContext):
        samples = samples.of_kind()  # the text tier: the training prompts' images
        retain = ctx.forget_set.retain
        keep = torch.isin(samples.labels, torch.tensor(retain))
        split = self.reference_split(ctx)
        real, _ = ctx.dataset.images(split, retain)
        fake = samples.images[keep]
        check_finite_images(fake, "generated images of the retained classes")
        if len(fake) < 2 or len(real) < 2:
            raise ValueError(
                "fd_judge needs at least two generated and two real images of the retained classes"
            )
        fid = _judge_fid(ctx.judge, real, fake, device=ctx.device)
        features = judge_features(ctx.judge, fake, device=ctx.device)
        rows = [bootstrapped(FD_JUDGE, float(fid.compute()), real_statistics(fid), features, FD_RESAMPLES,
                             ctx.device)]  # fmt: skip
        weights = ctx.options.get("inception_weights")
        if weights:
            ref, gen = inception_pair(ctx.dataset, retain, fake, weights, device=ctx.device, split=split)
            reference = (ref.mean(0), np.cov(ref, rowvar=False))
            rows.append(bootstrapped(FID_INCEPTION, frechet_from_features(ref, gen), reference, gen, FID_RESAMPLES,
                                     ctx.device))  # fmt: skip
        return rows
