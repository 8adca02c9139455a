"""Result tables from tidy metric rows: mean +- std over seeds, written as CSV, Markdown and booktabs LaTeX."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bench.store import atomic_write_text

ORIGINAL = "original"  # the untouched teacher: the first row, the reference every method is read against
REFERENCE = "sfd"  # the benchmark's reference method: the row right after `original`
GROUP = ["dataset", "forget_set", "preset"]  # one table per group: fd_judge only compares within one
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
    "accuracy[retain]": Display("Acc. retain", percent=True, short="Acc."),
    "fd_judge[retain]": Display("fd_judge"),
    "fid_inception[retain]": Display("FID", short="FID"),
    "clip_score[retain]": Display("CLIP retain", short="CLIP"),
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


def method_order(methods: Iterable[str]) -> list[str]:
    """`original` first, the reference method next, the rest in registry order, oracles last."""
    from bench.registry import METHODS

    registry = METHODS.names()

    def key(m: str) -> tuple[int, int, str]:
        pos = registry.index(m) if m in registry else len(registry)
        if m == ORIGINAL:
            return (0, 0, m)
        if is_oracle(m):
            return (3, pos, m)
        if m == REFERENCE:
            return (1, 0, m)
        return (2, pos, m)

    return sorted(dict.fromkeys(methods), key=key)


def is_oracle(method: str) -> bool:
    from bench.registry import METHODS

    return method in METHODS and METHODS.get(method).oracle


def natural_key(name: str) -> list:
    """class-2 before class-10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(name))]


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, forget set, preset, method, metric[subset]): mean, std (ddof 1) and count."""
    df = df.assign(column=metric_key(df), value=df["value"].astype(float))
    g = df.groupby([*GROUP, "method", "column"], sort=False)
    stats = g["value"].agg(mean="mean", std="std", count="count")
    meta = g[["metric", "subset", "evaluator", "higher_is_better", "unit"]].first()
    return stats.join(meta).reset_index()


def column_order(summary: pd.DataFrame) -> list[str]:
    seen = list(dict.fromkeys(summary["column"]))
    return [c for c in DISPLAY if c in seen] + [c for c in seen if c not in DISPLAY]


def group_order(summary: pd.DataFrame) -> list[tuple[str, str, str]]:
    groups = summary[GROUP].drop_duplicates().itertuples(index=False, name=None)
    return sorted(groups, key=lambda g: [natural_key(v) for v in g])


def wide_csv(summary: pd.DataFrame) -> pd.DataFrame:
    """The CSV: one row per (dataset, forget set, preset, method), raw values (fractions, seconds)."""
    wide = summary.set_index([*GROUP, "method", "column"])[["mean", "std", "count"]].unstack("column")
    out = pd.DataFrame(index=wide.index)
    for c in column_order(summary):
        out[f"{c}_mean"], out[f"{c}_std"] = wide[("mean", c)], wide[("std", c)]
        out[f"{c}_n"] = wide[("count", c)].astype(
            "Int64"
        )  # runs averaged; empty where a run lacks the metric
    rows = []
    for group in group_order(summary):
        present = [k[3] for k in out.index if k[:3] == group]
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
    """One table: methods (rows, in order) x metric columns, with the cells' mean, std and count."""

    dataset: str
    forget_set: str
    preset: str
    kind: str
    methods: list[str]
    columns: list[Column]
    mean: pd.DataFrame  # methods x column keys, raw values
    std: pd.DataFrame
    count: pd.DataFrame
    runs: pd.Series  # runs per method (the row's n)
    decimals: dict[str, int]  # per column

    @property
    def name(self) -> str:
        return "_".join(safe(v) for v in (self.dataset, self.forget_set, self.preset, self.kind))

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

    def cell(self, method: str, col: Column, pm: str, partial: str = " (n={n})") -> str:
        """`pm` formats the spread ("{mean} ± {std}" in Markdown, a smaller std in LaTeX), `partial` the count
        of a cell that averages fewer runs than its row."""
        r = self.rounded(method, col)
        if r is None:
            return "-"
        v, d = r
        s = self.std.at[method, col.key]
        text = (
            fmt(v, d)
            if pd.isna(s)
            else pm.format(mean=fmt(v, d), std=fmt(float(s) * (100 if col.percent else 1), d))
        )
        count = int(self.count.at[method, col.key])
        if count != int(self.runs[method]):  # a partial sweep: say how many runs this cell averages
            text += partial.format(n=count)
        return text

    def best(self) -> pd.DataFrame:
        """Bold mask: the best rounded mean per column among the unlearning methods (the `original` and oracle
        rows are references, not competitors, as in the papers' tables), all rows if there are no others."""
        rivals = [m for m in self.methods if m != ORIGINAL and not is_oracle(m)] or self.methods
        mask = pd.DataFrame(False, index=self.methods, columns=[c.key for c in self.columns])
        for col in self.columns:
            vals = {m: r[0] for m in rivals if (r := self.rounded(m, col)) is not None}
            if vals:
                target = (max if col.higher_is_better else min)(vals.values())
                for m, v in vals.items():
                    mask.at[m, col.key] = v == target
        return mask


def safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", str(name)).strip("-")


def build_tables(summary: pd.DataFrame) -> list[Table]:
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
                   for s in ("mean", "std", "count")}  # fmt: skip
            piv["count"] = piv["count"].fillna(0)
            places = {
                c.key: column_decimals(piv["mean"][c.key] * (100 if c.percent else 1), c.percent)
                for c in columns
            }
            tables.append(Table(*group, kind=kind, methods=methods, columns=columns, runs=runs.reindex(methods),
                                mean=piv["mean"], std=piv["std"], count=piv["count"], decimals=places))  # fmt: skip
    return tables


def make_column(key: str, meta: pd.Series) -> Column:
    display = DISPLAY.get(key, Display(f"{meta['metric']} {meta['subset']}"))
    unit = "%" if display.percent else UNIT_LABELS.get(meta["unit"], meta["unit"]) or ""
    return Column(key, display.label, unit, display.percent, bool(meta["higher_is_better"]),
                  short=display.short or display.label, group=str(meta["subset"]))  # fmt: skip


# ---- Markdown -----------------------------------------------------------------------------------------


def caption_text(t: Table) -> str:
    return f"{t.dataset}, forget set {t.forget_set}, preset {t.preset}: {KINDS[t.kind]}"


def to_markdown(t: Table) -> str:
    heads = ["method", "n"] + [
        f"{c.label}{f' ({c.unit})' if c.unit else ''} {'↑' if c.higher_is_better else '↓'}" for c in t.columns
    ]
    bold = t.best()
    lines = ["| " + " | ".join(heads) + " |", "|:--|--:|" + "--:|" * len(t.columns)]
    for m in t.methods:
        cells = [m + (" (oracle)" if is_oracle(m) else ""), str(int(t.runs[m]))]
        for c in t.columns:
            text = t.cell(m, c, "{mean} ± {std}")
            cells.append(f"**{text}**" if bold.at[m, c.key] else text)
        lines.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
    note = "mean ± std over n seeds; ↓/↑ lower/higher is better; best unlearning method in bold"
    return f"**{caption_text(t)}**\n\n" + "\n".join(lines) + f"\n\n_{note}_\n"


# ---- LaTeX --------------------------------------------------------------------------------------------

_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}  # fmt: skip


PM_LATEX = (
    r"{mean}\,{{\scriptsize$\pm${std}}}"  # a smaller spread keeps the eye on the mean, the table narrow
)


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


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
        + [t.cell(m, c, PM_LATEX, r"\,{{\scriptsize($n$={n})}}") for c in t.columns]
        for m in t.methods
    ]
    frame = pd.DataFrame(rows, columns=heads)
    bold = t.best().to_numpy()
    css = [["", ""] + ["textbf: --rwrap;" if b else "" for b in row] for row in bold]
    styler = frame.style.hide(axis="index").apply(lambda _: pd.DataFrame(css, columns=heads), axis=None)
    caption = (
        latex_escape(caption_text(t)) + r". Mean $\pm$ std over $n$ seeds; $\downarrow$/$\uparrow$: lower/higher"
        r" is better; best unlearning method in bold."
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


def write_tables(df: pd.DataFrame, out: Path) -> tuple[str, list[Path]]:
    """Write table.csv, table.md and one .tex per table; return the Markdown and the paths."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(df)
    tables = build_tables(summary)
    paths = [out / "table.csv", out / "table.md"]
    wide_csv(summary).to_csv(paths[0], index=False)
    markdown = "\n".join(to_markdown(t) for t in tables)
    atomic_write_text(paths[1], markdown)
    for t in tables:
        paths.append(out / f"table_{t.name}.tex")
        atomic_write_text(paths[-1], to_latex(t))
    return markdown, paths
