"""Intervals and paired tests, as pure functions: what the evaluators attach to their values and what `bench report`
uses to say which differences between methods are significant.

- A rate over images (accuracy, to_anchor): the Wilson score interval (Wilson, 1927), which stays inside [0, 1]
  and keeps its coverage at 0/n and n/n, where the normal (Wald) interval collapses to a point.
- A mean over images (prob, entropy, CLIP score): the percentile bootstrap over the images.
- A Frechet distance: a bootstrap over the generated samples (reference statistics fixed), shifted by its bias:
  resampling with replacement repeats images, which raises a Frechet distance (see `frechet_bootstrap`).
- Across seeds: the mean with a Student-t interval over the seeds' values.
- Paired tests (image i of class c has the same noise in every method): the exact McNemar test for binary outcomes,
  the Wilcoxon signed-rank test for continuous ones, and a paired bootstrap for Frechet distances.

Every bootstrap draws its resamples from `numpy.random.default_rng(seed)` with a fixed seed, so that its result is
deterministic and two runs with the same number of samples resample the same image indices (a paired bootstrap).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np
import torch
from scipy import stats as _scipy

CONFIDENCE = 0.95
RESAMPLES = 1000  # bootstrap resamples of a mean over images and of fd_judge
SEED = 0
MCNEMAR, WILCOXON, BOOTSTRAP = "mcnemar", "wilcoxon", "bootstrap"  # the paired test an outcome vector is for


def z_score(confidence: float = CONFIDENCE) -> float:
    """The two-sided standard normal quantile: 1.96 for 95%."""
    return float(_scipy.norm.ppf((1 + confidence) / 2))


def wilson_interval(k: int, n: int, z: float | None = None) -> tuple[float, float]:
    """Wilson score interval of a proportion of k successes in n trials."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"a proportion needs 0 <= k <= n and n > 0, got k={k}, n={n}")
    z = z_score() if z is None else z
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_counts(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> Iterator[np.ndarray]:
    """For each resample with replacement of n items, how often each item is drawn (one row at a time: 45,000
    images by 1000 resamples would take 360 MB at once). The same n and seed give the same rows, so two
    methods' samples are resampled alike (image i with image i)."""
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        yield np.bincount(rng.integers(0, n, size=n), minlength=n)


def percentile_interval(replicates: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(np.asarray(replicates, dtype=float), [alpha, 1 - alpha])
    return float(lo), float(hi)


def bootstrap_mean(values, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """Means of `resamples` resamples (with replacement) of the values."""
    values = np.asarray(values, dtype=float)
    return np.array([c @ values for c in bootstrap_counts(len(values), resamples, seed)]) / len(values)


def bootstrap_mean_interval(values, resamples: int = RESAMPLES, seed: int = SEED,
                            confidence: float = CONFIDENCE) -> tuple[float, float]:  # fmt: skip
    """Percentile bootstrap interval of a mean over images (it stays inside the values' range, unlike a t-interval of
    probabilities near 0)."""
    return percentile_interval(bootstrap_mean(values, resamples, seed), confidence)


def shifted_interval(estimate: float, replicates: np.ndarray, confidence: float = CONFIDENCE,
                     floor: float | None = 0.0) -> tuple[float, float]:  # fmt: skip
    """The percentile interval of the replicates moved by their bias (their mean's excess over the estimate): the
    bootstrap's bias correction (Efron & Tibshirani 1993, section 10.6) for a statistic that resampling inflates."""
    bias = float(np.mean(replicates)) - estimate
    lo, hi = percentile_interval(replicates, confidence)
    lo, hi = lo - bias, hi - bias
    return (lo if floor is None else max(floor, lo)), hi


def t_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high): the Student-t interval of the mean of independent values (the seeds' results); NaN bounds
    for fewer than two values."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if len(v) < 2:
        return mean, math.nan, math.nan
    half = float(_scipy.t.ppf((1 + confidence) / 2, len(v) - 1)) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return mean, mean - half, mean + half


# ---- paired tests ----------------------------------------------------------------------------------------------


class PairedTest(NamedTuple):
    test: str  # MCNEMAR, WILCOXON or BOOTSTRAP
    statistic: float  # McNemar: the smaller discordant count; Wilcoxon: W; bootstrap: the observed difference
    p_value: float
    n_pairs: int  # images paired (bootstrap: samples per run)
    difference: float  # a minus b (of the means, or of the statistics)


def mcnemar_exact(a, b) -> PairedTest:
    """Exact McNemar test of paired binary outcomes: under the null, each discordant pair (one method right, the
    other wrong) goes either way with probability 1/2, so p is the two-sided binomial test of their split."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired outcomes need two vectors of one length, got {a.shape} and {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    discordant = only_a + only_b
    p = float(_scipy.binomtest(only_a, discordant, 0.5).pvalue) if discordant else 1.0
    return PairedTest(
        MCNEMAR, float(min(only_a, only_b)), p, len(a), float(a.mean() - b.mean()) if len(a) else 0.0
    )


def wilcoxon_signed_rank(a, b) -> PairedTest:
    """Wilcoxon signed-rank test of paired continuous values (scipy: two-sided, zero differences dropped, exact for
    small samples without ties, else the normal approximation)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values need two vectors of one length, got {a.shape} and {b.shape}")
    diff = float(a.mean() - b.mean()) if len(a) else 0.0
    if not np.any(a != b):
        return PairedTest(WILCOXON, 0.0, 1.0, len(a), diff)
    res = _scipy.wilcoxon(a, b, zero_method="wilcox", alternative="two-sided")
    return PairedTest(WILCOXON, float(res.statistic), float(res.pvalue), len(a), diff)


def paired_bootstrap(difference: float, replicates: np.ndarray, n_pairs: int) -> PairedTest:
    """Two-sided bootstrap test that a difference of statistics is 0, from the differences of the two methods'
    replicates on the same resampled indices, moved by their bias (as `shifted_interval`): p is twice the smaller
    share of them on either side of 0 (with the usual +1, so never 0)."""
    d = np.asarray(replicates, dtype=float)
    d = d - d.mean() + difference
    tail = min(int((d <= 0).sum()), int((d >= 0).sum()))
    return PairedTest(BOOTSTRAP, difference, min(1.0, 2 * (tail + 1) / (len(d) + 1)), n_pairs, difference)


# ---- Frechet distance ------------------------------------------------------------------------------------------


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(m)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_bootstrap(mu_real, cov_real, fake, counts: Iterable[np.ndarray], *, device="cpu") -> np.ndarray:
    """Frechet distances between fixed reference statistics (mean, covariance) and the generated features (m, d)
    weighted by each of `counts` (bootstrap_counts; a vector of ones gives the distance itself).

    Each is |mu_r - mu|^2 + tr S_r + tr S - 2 tr sqrt(S_r S), with tr sqrt(S_r S) the sum of the square roots of the
    eigenvalues of R S R (R = S_r^(1/2), symmetric), the weighted covariance of the rows of F R. With fewer
    samples than features (Inception's 2048), S lives in the k <= m dimensional span of the samples, and the
    eigenproblem is solved there: R = (V^T S_r V)^(1/2) in an orthonormal basis V of that span gives the same
    nonzero spectrum.
    """
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float64, device=device)
    mu_r = torch.as_tensor(np.asarray(mu_real), dtype=torch.float64, device=device)
    cov_r = torch.as_tensor(np.asarray(cov_real), dtype=torch.float64, device=device)
    m, d = f.shape
    if m < d:  # the span of the samples (every weighted mean and covariance lies in it)
        _, s, vh = torch.linalg.svd(f, full_matrices=False)
        basis = vh[s > s.max() * 1e-10].T
        fb, root = f @ basis, _psd_sqrt(basis.T @ cov_r @ basis)
    else:
        fb, root = f, _psd_sqrt(cov_r)
    # R S R is the weighted covariance of the rows of F R: no product with R per resample. Covariances are shift
    # invariant, so they are computed from centred rows (no cancellation in E[xx^T] - E[x]E[x]^T).
    g = fb @ root
    g, fc = g - g.mean(0), f - f.mean(0)
    norms = fc.square().sum(1)
    trace_r = cov_r.trace()
    out, rows = [], iter(counts)
    while chunk := list(itertools.islice(rows, 64)):  # batched eigenvalues, in bounded memory
        c = torch.as_tensor(np.stack(chunk), dtype=torch.float64, device=device)  # (b, m)
        mean, centred, gm = c @ f / m, c @ fc / m, c @ g / m
        second = torch.stack([(g.T * ci) @ g for ci in c])
        eig = torch.linalg.eigvalsh((second - m * gm[:, :, None] * gm[:, None, :]) / (m - 1)).clamp_min(0)
        trace = (c @ norms - m * centred.square().sum(1)) / (m - 1)
        out.append((mean - mu_r).square().sum(1) + trace_r + trace - 2 * eig.sqrt().sum(1))
    return torch.cat(out).cpu().numpy() if out else np.zeros(0)
