"""bench.stats on hand-made values whose intervals and p-values are known (published tables, closed forms, or
scipy's own implementations)."""

import math

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from bench import stats
from evaluators.fid import frechet_from_features


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        (81, 263, 0.2553, 0.3662),  # Newcombe (1998), Stat. Med. 17:857, Table II, method 3 (Wilson)
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0000, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_matches_newcombes_table(k, n, low, high):
    lo, hi = stats.wilson_interval(k, n)
    assert (round(lo, 4), round(hi, 4)) == (low, high)


@pytest.mark.parametrize(("k", "n"), [(0, 100), (50, 100), (100, 100), (85, 100), (3, 7)])
def test_wilson_matches_scipy_and_its_closed_forms(k, n):
    lo, hi = stats.wilson_interval(k, n)
    ref = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert (lo, hi) == pytest.approx((ref.low, ref.high), abs=1e-12)
    z2 = 1.959963984540054**2
    if k == 0:  # the closed forms at the ends: [0, z^2 / (n + z^2)] and [n / (n + z^2), 1]
        assert (lo, hi) == pytest.approx((0.0, z2 / (n + z2)))
    if k == n:
        assert (lo, hi) == pytest.approx((n / (n + z2), 1.0))
    if 2 * k == n:  # symmetric about 1/2
        assert lo + hi == pytest.approx(1.0)
    assert stats.wilson_interval(50, 100) == pytest.approx((0.40383, 0.59617), abs=1e-5)
    with pytest.raises(ValueError):
        stats.wilson_interval(1, 0)


def test_t_interval_against_the_t_table():
    mean, lo, hi = stats.t_interval([1.0, 2.0, 3.0])
    half = 4.302653 / math.sqrt(3)  # t(0.975, 2 df) = 4.303 from the table; std = 1
    assert (mean, lo, hi) == pytest.approx((2.0, 2.0 - half, 2.0 + half), rel=1e-6)
    mean, lo, hi = stats.t_interval([0.8, 0.9])
    half = 12.7062 * math.sqrt(0.005) / math.sqrt(2)  # t(0.975, 1 df) = 12.706
    assert (lo, hi) == pytest.approx((0.85 - half, 0.85 + half), rel=1e-4)
    mean, lo, hi = stats.t_interval([0.5])
    assert mean == 0.5 and math.isnan(lo) and math.isnan(hi)  # one seed: no interval over seeds


def test_bootstrap_is_seeded_and_resamples_alike():
    a = list(stats.bootstrap_counts(50, 20, seed=0))
    b = list(stats.bootstrap_counts(50, 20, seed=0))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))  # deterministic: pairs across runs
    assert all(x.sum() == 50 and x.min() >= 0 for x in a)
    assert not np.array_equal(a[0], next(stats.bootstrap_counts(50, 1, seed=1)))
    values = np.r_[np.ones(30), np.zeros(70)]
    lo, hi = stats.bootstrap_mean_interval(values)
    assert stats.bootstrap_mean_interval(values) == (lo, hi)
    # a percentile bootstrap of a proportion of 30/100 sits near the Wald interval 0.3 -+ 1.96 * 0.0458
    assert lo == pytest.approx(0.3 - 0.0898, abs=0.015) and hi == pytest.approx(0.3 + 0.0898, abs=0.015)
    assert stats.bootstrap_mean_interval(np.full(10, 0.25)) == pytest.approx((0.25, 0.25))


def test_shifted_interval_removes_the_resampling_bias():
    rng = np.random.default_rng(0)
    reps = 1.0 + 0.3 + rng.normal(0, 0.1, 1000)  # the estimate 1.0, resampling adds 0.3
    lo, hi = stats.shifted_interval(1.0, reps)
    assert lo == pytest.approx(1.0 - 0.196, abs=0.02) and hi == pytest.approx(1.0 + 0.196, abs=0.02)
    assert stats.shifted_interval(0.05, 0.3 + rng.normal(0, 0.1, 1000))[0] == 0.0  # a distance is >= 0


def test_mcnemar_exact_on_a_hand_made_table():
    # 2x2 table: both right 40, only a right 1, only b right 9, both wrong 50
    a = np.r_[np.ones(40), np.ones(1), np.zeros(9), np.zeros(50)].astype(bool)
    b = np.r_[np.ones(40), np.zeros(1), np.ones(9), np.zeros(50)].astype(bool)
    r = stats.mcnemar_exact(a, b)
    # two-sided binomial of 1 of 10 discordant pairs: 2 * (C(10,0) + C(10,1)) / 2^10
    assert r.p_value == pytest.approx(22 / 1024) and r.statistic == 1 and r.n_pairs == 100
    assert r.difference == pytest.approx(-0.08)
    r = stats.mcnemar_exact(a[::-1], b[::-1])
    assert r.p_value == pytest.approx(22 / 1024)
    # 3 against 5: 2 * (1 + 8 + 28 + 56) / 256
    a = np.r_[np.ones(3), np.zeros(5), np.ones(10)].astype(bool)
    b = np.r_[np.zeros(3), np.ones(5), np.ones(10)].astype(bool)
    assert stats.mcnemar_exact(a, b).p_value == pytest.approx(186 / 256)
    assert stats.mcnemar_exact(a, a).p_value == 1.0  # no discordant pair
    with pytest.raises(ValueError):
        stats.mcnemar_exact(a, a[:-1])


def test_wilcoxon_signed_rank_exact_small_sample():
    a = np.arange(1.0, 11.0)
    b = a - np.linspace(0.1, 1.0, 10)  # ten positive, distinct differences: W = 0, p = 2 / 2^10
    r = stats.wilcoxon_signed_rank(a, b)
    assert r.statistic == 0 and r.p_value == pytest.approx(2 / 1024) and r.difference == pytest.approx(0.55)
    assert stats.wilcoxon_signed_rank(a, a).p_value == 1.0


def test_paired_bootstrap_test():
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.05, 1000)
    far = stats.paired_bootstrap(0.5, 0.5 + 0.1 + noise, n_pairs=900)  # its bias does not matter
    assert far.p_value == pytest.approx(2 / 1001) and far.statistic == 0.5 and far.n_pairs == 900
    near = stats.paired_bootstrap(0.02, 0.02 + noise, n_pairs=900)  # 0.4 standard errors
    assert 0.5 < near.p_value < 0.9


def test_frechet_bootstrap_is_the_frechet_distance_of_the_resampled_images():
    rng = np.random.default_rng(0)
    for n, m, d in ((300, 80, 16), (40, 12, 64)):  # more samples than features, and fewer (the span)
        real, fake = rng.normal(size=(n, d)), rng.normal(0.2, 1.2, size=(m, d))
        mu, cov = real.mean(0), np.cov(real, rowvar=False)
        counts = list(stats.bootstrap_counts(m, 5, seed=3))
        reps = stats.frechet_bootstrap(mu, cov, fake, [np.ones(m), *counts])
        assert reps[0] == pytest.approx(frechet_from_features(real, fake), rel=1e-8)
        for c, rep in zip(counts, reps[1:], strict=True):
            assert rep == pytest.approx(frechet_from_features(real, np.repeat(fake, c, axis=0)), rel=1e-7)
    # torch in, the same numbers out
    (same,) = stats.frechet_bootstrap(torch.tensor(mu), torch.tensor(cov), torch.tensor(fake), [np.ones(m)])
    assert same == pytest.approx(reps[0], rel=1e-8)
