"""Robustness in `bench report`: the relearning curves (forget accuracy against attack steps, per method, with
`original` and `retrain` dashed) and the robustness table (CSV, Markdown, LaTeX), from the attacks' rows that
bench/attack.py writes beside each run (RUN/robustness/<attack>/rows.jsonl). Means over seeds; a cell a method
has no row for (an attack that does not apply to one-step generators) says n/a."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from matplotlib.ticker import NullLocator

from bench.report.tables import ORIGINAL, is_oracle, latex_escape, method_order, natural_key, safe
from bench.store import atomic_write_text

GROUP = ["dataset", "forget_set", "preset"]
CONTROLS = (ORIGINAL, "retrain")


def frame(rows: list[dict], labels: dict[str, str]) -> pd.DataFrame:
    """The attacks' rows, methods labelled as the run tables label them (swept settings)."""
    df = pd.DataFrame(rows)
    df["method"] = df["run_id"].map(labels).fillna(df["method"])
    return df


def _select(df: pd.DataFrame, attack: str, metric: str, **params) -> pd.DataFrame:
    sel = df[(df["evaluator"] == attack) & (df["metric"] == metric)]
    for k, v in params.items():
        sel = sel[sel[k] == v] if k in sel.columns else sel.iloc[0:0]
    return sel


def _values(df: pd.DataFrame, column: str) -> list:
    return sorted(df[column].dropna().unique()) if column in df.columns else []


def columns(df: pd.DataFrame) -> list[tuple[str, str, dict, str]]:
    """(attack, metric, parameters, header) of each table column, for the parameter values the rows hold."""
    cols = []
    kshot = df[df["evaluator"] == "kshot"]
    for k in _values(kshot, "k"):
        cols.append(("kshot", "auc", {"k": k}, f"AUC k={k:g}"))
    for k in _values(kshot, "k"):
        cols.append(("kshot", "steps_to_relearn", {"k": k}, f"steps k={k:g}"))
    cols += [("benign", "auc", {}, "benign AUC"), ("benign", "steps_to_relearn", {}, "benign steps"),
             ("inversion", "recovered", {}, "inversion"),
             ("textual-inversion", "recovered", {}, "textual inversion")]  # fmt: skip
    conceal = df[(df["evaluator"] == "concealment")]
    cols += [
        ("concealment", "recognised", {"t_frac": f}, f"conceal t/T={f:g}" if f else "real images")
        for f in _values(conceal, "t_frac")
    ]
    cond = df[(df["evaluator"] == "conditions") & (df["metric"] == "accuracy")]
    cols += [("conditions", "accuracy", {"w": w}, f"w={w:g}") for w in _values(cond, "w")]
    cols += [("conditions", "null_as_forget", {}, "null as forgotten")]
    attacked = set(df["evaluator"])  # a steps column has no row where no probe relearned: kept for its attack
    return [c for c in cols if (c[1] == "steps_to_relearn" and c[0] in attacked)
            or not _select(df, c[0], c[1], **c[2]).empty]  # fmt: skip


def _cell(
    df: pd.DataFrame, method: str, attack: str, metric: str, params: dict
) -> tuple[float, float, int, str]:
    """(mean, std, seeds, text) of one cell; steps to relearn counts the seeds that relearned within S."""
    mine = df[df["method"] == method]
    if metric == "steps_to_relearn":
        flags = _select(mine, attack, "relearned", **params)
        if flags.empty:
            return math.nan, math.nan, 0, "n/a"
        steps = _select(mine, attack, metric, **params)["value"]
        horizon = int(flags["steps"].max())
        if steps.empty:
            return math.nan, math.nan, len(flags), f">{horizon}"
        text = f"{steps.mean():.0f}" + ("" if len(steps) == len(flags) else f" ({len(steps)}/{len(flags)})")
        return float(steps.mean()), float(steps.std()), len(flags), text
    values = _select(mine, attack, metric, **params)["value"]
    if values.empty:
        return math.nan, math.nan, 0, "n/a"
    mean, std = float(values.mean()), float(values.std())
    text = f"{100 * mean:.0f}" + (f" ± {100 * std:.0f}" if len(values) > 1 else "")
    return mean, std, len(values), text


def tables(df: pd.DataFrame) -> list[tuple[tuple, list[str], list[tuple], pd.DataFrame]]:
    """Per group: (group, methods, columns, text cells)."""
    out = []
    for group, rows in df.groupby(GROUP, sort=False):
        methods = method_order(rows["method"].unique())
        cols = columns(rows)
        cells = pd.DataFrame(
            {c[3]: [_cell(rows, m, *c[:3])[3] for m in methods] for c in cols}, index=methods
        )
        out.append((group, methods, cols, cells))
    return sorted(out, key=lambda t: [natural_key(str(v)) for v in t[0]])


def caption(group: tuple, rows: pd.DataFrame) -> str:
    dataset, forget_set, preset = group
    ref = _select(rows, "conditions", "teacher_null_as_forget")["value"]
    teacher = (
        f"; the teacher's null-class samples are the forgotten class in {100 * ref.mean():.0f}%"
        if len(ref)
        else ""
    )
    return (f"Robustness on {dataset}, forget set {forget_set}, preset {preset}: after each attack, the % of "
            "samples the judge recognises as the forgotten class (AUC: the relearning curve's mean over its "
            "log-step axis; steps: the first probe reaching half the teacher's no-attack forget accuracy, >S when "
            f"none did within the S steps probed){teacher}. original is the ceiling, retrain the oracle.")  # fmt: skip


def to_markdown(cells: pd.DataFrame, text: str) -> str:
    head = ["method", *cells.columns]
    lines = ["| " + " | ".join(head) + " |", "| :-- |" + " --: |" * len(cells.columns)]
    for m, row in cells.iterrows():
        name = f"{m} (oracle)" if is_oracle(m) else m
        lines.append("| " + " | ".join([name, *row.tolist()]) + " |")
    return f"{text}\n\n" + "\n".join(lines)


def to_latex(cells: pd.DataFrame, text: str) -> str:
    spec = "l" + "r" * len(cells.columns)
    body = [" & ".join(latex_escape(str(v)) for v in ["Method", *cells.columns]) + r" \\", r"\midrule"]
    for m, row in cells.iterrows():
        body.append(" & ".join(latex_escape(str(v)) for v in [m, *row.tolist()]) + r" \\")
        if m == ORIGINAL:
            body.append(r"\midrule")
    return "\n".join([r"\begin{table}[t]", r"\centering", r"\small", f"\\caption{{{latex_escape(text)}}}",
                      f"\\begin{{tabular}}{{{spec}}}", r"\toprule", *body, r"\bottomrule", r"\end{tabular}",
                      r"\end{table}", ""])  # fmt: skip


def wide_csv(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (group, method): mean, std and seeds of every column, as numbers."""
    records = []
    for group, rows in df.groupby(GROUP, sort=False):
        for m in method_order(rows["method"].unique()):
            rec = dict(zip(GROUP, group, strict=True)) | {"method": m}
            for attack, metric, params, header in columns(rows):
                mean, std, n, _ = _cell(rows, m, attack, metric, params)
                rec |= {f"{header} mean": mean, f"{header} std": std, f"{header} seeds": n}
            records.append(rec)
    return pd.DataFrame(records)


def curves_figure(rows: pd.DataFrame, title: str):
    """Forget accuracy (%) against attack steps: a panel per k of k-shot relearning and one for benign
    relearning; original and retrain dashed; the dotted line is half the teacher's no-attack value."""
    from bench.report.plots import method_style, new_figure

    acc = rows[rows["metric"] == "accuracy"]
    panels = [("kshot", {"k": k}, f"k-shot, k={k:g}") for k in _values(acc[acc.evaluator == "kshot"], "k")]
    if not acc[acc.evaluator == "benign"].empty:
        panels.append(("benign", {}, "benign (retained data only)"))
    if not panels:
        return None
    fig = new_figure(3.2 * len(panels) + 1.6, 3.2)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (attack, params, label) in zip(axes, panels, strict=True):
        sel = _select(acc, attack, "accuracy", **params)
        for m in method_order(sel["method"].unique()):
            curve = sel[sel.method == m].groupby("steps")["value"].mean().sort_index()
            color, marker = method_style(m)
            dashed = m in CONTROLS or is_oracle(m)
            ax.plot(curve.index, 100 * curve.values, color=color, marker=marker, markersize=4, linewidth=1.4,
                    linestyle="--" if dashed else "-", label=f"{m} (oracle)" if is_oracle(m) else m)  # fmt: skip
        flags = _select(rows, attack, "relearned", **params)
        if not flags.empty:
            ax.axhline(100 * flags["threshold"].mean(), color="#999999", linestyle=":", linewidth=1)
        ax.set_xscale("symlog", linthresh=1)  # step 0 (no attack) on the axis, the probes log-spaced after it
        probes = sorted(sel["steps"].dropna().unique())
        if probes:
            ax.set_xlim(0, probes[-1] * 1.15)
            ax.set_xticks(probes, [f"{s:g}" for s in probes])
            ax.xaxis.set_minor_locator(NullLocator())
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("attack steps")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("forget accuracy (%)")
    axes[0].set_ylim(-3, 103)
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.suptitle(title, fontsize=10)
    return fig


def extend(
    markdown: str, paths: list[Path], df: pd.DataFrame, results: Path, out: Path
) -> tuple[str, list[Path]]:
    """Add the robustness table and the relearning curves when the sweep's runs were attacked."""
    from bench.attack import load_rows
    from bench.report.plots import save

    rows = load_rows(results)
    if not rows:
        return markdown, paths
    att = frame(rows, dict(zip(df["run_id"], df["method"], strict=False)))
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for group, _, _, cells in tables(att):
        mine = att[(att[GROUP] == pd.Series(group, index=GROUP)).all(axis=1)]
        text = caption(group, mine)
        stem = "robustness_" + "_".join(safe(str(v)) for v in group)
        atomic_write_text(out / f"{stem}.md", to_markdown(cells, text) + "\n")
        atomic_write_text(out / f"{stem}.tex", to_latex(cells, text))
        paths += [out / f"{stem}.md", out / f"{stem}.tex"]
        parts.append(to_markdown(cells, text))
        fig = curves_figure(mine, f"Relearning: {group[0]}, {group[1]}, {group[2]}")
        if fig is not None:
            paths += save(fig, out, "relearning_" + "_".join(safe(str(v)) for v in group))
    atomic_write_text(out / "robustness.csv", wide_csv(att).to_csv(index=False))
    paths.append(out / "robustness.csv")
    return markdown + "\n\n## Robustness\n\n" + "\n\n".join(parts), paths
