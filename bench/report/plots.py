"""Figures from tidy results (matplotlib object-oriented API on the Agg canvas, PNG and PDF)."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from bench.errors import BenchError
from bench.report.tables import ORIGINAL, is_oracle, method_order, metric_key, natural_key, safe, summarize
from bench.stats import t_interval

log = logging.getLogger(__name__)

DPI = 150
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#393b79", "#ad494a", "#637939"]  # fmt: skip
MARKERS = ["s", "D", "^", "v", "P", "X", "h", "<", ">", "p", "d", "8"]
ORIGINAL_STYLE = ("#555555", "o")
ORACLE_STYLE = ("#000000", "*")
FORGOTTEN = "#d62728"


def sampled_at(rows: pd.DataFrame) -> str:
    """ ", guidance 3" where the rows were sampled under one named condition (multi-step models; one-step: none)."""
    found = set(rows["condition"]) if "condition" in rows.columns else set()
    return f", {found.pop()}" if len(found) == 1 and "" not in found else ""


def method_style(method: str) -> tuple[str, str]:
    """(colour, marker) of a method, the same in every figure: set by its place in the whole registry, not by
    which methods a figure happens to show."""
    from bench.registry import METHODS

    if method == ORIGINAL:
        return ORIGINAL_STYLE
    if is_oracle(method):
        return ORACLE_STYLE
    others = [m for m in method_order(METHODS.names()) if m != ORIGINAL and not is_oracle(m)]
    i = others.index(method) if method in others else len(others) + zlib.crc32(method.encode()) % 97
    # Past the palette's length the marker shifts by one per round, so every (colour, marker) pair stays distinct.
    return PALETTE[i % len(PALETTE)], MARKERS[(i + i // len(PALETTE)) % len(MARKERS)]


def new_figure(width: float, height: float) -> Figure:
    # Whole pixels at DPI, so the PNG is exactly figsize x DPI.
    width, height = round(width * DPI) / DPI, round(height * DPI) / DPI
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # no pyplot: no global state, no GUI backend, safe in worker processes
    return fig


def save(fig: Figure, out: Path, stem: str) -> list[Path]:
    """PNG (fixed size: figsize x DPI, so tests and READMEs can rely on it) and PDF for papers."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    for p in paths:
        fig.savefig(p, dpi=DPI, facecolor="white")
    return paths


def per_run(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One row per run with the wanted metric[subset] values as columns (a run lacking one is left out)."""
    df = df.assign(column=metric_key(df))
    df = df[df["column"].isin(keys)]
    wide = df.pivot_table(index=["dataset", "forget_set", "preset", "method", "seed", "run_id"], columns="column",
                          values="value", aggfunc="mean")  # fmt: skip
    return wide.reindex(columns=keys).dropna().reset_index()


def intervals(df: pd.DataFrame, keys: list[str]) -> dict[tuple, tuple[float, float, float]]:
    """(forget set, method, metric[subset]) -> (mean, ci_low, ci_high) as the tables show them: over several seeds
    the Student-t interval, for one run its own (NaN bounds: none)."""
    df = df[metric_key(df).isin(keys)]
    if df.empty:
        return {}
    summary = summarize(df)
    return {(r.forget_set, r.method, r.column): (r.mean, r.ci_low, r.ci_high) for r in summary.itertuples()}


def error_bar(interval: tuple[float, float, float] | None, scale: float = 1.0):
    """matplotlib's asymmetric (2, 1) error of a (mean, low, high), or None where there is no interval."""
    if interval is None or any(pd.isna(v) for v in interval):
        return None
    mean, low, high = interval
    return np.array([[max(mean - low, 0.0)], [max(high - mean, 0.0)]]) * scale


def _log_if_wide(values: pd.Series) -> bool:
    v = values[values > 0]
    return len(v) == len(values) and len(v) > 1 and v.max() / v.min() > 30


# ---- forget accuracy versus quality ------------------------------------------------------------------------


def tradeoff_figure(df: pd.DataFrame, dataset: str, preset: str) -> Figure | None:
    """Forget accuracy (%) against fd_judge per forget set: both lower is better, so the corner to reach is the
    bottom left; the oracle is the target a method should land on."""
    runs = per_run(
        df[(df.dataset == dataset) & (df.preset == preset)], ["accuracy[forget]", "fd_judge[retain]"]
    )
    if runs.empty:
        return None
    bars = intervals(
        df[(df.dataset == dataset) & (df.preset == preset)], ["accuracy[forget]", "fd_judge[retain]"]
    )
    forget_sets = sorted(runs["forget_set"].unique(), key=natural_key)
    ncols = min(3, len(forget_sets))
    nrows = -(-len(forget_sets) // ncols)
    fig = new_figure(4.2 * ncols + 1.6, 3.6 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, fs in zip(axes, forget_sets, strict=False):
        part = runs[runs.forget_set == fs]
        for method in method_order(part["method"]):
            cell = {k: bars.get((fs, method, k)) for k in ("fd_judge[retain]", "accuracy[forget]")}
            _tradeoff_points(ax, part[part.method == method], method, cell)
        ax.set_title(f"forget set {fs}", fontsize=10)
        ax.set_xlabel("fd_judge on retained classes (lower is better)")
        ax.set_ylabel("forget accuracy, % (lower is better)")
        if _log_if_wide(part["fd_judge[retain]"]):
            ax.set_xscale("log")
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
        ax.annotate("better", xy=(0.04, 0.05), xytext=(0.22, 0.22), xycoords="axes fraction", fontsize=8,
                    color="#555555", arrowprops={"arrowstyle": "->", "color": "#555555"})  # fmt: skip
    for ax in axes[len(forget_sets) :]:
        ax.set_visible(False)
    handles, labels = [], []
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    fig.legend(handles, labels, loc="outside right center", fontsize=9, title="method\n(mean and 95%\ninterval)",
               title_fontsize=8)  # fmt: skip
    mine = df[(df.dataset == dataset) & (df.preset == preset)]
    fig.suptitle(f"Forgetting versus quality: {dataset}, preset {preset}{sampled_at(mine)}", fontsize=11)
    return fig


def _tradeoff_points(ax, rows: pd.DataFrame, method: str, cell: dict) -> None:
    """The method's mean with its 95% intervals as error bars (the tables' intervals), its seeds faint behind."""
    color, marker = method_style(method)
    x, y = rows["fd_judge[retain]"], rows["accuracy[forget]"] * 100
    oracle = is_oracle(method)
    label = f"{method} (oracle)" if oracle else method
    size = 16 if oracle else 9
    if len(rows) > 1:  # the seeds themselves, faint, behind the mean
        ax.scatter(x, y, color=color, marker=marker, s=18, alpha=0.3, linewidths=0)
    xerr = error_bar(cell.get("fd_judge[retain]"))
    yerr = error_bar(cell.get("accuracy[forget]"), 100)
    ax.errorbar(x.mean(), y.mean(), xerr=xerr, yerr=yerr, color=color, marker=marker, markersize=size,
                markeredgecolor="white" if not oracle else "#ffd700", capsize=3, linestyle="none", label=label,
                zorder=4 if oracle else 3)  # fmt: skip
    if oracle:
        ax.annotate("oracle", (x.mean(), y.mean()), xytext=(8, 8), textcoords="offset points", fontsize=8)


# ---- wall-clock ------------------------------------------------------------------------------------------


def wallclock_figure(df: pd.DataFrame, dataset: str, preset: str) -> Figure | None:
    """Seconds to unlearn and to sample the evaluation grid, per method, on a log axis (they span decades)."""
    runs = per_run(df[(df.dataset == dataset) & (df.preset == preset)], ["unlearn_s[all]", "sample_s[all]"])
    if runs.empty:
        return None
    methods = method_order(runs["method"])
    fig = new_figure(7.5, 1.2 + 0.55 * len(methods))
    ax = fig.subplots()
    floor = 1e-3  # a method that does nothing (original) takes ~0 s; a log axis needs a floor
    y = np.arange(len(methods))
    for offset, col, hatch, what in (
        (-0.2, "unlearn_s[all]", "", "unlearning"),
        (0.2, "sample_s[all]", "//", "sampling"),
    ):
        means = runs.groupby("method")[col].mean().reindex(methods)
        colors = [method_style(m)[0] for m in methods]
        values = means.clip(lower=floor)
        # The 95% t-interval over the runs (none for one run), its low end kept above the log axis' floor.
        err = [error_bar(t_interval(runs.loc[runs.method == m, col])) for m in methods]
        err = np.hstack([e if e is not None else np.zeros((2, 1)) for e in err])
        err[0] = np.minimum(err[0], values.to_numpy() - floor)
        ax.barh(y + offset, values, height=0.38, color=colors, alpha=0.85 if not hatch else 0.45, hatch=hatch,
                edgecolor="black", linewidth=0.5, xerr=err, capsize=2, label=what)  # fmt: skip
        for yi, v, hi in zip(y + offset, means, err[1], strict=True):
            ax.text(max(v + hi, floor) * 1.2, yi, seconds_text(v), va="center", fontsize=7)
    ax.set_xscale("log")
    ax.set_yticks(y, [f"{m} (oracle)" if is_oracle(m) else m for m in methods])
    ax.invert_yaxis()
    ax.set_xlabel("wall-clock seconds (log scale)")
    ax.set_xlim(right=ax.get_xlim()[1] * 4)  # room for the value labels
    ax.grid(axis="x", alpha=0.3)
    legend = fig.legend(loc="outside right upper", fontsize=8)
    for patch in legend.get_patches():
        patch.set_facecolor("#bbbbbb")
    n = runs.groupby("method").size()
    runs_text = f"{n.min()}" if n.min() == n.max() else f"{n.min()}-{n.max()}"
    ax.set_title(f"Wall-clock per method ({dataset}, preset {preset}; mean and 95% t-interval over {runs_text} runs;\n"
                 "sampling = the whole evaluation grid)", fontsize=9)  # fmt: skip
    return fig


def seconds_text(v: float) -> str:
    return f"{v:.3g} s" if v < 100 else f"{v:,.0f} s"


# ---- sample grids ----------------------------------------------------------------------------------------


def load_grid(path: Path, key: str = "images") -> np.ndarray:
    """A run's kept samples: uint8 (K classes, per class, C, H, W); on the text tier `images` are the training
    prompts' and `images_<kind>` the other prompt kinds' (bench.runner._save_grid)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        images = load_file(str(path))[key]
    except (OSError, KeyError, ValueError, SafetensorError) as e:
        raise BenchError(f"cannot read sample grid {path}: {e!r}") from e
    if images.ndim != 5 or images.dtype != np.uint8:
        raise BenchError(f"sample grid {path} must hold uint8 {key!r} of shape (K, N, C, H, W), got "
                         f"{images.dtype} {images.shape}")  # fmt: skip
    return images


def grid_keys(path: Path) -> list[str]:
    """The grids a samples file holds, `images` first (just `images` when it cannot be read: load_grid says why)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "np") as f:
            keys = list(f.keys())
    except (OSError, ValueError, SafetensorError):
        return ["images"]
    return sorted(keys, key=lambda k: (k != "images", k))


def mosaic(images: np.ndarray, cols: int = 4, pad: int = 1) -> np.ndarray:
    """(N, C, H, W) uint8 -> one (rows*H, cols*W, C) tile with thin white gaps."""
    n, c, h, w = images.shape
    rows = -(-n // cols)
    tile = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        tile[r * (h + pad) : r * (h + pad) + h, k * (w + pad) : k * (w + pad) + w] = img.transpose(1, 2, 0)
    return tile


def sample_grid_figure(grids: dict[str, np.ndarray], *, class_names: list[str], forget: list[int],
                       title: str) -> Figure:  # fmt: skip
    """Rows = methods (in table order), columns = classes, each cell the class's kept samples; the forgotten
    classes' cells framed in red. One image on one axes: fast to draw, crisp pixels."""
    methods = method_order(grids)
    k = next(iter(grids.values())).shape[0]
    tiles = [[mosaic(grids[m][c]) for c in range(k)] for m in methods]
    tile_h, tile_w, channels = tiles[0][0].shape
    gap = max(6, tile_w // 8)
    canvas = np.full((len(methods) * (tile_h + gap) - gap, k * (tile_w + gap) - gap, channels), 255, np.uint8)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            canvas[
                r * (tile_h + gap) : r * (tile_h + gap) + tile_h,
                c * (tile_w + gap) : c * (tile_w + gap) + tile_w,
            ] = tile
    cell_w, margin = 1.0, 1.3  # inches; the margin holds the method names
    fig = new_figure(cell_w * k + margin, cell_w * k * canvas.shape[0] / canvas.shape[1] + 0.75)
    ax = fig.subplots()
    ax.imshow(
        canvas[..., 0] if channels == 1 else canvas, cmap="gray", vmin=0, vmax=255, interpolation="nearest"
    )
    for r in range(len(methods)):
        for c in forget:
            ax.add_patch(Rectangle((c * (tile_w + gap) - 1.5, r * (tile_h + gap) - 1.5), tile_w + 2, tile_h + 2,
                                   fill=False, edgecolor=FORGOTTEN, linewidth=2.5))  # fmt: skip
    names = [class_names[c] if c < len(class_names) else "" for c in range(k)]
    ax.xaxis.tick_top()
    ax.set_xticks([c * (tile_w + gap) + tile_w / 2 for c in range(k)],
                  [f"{c}: {n}" + ("\nforgotten" if c in forget else "") for c, n in enumerate(names)], fontsize=7)  # fmt: skip
    for c, label in enumerate(ax.get_xticklabels()):
        label.set_color(FORGOTTEN if c in forget else "black")
    ax.set_yticks([r * (tile_h + gap) + tile_h / 2 for r in range(len(methods))],
                  [f"{m} (oracle)" if is_oracle(m) else m for m in methods], fontsize=8)  # fmt: skip
    ax.set_xlim(-gap / 2 - 0.5, canvas.shape[1] + gap / 2 - 0.5)  # room for the frames at the edges
    ax.set_ylim(canvas.shape[0] + gap / 2 - 0.5, -gap / 2 - 0.5)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.suptitle(title, fontsize=10)
    return fig


# ---- time to forget --------------------------------------------------------------------------------------

TIME_TO_FORGET_COLUMNS = ("method", "seconds", "accuracy_forget", "fd_judge")


def time_to_forget_figure(
    points: pd.DataFrame, title: str = "Time to forget", reference: dict | None = None
) -> Figure:
    """Forget accuracy (%) and fd_judge against wall-clock seconds, one line per method; `reference` (the
    teacher's accuracy_forget and fd_judge on the same grid) is drawn as a dashed line."""
    missing = [c for c in TIME_TO_FORGET_COLUMNS if c not in points.columns]
    if missing:
        raise BenchError(f"time-to-forget points need columns {', '.join(TIME_TO_FORGET_COLUMNS)}; "
                         f"missing {', '.join(missing)}")  # fmt: skip
    if points.empty:
        raise BenchError("time-to-forget points are empty")
    fig = new_figure(10, 3.8)
    ax_acc, ax_fd = fig.subplots(1, 2, sharex=True)
    for method in method_order(points["method"]):
        rows = points[points.method == method].sort_values("seconds")
        color, marker = method_style(method)
        label = f"{method} (oracle)" if is_oracle(method) else method
        style = {"color": color, "marker": marker, "markersize": 5, "linewidth": 1.5, "label": label}
        ax_acc.plot(rows["seconds"], rows["accuracy_forget"] * 100, **style)
        ax_fd.plot(rows["seconds"], rows["fd_judge"], **style)
    if reference:
        style = {"color": "0.4", "linestyle": "--", "linewidth": 1, "label": "teacher (before unlearning)"}
        ax_acc.axhline(reference["accuracy_forget"] * 100, **style)
        ax_fd.axhline(reference["fd_judge"], **style)
    if _log_if_wide(points["seconds"]):
        ax_acc.set_xscale("log")
    ax_acc.set_ylabel("forget accuracy, % (lower is better)")
    ax_acc.set_ylim(-5, 105)
    ax_fd.set_ylabel("fd_judge on retained classes (lower is better)")
    if _log_if_wide(points["fd_judge"]):
        ax_fd.set_yscale("log")
    for ax in (ax_acc, ax_fd):
        ax.set_xlabel("wall-clock seconds of unlearning")
        ax.grid(alpha=0.3)
    fig.legend(*ax_acc.get_legend_handles_labels(), loc="outside right upper", fontsize=9, title="method")
    fig.suptitle(title, fontsize=11)
    return fig


# ---- all figures -----------------------------------------------------------------------------------------


def write_figures(df: pd.DataFrame, out: Path, run_dirs: dict[str, Path]) -> list[Path]:
    """Trade-off and wall-clock figures per (dataset, preset), a sample grid per (dataset, forget set, preset,
    seed) from the runs that kept samples, under each preset's main sampling condition."""
    from bench.report.tables import main_rows

    df = main_rows(df)
    paths = []
    for dataset, preset in sorted(df[["dataset", "preset"]].drop_duplicates().itertuples(index=False)):
        for kind, make in (("tradeoff", tradeoff_figure), ("wallclock", wallclock_figure)):
            fig = make(df, dataset, preset)
            if fig is not None:
                paths += save(fig, out, f"{kind}_{safe(dataset)}_{safe(preset)}")
    paths += write_sample_grids(df, out, run_dirs)
    return paths


def write_sample_grids(df: pd.DataFrame, out: Path, run_dirs: dict[str, Path]) -> list[Path]:
    paths, missing = [], []
    runs = df[["run_id", "method", "dataset", "forget_set", "preset", "seed", "condition"]].drop_duplicates(
        "run_id"
    )
    for (dataset, fs, preset, seed), group in runs.groupby(["dataset", "forget_set", "preset", "seed"]):
        grids: dict[str, dict[str, np.ndarray]] = {}  # grid key -> method -> images
        for row in group.itertuples(index=False):
            path = run_dirs.get(row.run_id, Path("/nonexistent")) / "samples.safetensors"
            if not path.is_file():
                missing.append(row.run_id)
                continue
            for key in grid_keys(path):
                try:
                    grids.setdefault(key, {})[row.method] = load_grid(path, key)
                except BenchError as e:
                    log.warning("skipped: %s", e)
        for key, by_method in grids.items():
            if len({g.shape for g in by_method.values()}) > 1:
                log.warning("sample grids of %s/%s seed %s differ in shape; skipping that figure", dataset, fs,
                            seed)  # fmt: skip
                continue
            kind = key.removeprefix("images").lstrip("_")  # the text tier's prompt kinds: "" or "paraphrase"
            class_names, forget = _classes(dataset, fs)
            text = "images_paraphrase" in grids  # the text tier's runs keep a grid per prompt kind
            prompts = f", {kind or 'training'} prompts" if kind or text else ""
            title = (f"{dataset}, forget {fs}, preset {preset}{sampled_at(group)}, seed {seed}{prompts} (image i "
                     "of a class: the same noise in every row)")  # fmt: skip
            fig = sample_grid_figure(by_method, class_names=class_names, forget=forget, title=title)
            name = f"samples_{safe(dataset)}_{safe(fs)}_{safe(preset)}_s{seed}" + (
                f"_{safe(kind)}" if kind else ""
            )
            paths += save(fig, out, name)
    if missing:
        log.info("%d runs kept no samples.safetensors (e.g. %s); the sample grids leave them out", len(missing),
                 missing[0])  # fmt: skip
    return paths


def _classes(dataset: str, forget_set: str) -> tuple[list[str], list[int]]:
    from bench.registry import DATASETS

    if dataset not in DATASETS:
        return [], []
    ds = DATASETS.get(dataset)()
    return list(ds.class_names), list(ds.forget_set(forget_set).forget)
