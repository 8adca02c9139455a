"""Paired tests between methods, from the per-image outcomes each run keeps (outcomes.safetensors).

The evaluation grid draws image i of class c from the same seeded noise in every method, so two runs of one
(dataset, forget set, preset, seed) sampled under one condition pair image by image, and runs with several seeds
pool their pairs. Per metric, the test its evaluator named: the exact McNemar test for a rate (accuracy, to_anchor), the Wilcoxon signed-rank test
for a mean over images (prob, entropy, CLIP score), and a paired bootstrap for a Frechet distance (both runs'
replicates come from the same resampled image indices; over seeds, the mean of the per-seed differences). Pairs are
tested as they are, without a correction for the number of comparisons.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from bench import stats, store
from bench.errors import BenchError

log = logging.getLogger(__name__)

ALPHA = 0.05
GROUP = ["dataset", "forget_set", "preset", "condition"]
COLUMNS = [*GROUP, "metric", "method_a", "method_b", "test", "statistic", "p_value", "significant", "n_pairs",
           "seeds", "difference"]  # fmt: skip

Outcomes = dict[str, dict[str, tuple[np.ndarray, str]]]  # run_id -> metric[subset] -> (values, test)


def load_outcomes(run_ids, run_dirs: dict[str, Path], *, strict: bool = False) -> Outcomes:
    """Each finished run's checked outcomes; a broken file is named and its run left out of the tests (or raises
    if strict); runs made before outcomes existed have none."""
    found = {}
    for rid in run_ids:
        d = run_dirs.get(rid)
        if d is None:
            continue
        try:
            found[rid] = store.read_outcomes(d)
        except BenchError as e:
            if strict:
                raise
            log.warning("no paired tests for run %s: %s", rid, e)
    return found


def _runs(part: pd.DataFrame) -> dict[str, dict[int, tuple]]:
    """method -> seed -> its row (the first run where two share a seed)."""
    out: dict[str, dict[int, tuple]] = {}
    for row in part.itertuples(index=False):
        out.setdefault(row.method, {}).setdefault(int(row.seed), row)
    return out


def compare(a: dict[int, tuple], b: dict[int, tuple], key: str, outcomes: Outcomes) -> tuple | None:
    """(PairedTest, seeds) of method a against b on one metric, over the seeds where both runs have outcomes of
    the same test, length, sample count and evaluator version; None where there are none."""
    pairs = []
    for seed in sorted(set(a) & set(b)):
        ra, rb = a[seed], b[seed]
        oa, ob = outcomes.get(ra.run_id, {}).get(key), outcomes.get(rb.run_id, {}).get(key)
        # the same test on as many values from as many samples (a bootstrap pairs only equal resampled indices)
        if oa is None or ob is None or oa[1] != ob[1] or len(oa[0]) != len(ob[0]) or int(ra.n) != int(rb.n):
            continue
        if str(getattr(ra, "evaluator_version", "")) != str(getattr(rb, "evaluator_version", "")):
            continue
        pairs.append((ra, rb, oa[0], ob[0], oa[1]))
    tests = {p[4] for p in pairs}
    if not pairs or len(tests) > 1:
        return None
    (test,) = tests
    if test == stats.BOOTSTRAP:
        difference = float(np.mean([p[0].value - p[1].value for p in pairs]))
        replicates = np.mean([p[2] - p[3] for p in pairs], axis=0)
        result = stats.paired_bootstrap(difference, replicates, sum(int(p[0].n) for p in pairs))
    elif per_image := {stats.MCNEMAR: stats.mcnemar_exact, stats.WILCOXON: stats.wilcoxon_signed_rank}.get(
        test
    ):
        result = per_image(np.concatenate([p[2] for p in pairs]), np.concatenate([p[3] for p in pairs]))
    else:
        return None
    return result, len(pairs)


def pairwise(df: pd.DataFrame, outcomes: Outcomes) -> pd.DataFrame:
    """Every pair of methods on every metric with outcomes, per (dataset, forget set, preset, condition): the test, its
    statistic and p-value, whether p < ALPHA, the pairs (images, or samples per run for the bootstrap), the seeds
    pooled, and the difference a - b (of the means, or of the distances)."""
    from bench.report.tables import method_order, metric_key, with_condition

    if df.empty or not outcomes:
        return pd.DataFrame(columns=COLUMNS)
    df = with_condition(df).assign(column=metric_key(df))
    records = []
    for keys, part in df.groupby([*GROUP, "column"], sort=False):
        *group, column = keys
        key = store.outcome_key(column, group[GROUP.index("condition")])
        if not any(key in outcomes.get(rid, {}) for rid in part["run_id"]):
            continue
        runs = _runs(part)
        methods = method_order(runs)
        for i, ma in enumerate(methods):
            for mb in methods[i + 1 :]:
                found = compare(runs[ma], runs[mb], key, outcomes)
                if found is None:
                    continue
                r, seeds = found
                records.append([*group, column, ma, mb, r.test, r.statistic, r.p_value, r.p_value < ALPHA,
                                r.n_pairs, seeds, r.difference])  # fmt: skip
    return pd.DataFrame(records, columns=COLUMNS)


def lookup(tests: pd.DataFrame) -> dict[tuple, tuple]:
    """(dataset, forget set, preset, condition, metric, method, method) -> its test row, both ways round."""
    out = {}
    for row in tests.itertuples(index=False):
        g = (row.dataset, row.forget_set, row.preset, row.condition, row.metric)
        out[(*g, row.method_a, row.method_b)] = out[(*g, row.method_b, row.method_a)] = row
    return out
