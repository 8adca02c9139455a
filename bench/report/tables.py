"""Result tables from tidy metric rows, written as CSV, Markdown and booktabs LaTeX: each cell is the mean over seeds
with its 95% interval in brackets (one seed: the run's own interval; several: Student-t over the seeds), and
the best method of a column is bold with every method a paired test does not tell apart from it at 5%."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from bench import stats
from bench.report import paired
from bench.store import atomic_write_text

ORIGINAL = "original"  # the untouched teacher: the first row, the reference every method is read against
REFERENCE = "sfd"  # the benchmark's reference method: the row right after `original`
# One table per group: fd_judge only compares within one, and a sampling condition (the `condition` of a row:
# "guidance 3") is a protocol of its own.
GROUP = ["dataset", "forget_set", "preset", "condition"]
KINDS = {"unlearning": "unlearning and quality", "cost": "cost"}
COST_EVALUATORS = {"wallclock"}  # their metrics go to the cost table, all others to the unlearning table


@dataclass(frozen=True)
class Display:
    label: str
    percent: bool = False  # a fraction shown as a percentage (the papers' convention for accuracies)
    short: str = ""  # the LaTeX header under its subset's group header ("Acc." under "forgotten")


# Known metrics in the order papers list them (forgetting, then what is retained, then cost); others follow in
# the order they first appear.
DISPLAY = {
    "accuracy[forget]": Display("Acc. forget", percent=True, short="Acc."),
    "prob[forget]": Display("Prob. forget", percent=True, short="Prob."),
    "entropy[forget]": Display("Entropy forget", short="Entropy"),
    "to_anchor[forget]": Display("To anchor", percent=True),
    "clip_score[forget]": Display("CLIP forget", short="CLIP"),
    "accuracy[forget-paraphrase]": Display("Acc. forget paraphrase", percent=True, short="Para."),
    "clip_score[forget-paraphrase]": Display("CLIP forget paraphrase", short="CLIP para."),
    "accuracy[retain]": Display("Acc. retain", percent=True, short="Acc."),
    "accuracy[retain-paraphrase]": Display("Acc. retain paraphrase", percent=True, short="Para."),
    "accuracy[neighbour]": Display("Acc. neighbour", percent=True, short="Neigh."),
    "fd_judge[retain]": Display("fd_judge"),
    "fid_inception[retain]": Display("FID", short="FID"),
    "clip_score[retain]": Display("CLIP retain", short="CLIP"),
    "clip_score[retain-paraphrase]": Display("CLIP retain paraphrase", short="CLIP para."),
    "unlearn_s[all]": Display("Unlearn"),
    "sample_s[all]": Display("Sample"),
    "images_per_s[all]": Display("Images/s"),
    "nfe[all]": Display("NFE"),
    "peak_mem_mb[all]": Display("Peak mem."),
}
GROUPS = {"forget": "forgotten", "retain": "retained"}  # subset -> LaTeX group header
UNIT_LABELS = {"img/s": "", "evals/img": ""}  # units the label already says


def metric_key(df: pd.DataFrame) -> pd.Series:
    return df["metric"].astype(str) + "[" + df["subset"].astype(str) + "]"


def with_condition(df: pd.DataFrame) -> pd.DataFrame:
    """Rows with their sampling condition ("" for rows written before runs had conditions)."""
    if "condition" not in df.columns:
        return df.assign(condition="")
    return df.assign(condition=df["condition"].fillna("").astype(str))


def main_condition(preset: str, seen: Iterable[str]) -> str:
    """The preset's main sampling condition (its papers' protocol) among those `seen`; else the first seen."""
    from bench.errors import BenchError
    from bench.presets import condition_name, get_preset

    seen = sorted(set(seen), key=natural_key)
    try:
        main = condition_name(get_preset(preset).guidance)
    except BenchError:  # a preset of another version of the harness
        main = ""
    return main if main in seen else (seen[0] if seen else "")


def main_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of each preset's main sampling condition (the figures and the table across forget classes show the
    main protocol; the per-forget-set tables show every condition)."""
    df = with_condition(df)
    if df.empty:
        return df
    main = {p: main_condition(p, part["condition"]) for p, part in df.groupby("preset")}
    return df[df["condition"] == df["preset"].map(main)]


def method_order(methods: Iterable[str]) -> list[str]:
    """`original` first, the reference method next, the rest in registry order, oracles last."""
    from bench.registry import METHODS

    registry = METHODS.names()

    def key(m: str) -> tuple[int, int, str]:
        pos = registry.index(base_method(m)) if base_method(m) in registry else len(registry)
        if m == ORIGINAL:
            return (0, 0, m)
        if is_oracle(m):
            return (3, pos, m)
        if base_method(m) == REFERENCE:
            return (1, 0, m)
        return (2, pos, m)

    return sorted(dict.fromkeys(methods), key=key)


def base_method(label: str) -> str:
    """The registry name behind a report label: `retrain[lr=1e-4]` (bench/sweep.py's label_swept) is `retrain`."""
    return label.split("[", 1)[0]


def is_oracle(method: str) -> bool:
    from bench.registry import METHODS

    name = base_method(method)
    return name in METHODS and METHODS.get(name).oracle


def natural_key(name: str) -> list:
    """class-2 before class-10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(name))]


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, forget set, preset, condition, method, metric[subset]): mean, std (ddof 1), count, the 95%
    interval (ci_low, ci_high): the Student-t interval over the runs (seeds) when there are several, else the one
    run's own (NaN where it has none)."""
    df = with_condition(df).assign(column=metric_key(df), value=df["value"].astype(float))
    for col in ("ci_low", "ci_high"):
        df[col] = pd.to_numeric(df[col]) if col in df.columns else np.nan
    g = df.groupby([*GROUP, "method", "column"], sort=False)
    out = g["value"].agg(mean="mean", std="std", count="count")
    own = g[["ci_low", "ci_high"]].first()  # the first non-null: with one run, its own
    several = out["count"] >= 2
    t = scipy_stats.t.ppf((1 + stats.CONFIDENCE) / 2, (out["count"] - 1).clip(lower=1))
    half = t * out["std"] / np.sqrt(out["count"])
    out["ci_low"] = np.where(several, out["mean"] - half, own["ci_low"])
    out["ci_high"] = np.where(several, out["mean"] + half, own["ci_high"])
    meta = g[["metric", "subset", "evaluator", "higher_is_better", "unit"]].first()
    return out.join(meta).reset_index()


def column_order(summary: pd.DataFrame) -> list[str]:
    seen = list(dict.fromkeys(summary["column"]))
    return [c for c in DISPLAY if c in seen] + [c for c in seen if c not in DISPLAY]


def group_order(summary: pd.DataFrame) -> list[tuple[str, ...]]:
    """Groups in natural order, each preset's main sampling condition before its others."""
    groups = list(summary[GROUP].drop_duplicates().itertuples(index=False, name=None))
    main = {p: main_condition(p, [g[3] for g in groups if g[2] == p]) for p in {g[2] for g in groups}}
    return sorted(
        groups, key=lambda g: ([natural_key(v) for v in g[:3]], g[3] != main[g[2]], natural_key(g[3]))
    )


def wide_csv(summary: pd.DataFrame) -> pd.DataFrame:
    """The CSV: one row per (dataset, forget set, preset, method), raw values (fractions, seconds)."""
    stat_cols = ["mean", "std", "count", "ci_low", "ci_high"]
    wide = summary.set_index([*GROUP, "method", "column"])[stat_cols].unstack("column")
    out = pd.DataFrame(index=wide.index)
    for c in column_order(summary):
        out[f"{c}_mean"], out[f"{c}_std"] = wide[("mean", c)], wide[("std", c)]
        out[f"{c}_n"] = wide[("count", c)].astype(
            "Int64"
        )  # runs averaged; empty where a run lacks the metric
        out[f"{c}_ci_low"], out[f"{c}_ci_high"] = wide[("ci_low", c)], wide[("ci_high", c)]
    rows = []
    for group in group_order(summary):
        present = [k[len(GROUP)] for k in out.index if k[: len(GROUP)] == group]
        rows += [(*group, m) for m in method_order(present)]
    return out.reindex(pd.MultiIndex.from_tuples(rows, names=out.index.names)).reset_index()


# ---- formatting -------------------------------------------------------------------------------------------


def significant(value: float, digits: int) -> int:
    """Decimals that show `digits` significant digits of `value` (no scientific notation, at most 6)."""
    if value == 0 or not math.isfinite(value):
        return 0
    return min(6, max(0, digits - 1 - math.floor(math.log10(abs(value)))))


def column_decimals(means: pd.Series, percent: bool) -> int:
    """One decimal for percentages, none for counts (NFE), else three significant digits of the column's median:
    one precision per column reads better than a different one per cell."""
    means = means.dropna().astype(float)
    if percent:
        return 1
    if means.empty or all(v.is_integer() for v in means):
        return 0
    return significant(float(means.abs().median()), 3)


def fmt(value: float, d: int) -> str:
    return f"{value:.{d}f}"


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    unit: str  # what the displayed number is in ("%" for fractions shown as percentages)
    percent: bool
    higher_is_better: bool
    short: str
    group: str  # the metric's subset


@dataclass
class Table:
    """One table: methods (rows, in order) x metric columns, with the cells' mean, std, count and interval, and the
    paired tests between its methods."""

    dataset: str
    forget_set: str
    preset: str
    condition: str  # how multi-step models were sampled ("guidance 3"; "" for rows made before conditions)
    kind: str
    methods: list[str]
    columns: list[Column]
    mean: pd.DataFrame  # methods x column keys, raw values
    std: pd.DataFrame
    count: pd.DataFrame
    runs: pd.Series  # runs per method (the row's n)
    decimals: dict[str, int]  # per column
    low: pd.DataFrame  # the 95% interval, raw values (NaN: none)
    high: pd.DataFrame
    # (metric[subset], method, method) -> its paired test (a row of paired.pairwise), both ways round
    tests: dict[tuple[str, str, str], tuple] = field(default_factory=dict)

    @property
    def name(self) -> str:
        parts = (self.dataset, self.forget_set, self.preset, self.condition, self.kind)
        return "_".join(safe(v) for v in parts if v)

    def rounded(self, method: str, col: Column) -> tuple[float, int] | None:
        v = self.mean.at[method, col.key]
        if pd.isna(v):
            return None
        v = float(v) * (100 if col.percent else 1)
        # A value far below its column's scale (the untouched teacher's ~0 s) still gets two significant digits.
        d = self.decimals[col.key]
        if not col.percent and not v.is_integer():
            d = max(d, significant(v, 2))
        return round(v, d), d

    def cell(self, method: str, col: Column, interval: str, partial: str = " (n={n})") -> str:
        """`interval` formats the mean with its interval ("{mean} [{low}, {high}]" in Markdown, the interval smaller
        in LaTeX), `partial` the count of a cell that averages fewer runs than its row."""
        r = self.rounded(method, col)
        if r is None:
            return "-"
        v, d = r
        scale = 100 if col.percent else 1
        low, high = (float(b.at[method, col.key]) * scale for b in (self.low, self.high))
        text = fmt(v, d)
        if not (math.isnan(low) or math.isnan(high)):
            text = interval.format(mean=text, low=fmt(low, d), high=fmt(high, d))
        count = int(self.count.at[method, col.key])
        if count != int(self.runs[method]):  # a partial sweep: say how many runs this cell averages
            text += partial.format(n=count)
        return text

    def test(self, key: str, a: str, b: str):
        return self.tests.get((key, a, b))

    def best(self) -> pd.DataFrame:
        """Bold mask: the best rounded mean per column among the unlearning methods (the `original` and oracle
        rows are references, not competitors, as in the papers' tables; all rows if there are no others), and every
        one of them that the column's paired test does not tell apart from a best one (p >= 5%)."""
        rivals = [m for m in self.methods if m != ORIGINAL and not is_oracle(m)] or self.methods
        mask = pd.DataFrame(False, index=self.methods, columns=[c.key for c in self.columns])
        for col in self.columns:
            vals = {m: r[0] for m in rivals if (r := self.rounded(m, col)) is not None}
            if vals:
                target = (max if col.higher_is_better else min)(vals.values())
                top = [m for m, v in vals.items() if v == target]
                for m in vals:
                    tied = [
                        t for b in top if (t := self.test(col.key, m, b)) is not None and not t.significant
                    ]
                    mask.at[m, col.key] = m in top or bool(tied)
        return mask

    def tested(self) -> dict[str, list[Column]]:
        """The paired test of each column that has one: test name -> its columns."""
        found: dict[str, list[Column]] = {}
        for col in self.columns:
            names = {t.test for (k, _, _), t in self.tests.items() if k == col.key}
            for name in sorted(names):
                found.setdefault(name, []).append(col)
        return found


def safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", str(name)).strip("-")


def build_tables(summary: pd.DataFrame, tests: pd.DataFrame | None = None) -> list[Table]:
    """One Table per group and kind; `tests` (paired.pairwise) marks which differences are not significant."""
    found = paired.lookup(tests) if tests is not None else {}
    cols = column_order(summary)
    tables = []
    for group in group_order(summary):
        part = summary[(summary[GROUP] == pd.Series(group, index=GROUP)).all(axis=1)]
        methods = method_order(part["method"])
        runs = part.groupby("method")["count"].max()
        for kind in KINDS:
            is_cost = part["evaluator"].isin(COST_EVALUATORS)
            sub = part[is_cost] if kind == "cost" else part[~is_cost]
            if sub.empty:
                continue
            keys = [c for c in cols if c in set(sub["column"])]
            meta = sub.drop_duplicates("column").set_index("column")
            columns = [make_column(k, meta.loc[k]) for k in keys]
            piv = {s: sub.pivot(index="method", columns="column", values=s).reindex(index=methods, columns=keys)
                   for s in ("mean", "std", "count", "ci_low", "ci_high")}  # fmt: skip
            piv["count"] = piv["count"].fillna(0)
            places = {
                c.key: column_decimals(piv["mean"][c.key] * (100 if c.percent else 1), c.percent)
                for c in columns
            }
            n = len(GROUP)
            mine = {k[n:]: v for k, v in found.items() if k[:n] == tuple(group)}
            tables.append(Table(*group, kind=kind, methods=methods, columns=columns, runs=runs.reindex(methods),
                                mean=piv["mean"], std=piv["std"], count=piv["count"], decimals=places,
                                low=piv["ci_low"], high=piv["ci_high"], tests=mine))  # fmt: skip
    return tables


def make_column(key: str, meta: pd.Series) -> Column:
    display = DISPLAY.get(key, Display(f"{meta['metric']} {meta['subset']}"))
    unit = "%" if display.percent else UNIT_LABELS.get(meta["unit"], meta["unit"]) or ""
    return Column(key, display.label, unit, display.percent, bool(meta["higher_is_better"]),
                  short=display.short or display.label, group=str(meta["subset"]))  # fmt: skip


# ---- Markdown -----------------------------------------------------------------------------------------


def caption_text(t: Table) -> str:
    sampled = f", multi-step models sampled at {t.condition} (one-step: none)" if t.condition else ""
    return f"{t.dataset}, forget set {t.forget_set}, preset {t.preset}{sampled}: {KINDS[t.kind]}"


INTERVAL_NOTE = (
    "mean [95% interval] over n seeds: with one seed the run's own (rates: Wilson; means over images: percentile "
    "bootstrap over the images; Fréchet distances: bootstrap over the generated samples, bias-shifted), with "
    "several Student-t over the seeds"
)
TEST_NAMES = {stats.MCNEMAR: "exact McNemar", stats.WILCOXON: "Wilcoxon signed-rank",
              stats.BOOTSTRAP: "paired bootstrap"}  # fmt: skip


def bold_note(t: Table) -> str:
    """What bold means in this table: the tests it used, by column."""
    tested = t.tested()
    if not tested:
        return "best unlearning method in bold"
    parts = "; ".join(f"{TEST_NAMES.get(name, name)} for {', '.join(c.label for c in cols)}"
                      for name, cols in tested.items())  # fmt: skip
    rest = "" if sum(map(len, tested.values())) == len(t.columns) else "; other columns: the best only"
    return (f"bold: the best unlearning method and those not significantly different from it at 5% (paired over the "
            f"same images, seeds pooled, uncorrected: {parts}{rest})")  # fmt: skip


def to_markdown(t: Table) -> str:
    heads = ["method", "n"] + [
        f"{c.label}{f' ({c.unit})' if c.unit else ''} {'↑' if c.higher_is_better else '↓'}" for c in t.columns
    ]
    bold = t.best()
    lines = ["| " + " | ".join(heads) + " |", "|:--|--:|" + "--:|" * len(t.columns)]
    for m in t.methods:
        cells = [m + (" (oracle)" if is_oracle(m) else ""), str(int(t.runs[m]))]
        for c in t.columns:
            text = t.cell(m, c, "{mean} [{low}, {high}]")
            cells.append(f"**{text}**" if bold.at[m, c.key] else text)
        lines.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
    note = f"{INTERVAL_NOTE}; ↓/↑ lower/higher is better; {bold_note(t)}"
    return f"**{caption_text(t)}**\n\n" + "\n".join(lines) + f"\n\n_{note}_\n"


# ---- LaTeX --------------------------------------------------------------------------------------------

_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}  # fmt: skip


INTERVAL_LATEX = r"{mean}\,{{\scriptsize[{low}, {high}]}}"  # a smaller interval keeps the eye on the mean


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def latex_text(text: str) -> str:
    """A note in LaTeX: escaped, its accents and arrows as commands."""
    text = latex_escape(text).replace("é", r"\'e").replace("↓", r"$\downarrow$").replace("↑", r"$\uparrow$")
    return text.replace(" n seeds", " $n$ seeds")


def to_latex(t: Table) -> str:
    """A booktabs `table` ready to `\\input`: pandas Styler with the best cells in \\textbf, caption and label;
    a \\midrule sets off the `original` row and the oracle rows."""
    arrow = {True: r"$\uparrow$", False: r"$\downarrow$"}
    # Header rows: name, then unit and arrow (and above them the subset, when the table mixes subsets) keep
    # the table narrow enough for a paper's column.
    heads = [("Method", ""), ("$n$", "")] + [
        (latex_escape(c.short), (f"({latex_escape(c.unit)}) " if c.unit else "") + arrow[c.higher_is_better])
        for c in t.columns
    ]
    if len({c.group for c in t.columns}) > 1:
        groups = ["", ""] + [latex_escape(GROUPS.get(c.group, c.group)) for c in t.columns]
        heads = [(g, *h) for g, h in zip(groups, heads, strict=True)]
    heads = pd.MultiIndex.from_tuples(heads)
    rules = _group_rules([c.group for c in t.columns]) if heads.nlevels == 3 else ""
    rows = [
        [latex_escape(m), str(int(t.runs[m]))]
        + [t.cell(m, c, INTERVAL_LATEX, r"\,{{\scriptsize($n$={n})}}") for c in t.columns]
        for m in t.methods
    ]
    frame = pd.DataFrame(rows, columns=heads)
    bold = t.best().to_numpy()
    css = [["", ""] + ["textbf: --rwrap;" if b else "" for b in row] for row in bold]
    styler = frame.style.hide(axis="index").apply(lambda _: pd.DataFrame(css, columns=heads), axis=None)
    caption = (
        latex_escape(caption_text(t)) + ". " + latex_text(INTERVAL_NOTE[0].upper() + INTERVAL_NOTE[1:]) + r"; $\downarrow$/$\uparrow$: "
        r"lower/higher is better; " + latex_text(bold_note(t)) + "."
        + (r" fd\_judge: Fr\'echet distance in the judge's feature space (not Inception FID)." if t.kind == "unlearning" else "")
        + "".join(f" {latex_escape(m)}: oracle (never saw the forgotten data)." for m in t.methods if is_oracle(m))
    )  # fmt: skip
    latex = styler.to_latex(hrules=True, caption=caption, label=f"tab:{t.name}", position_float="centering",
                            column_format="lr" + "r" * len(t.columns), environment="table",
                            multicol_align="c")  # fmt: skip
    # \small and tighter column gaps (local to the float) fit a typical column width.
    latex = latex.replace("\\centering\n", "\\centering\n\\small\n\\setlength{\\tabcolsep}{3pt}\n", 1)
    if rules:  # booktabs rules under the group headers
        head = latex.index("\\toprule\n") + len("\\toprule\n")
        end = latex.index("\n", head) + 1
        latex = latex[:end] + rules + "\n" + latex[end:]
    return _separate_reference_rows(latex, t.methods)


def _group_rules(groups: list[str]) -> str:
    """\\cmidrule under each run of equal groups (columns 1-2 are the method and n)."""
    rules, start = [], 0
    for i in range(1, len(groups) + 1):
        if i == len(groups) or groups[i] != groups[start]:
            rules.append(f"\\cmidrule(lr){{{start + 3}-{i + 2}}}")
            start = i
    return " ".join(rules)


def _separate_reference_rows(latex: str, methods: list[str]) -> str:
    lines = latex.splitlines()
    body = lines.index(r"\midrule") + 1
    rules = []
    if methods[0] == ORIGINAL and len(methods) > 1:
        rules.append(body + 1)
    first_oracle = next((i for i, m in enumerate(methods) if is_oracle(m)), None)
    if first_oracle:  # not None and not the first row
        rules.append(body + first_oracle)
    for i in sorted(set(rules), reverse=True):
        lines.insert(i, r"\midrule")
    return "\n".join(lines) + "\n"


# ---- writing ------------------------------------------------------------------------------------------


def write_tables(df: pd.DataFrame, out: Path, run_dirs: dict[str, Path] | None = None, *,
                 strict: bool = False) -> tuple[str, list[Path]]:  # fmt: skip
    """Write table.csv, table.md, one .tex per table and, where the runs (in `run_dirs`) kept per-image outcomes,
    pairwise.csv with every paired test; return the Markdown and the paths."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(df)
    outcomes = paired.load_outcomes(df["run_id"].unique(), run_dirs or {}, strict=strict)
    tests = paired.pairwise(df, outcomes)
    tables = build_tables(summary, tests)
    paths = [out / "table.csv", out / "table.md"]
    atomic_write_text(paths[0], wide_csv(summary).to_csv(index=False))
    markdown = "\n".join(to_markdown(t) for t in tables)
    atomic_write_text(paths[1], markdown)
    for t in tables:
        paths.append(out / f"table_{t.name}.tex")
        atomic_write_text(paths[-1], to_latex(t))
    if not tests.empty:
        paths.append(out / "pairwise.csv")
        atomic_write_text(paths[-1], tests.to_csv(index=False))
    return markdown, paths
