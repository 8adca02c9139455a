"""Command-line interface: parsing and printing only; the work happens in runner, pretrain and report."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

from bench import teacher_commands
from bench.errors import BenchError, unknown

log = logging.getLogger("bench")

DEFAULT_RESULTS = Path("results") / "default"


SEEDS = range(-(2**31), 2**31)  # per-image seeds (runner.eval_grid) stay inside torch's 64-bit range


def _csv(value: str) -> list[str]:
    """A comma-separated list, duplicates dropped; an empty one is an error, not "all" or "none"."""
    items = list(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    if not items:
        raise argparse.ArgumentTypeError(
            "empty list: give at least one name (leave the flag out for the default)"
        )
    return items


def _seeds(value: str) -> list[int]:
    try:
        seeds = [int(v) for v in _csv(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected comma-separated integers, e.g. 0,1,2"
        ) from None
    if bad := [s for s in seeds if s not in SEEDS]:
        raise argparse.ArgumentTypeError(f"seed {bad[0]} is out of range ({SEEDS.start} .. {SEEDS.stop - 1})")
    return seeds


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a whole number of at least 1")
    return n


def _budgets(value: str) -> list[float]:
    try:
        budgets = [float(v) for v in _csv(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected comma-separated seconds, e.g. 15,30,60"
        ) from None
    if bad := [b for b in budgets if not (math.isfinite(b) and b > 0)]:
        raise argparse.ArgumentTypeError(f"budget {bad[0]:g}: expected a positive number of seconds")
    return list(dict.fromkeys(budgets))


def _runtime_args(p: argparse.ArgumentParser, device: str | None = "cpu") -> None:
    p.add_argument("--device", default=device, help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for model compute")
    p.add_argument("--data-dir", type=Path, default=None, help="folder with the datasets (or BENCH_DATA_DIR)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench", description="Benchmark machine unlearning in diffusion models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("ls", help="list methods, datasets with their forget sets, evaluators and presets")
    show = sub.add_parser("show", help="a method's card: paper, defaults with their sources, preset scaling")
    show.add_argument("name")

    # Options a sweep file can also give default to None here (a flag given wins over the file); RUN_DEFAULTS
    # fills the rest.
    run = sub.add_parser("run", help="run methods x datasets x forget sets x seeds and evaluate them")
    run.add_argument("--sweep", type=Path, default=None, metavar="FILE.toml",
                     help="a sweep file (sweeps/*.toml); flags given here override its keys")  # fmt: skip
    run.add_argument("--methods", type=_csv, default=None, help="comma-separated (default: all but oracles)")
    run.add_argument("--datasets", type=_csv, default=None,
                     help="comma-separated; imagefolder:PATH for a folder of labelled images, textfolder:PATH for one "
                          "with a captions.json of each class's words (the text tier)")  # fmt: skip
    run.add_argument("--forget-sets", type=_csv, default=None,
                     help="comma-separated (default: class-0); all-classes: class-0 .. class-(K-1)")  # fmt: skip
    run.add_argument("--seeds", type=_seeds, default=None, help="comma-separated integers (default: 0)")
    run.add_argument("--preset", default=None, help="smoke, default or paper (default: default)")
    run.add_argument("--budget-s", type=_budgets, default=None, metavar="S[,S...]",
                     help="matched budgets: every method unlearns for S reference seconds (its iterations from the "
                     "shipped calibration, bench/budget.py); several: one run per budget")  # fmt: skip
    run.add_argument("--evaluators", type=_csv, default=None, help="comma-separated (default: all)")
    run.add_argument("--launcher", default=None, choices=["inline", "local", "slurm"],
                     help="inline: in this process; local: --workers processes here; slurm: one job array")  # fmt: skip
    run.add_argument(
        "--cluster", default=None, help="slurm/NAME.toml preset (or a .toml path) for --launcher slurm"
    )
    run.add_argument("--wait", action="store_true", help="slurm: follow the jobs to the end (progress bar)")
    run.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="parallel processes for --launcher local (default: 2)",
    )
    run.add_argument("--nproc", type=_positive_int, default=None,
                     help="processes per run (local or slurm: one task per GPU), data-parallel (default: 1)")  # fmt: skip
    run.add_argument("--results", type=Path, default=None,
                     help=f"sweep folder (default: {DEFAULT_RESULTS}; with --sweep: the file's)")  # fmt: skip
    run.add_argument("--force", action="store_true", help="redo finished runs")
    run.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    run.add_argument("--set", dest="sets", action="append", default=[], metavar="METHOD.FIELD=VALUE",
                     help="a method setting (v1,v2: one run per value), or slurm.KEY=VALUE to override the "
                     "cluster preset")  # fmt: skip
    run.add_argument("--checkpoint-every", type=_positive_int, default=None,
                     help="steps between resumable state dumps (default: 50)")  # fmt: skip
    run.add_argument("--teacher", type=Path, default=None,
                     help="external teacher to unlearn: a diffusers class-conditional UNet2DModel folder (or "
                          "pipeline folder); on a text dataset, a Stable Diffusion pipeline folder")  # fmt: skip
    run.add_argument("--inception-weights", type=Path, default=None,
                     help="FID Inception-v3 weights: adds fid_inception (default: the file in the torch hub cache)")  # fmt: skip
    run.add_argument(
        "--clip-model", type=Path, default=None, help="transformers CLIP folder: enables clip_score"
    )
    run.add_argument("--judge", choices=["trained", "clip"], default=None,
                     help="text tier: what classifies the generations: the judge trained on the dataset's images "
                          "(default), or a zero-shot CLIP over its concepts' names (needs --clip-model)")  # fmt: skip
    run.add_argument("--fid-reference", choices=["train", "test"], default=None,
                     help="real images of the Frechet distances: the retained classes' train or test split "
                     "(default: the preset's; paper: train, as the papers)")  # fmt: skip
    _runtime_args(run, device=None)

    status = sub.add_parser(
        "status", help="each run of a sweep: pending, running, done or failed (with its log)"
    )
    status.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="sweep folder")

    rep = sub.add_parser("report", help="tables (CSV, Markdown, LaTeX) and figures (PNG, PDF) of results")
    rep.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help=f"default: {DEFAULT_RESULTS}")
    rep.add_argument("--out", type=Path, default=None, help="output folder (default: RESULTS/report)")
    rep.add_argument("--strict", action="store_true", help="fail on a broken metrics file, not skip it")

    pre = sub.add_parser("pretrain", help="train a dataset's teacher and judge into the model store")
    pre.add_argument("--dataset", default="fashion-mnist")
    pre.add_argument("--preset", default="default")
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument(
        "--out", type=Path, default=None, help="model store root (default: ~/.cache/unlearn-bench/models)"
    )
    pre.add_argument("--clip-only", action="store_true",
                     help="text tier: train only its tiny CLIP (the clip_score model), not the teacher")  # fmt: skip
    pre.add_argument("--launcher", default="inline", choices=["inline", "slurm"],
                     help="inline: here; slurm: a job of its own, requeued and resumed on a time limit")  # fmt: skip
    pre.add_argument(
        "--cluster", default=None, help="slurm/NAME.toml preset (or a .toml path) for --launcher slurm"
    )
    pre.add_argument("--set", dest="sets", action="append", default=[], metavar="slurm.KEY=VALUE",
                     help="override the cluster preset")  # fmt: skip
    pre.add_argument("--wait", action="store_true", help="slurm: wait for the job to end")
    pre.add_argument("--nproc", type=_positive_int, default=1,
                     help="inline: processes here (one per GPU) training the teacher data-parallel (default: 1)")  # fmt: skip
    _runtime_args(pre)
    imp = sub.add_parser("import-teacher", help="an official SA/SalUn/SFD DDPM checkpoint (ckpt.pth + config.yml) "
                         "as a teacher folder for --teacher")  # fmt: skip
    imp.add_argument(
        "ckpt", type=Path, help="the official ckpt.pth (read with torch.load(weights_only=True))"
    )
    imp.add_argument(
        "--config", type=Path, required=True, help="the run's config.yml (as configs/cifar10_train.yml)"
    )
    imp.add_argument(
        "--out", type=Path, required=True, help="teacher folder to write (EMA weights, raw/ the raw ones)"
    )
    from bench.attack import add_parser as add_attack_parser

    add_attack_parser(sub, csv=_csv, runtime_args=_runtime_args)
    perf = sub.add_parser("perf", help="performance benchmarks (JSON under results/benchmarks/)")
    from benchmarks import BENCHMARKS

    perf.add_argument("names", nargs="*", help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    perf.add_argument("--device", default="cpu")
    perf.add_argument("--amp", action="store_true", help="bf16 autocast")
    return parser


def cmd_ls(args) -> None:
    from bench.presets import PRESETS
    from bench.registry import ATTACKS, DATASETS, EVALUATORS, METHODS

    reads = {frozenset(): "none", frozenset({"forget"}): "forget only", frozenset({"retain"}): "retained only",
             frozenset({"forget", "retain"}): "forget and retained"}  # fmt: skip
    print(f"methods:\n  {'name':<14} {'tier':<6} {'real data':<20} paper")
    for name in METHODS:
        cls = METHODS.get(name)
        oracle = "(oracle) " if cls.oracle else "" if cls.default_sweep else "(run by name) "
        print(f"  {name:<14} {cls.tier:<6} {reads[frozenset(cls.requires)]:<20} {oracle}{cls.paper}")
    print("datasets (forget sets):")
    for name in DATASETS:
        ds = DATASETS.get(name)()
        if dataset_tier(ds) == "text":
            print(f"  {name:<18} text tier: {', '.join(ds.forget_sets())} (or class-K)")
            continue
        print(f"  {name:<18} {', '.join([*ds.forget_sets(), 'all-classes'])}")
    print("evaluators:")
    for name in EVALUATORS:
        ev = EVALUATORS.get(name)
        print(f"  {name:<16} {', '.join(f'{m.name}[{m.subset}]' for m in ev.metrics)}")
    print("attacks (bench attack, or --evaluators +robustness):")
    for name in ATTACKS:
        cls = ATTACKS.get(name)
        print(f"  {name:<18} {cls.tier:<6} {reads[frozenset(cls.requires)]:<20} {cls.title}: {cls.threat}")
    print("presets:")
    for p in PRESETS.values():
        print(f"  {p.name:<8} {p.description}")


def cmd_show(args) -> None:
    from bench.registry import METHODS

    card = METHODS.get(args.name).card()
    print(f"{card['name']}{' (oracle)' if card['oracle'] else ''}\n  paper: {card['paper']}")
    print(f"  requires real data: {', '.join(card['requires']) or 'none (data-free)'}")
    print("  defaults:")
    for field, (default, source) in card["defaults"].items():
        valid = card["valid"][field]
        print(f"    {field:<22} {default!s:<12} {source}{f'  [valid: {valid}]' if valid else ''}")
    for preset, s in card["scaled"].items():
        print(f"  preset {preset}: {json.dumps(s['overrides'])}\n    why: {s['why']}")
    print(f"  --budget-s: {_budget_text(METHODS.get(args.name))}")


def _budget_text(cls) -> str:
    """What --budget-s does with a method: the calibrated costs it divides by, or why it runs no budget."""
    from bench import budget

    if why := budget.not_budgeted(cls):
        return f"runs no budget: {why}"
    costs = [f"{k} {c[cls.name]['fixed_s']:.1f} s + {c[cls.name]['per_iteration_s']:.3f} s per iteration"
             for k, c in budget.calibrated().items() if cls.name in c]  # fmt: skip
    return ("iterations = (S - fixed) / per iteration, EMA decay with them (bench/budget.py); calibrated: "
            + ("; ".join(costs) or "no preset yet (python -m bench perf budget_calibration)"))  # fmt: skip


def make_specs(args):
    """Resolve names through the registries (unknown ones list the valid ones) into RunSpecs."""
    from bench.config import RunSpec, cli_choices, expand_sets, resolve_config
    from bench.data import canonical_name, forget_set_names, make_dataset
    from bench.models.store import check_external_teacher
    from bench.presets import get_preset
    from bench.registry import METHODS
    from bench.text.stable_diffusion import check_pipeline_teacher

    preset = get_preset(args.preset)
    methods = args.methods or [
        m for m in METHODS if not METHODS.get(m).oracle and METHODS.get(m).default_sweep
    ]
    classes = {m: METHODS.get(m) for m in methods}
    datasets = {n: make_dataset(n, data_dir=args.data_dir, image_size=preset.image_size)
                for n in map(canonical_name, args.datasets)}  # fmt: skip
    tiers = {n: dataset_tier(ds) for n, ds in datasets.items()}
    if args.methods:  # a method named for datasets none of which is of its tier is a mistake, not a skip
        for m, cls in classes.items():
            if not any(_fits(cls, t) for t in tiers.values()):
                valid = [n for n in METHODS if any(_fits(METHODS.get(n), t) for t in tiers.values())]
                raise BenchError(f"method {m} is of the {cls.tier} tier and --datasets {','.join(tiers)} of the "
                                 f"{'/'.join(sorted(set(tiers.values())))} tier; valid: {', '.join(valid)}")  # fmt: skip
    evaluators_of = _evaluators(args, tiers.values())
    configs = {m: c.Config for m, c in classes.items()}
    sweep = getattr(args, "sweep_file", None)
    # The file's [set], then the command line's --set (the same method.field: the command line's values).
    choices = {**(sweep.choices(configs) if sweep else {}), **cli_choices(args.sets, configs)}
    combos = expand_sets(choices, configs)  # per method: every combination of its swept settings
    teacher = getattr(args, "teacher", None)
    teacher_path = str(teacher.expanduser().resolve()) if teacher else ""
    budgets = getattr(args, "budget_s", None) or [0.0]
    specs, left_out = [], {}
    for ds_name, ds in datasets.items():
        tier_classes = {m: cls for m, cls in classes.items() if _fits(cls, tiers[ds_name])}
        if teacher and tiers[ds_name] == "text":  # a Stable Diffusion folder: the methods that run on one
            check_pipeline_teacher(
                teacher, dataset=ds_name, shape=(ds.channels, ds.image_size, ds.image_size)
            )
            tier_classes = _on_stable_diffusion(tier_classes, named=bool(args.methods))
        evaluators, options = evaluators_of[tiers[ds_name]]
        data = ds.data_identity()["digest"]
        if teacher and tiers[ds_name] == "class":  # checked per dataset; in the runs' identity as a path
            check_external_teacher(teacher, dataset=ds_name, image_size=ds.image_size, channels=ds.channels,
                                   num_classes=ds.num_classes)  # fmt: skip
        # Aliases (class-00, classes-0-0) are the same forget set, so they get its name and its run id.
        names = forget_set_names(ds, args.forget_sets)
        for forget_set in {fs.name: fs for fs in map(ds.forget_set, names)}.values():
            fs_name = forget_set.name
            for m, overrides, budget_s in _budgeted(
                tier_classes, combos, budgets, args.preset, ds_name, left_out
            ):
                # Fail on bad values before any run starts, so no earlier result is touched.
                classes[m](resolve_config(classes[m], args.preset, overrides)).validate(forget_set)
                for seed in args.seeds:
                    specs.append(RunSpec(method=m, dataset=ds_name, forget_set=fs_name, seed=seed,
                                         preset=args.preset, overrides=tuple(sorted(overrides.items())),
                                         evaluators=evaluators, teacher_path=teacher_path,
                                         options=options, data=data, budget_s=budget_s))  # fmt: skip
        if not args.dry_run:
            ds.check()
    for (m, why), seconds in left_out.items():
        log.warning("--budget-s %s: %s left out: %s", ",".join(f"{b:g}" for b in seconds), m, why)
    if not specs:
        raise BenchError("--budget-s: no method of the sweep can run these budgets (see above)")
    return list(dict.fromkeys(specs))  # 1e-5,1e-05 are one value, so one run


def dataset_tier(dataset) -> str:
    """ "text" for a dataset with captions (bench/text/), else "class"."""
    from bench.text.run import is_text

    return "text" if is_text(dataset) else "class"


def _fits(method_cls, tier: str) -> bool:
    return method_cls.tier in (tier, "any")


def _on_stable_diffusion(classes: dict, *, named: bool) -> dict:
    """The methods of a sweep that run on a Stable Diffusion teacher; one named on the command line that does not
    is an error (the default sweep leaves those out)."""
    from bench.registry import METHODS

    fit = {m: cls for m, cls in classes.items() if cls.stable_diffusion}
    if named and len(fit) < len(classes):
        valid = [m for m in METHODS if METHODS.get(m).stable_diffusion]
        raise BenchError(f"--teacher: {', '.join(m for m in classes if m not in fit)} cannot run on a Stable "
                         f"Diffusion teacher in this version (the README's text tier says why); valid: {', '.join(valid)}")  # fmt: skip
    return fit


def _budgeted(classes, combos, budgets, preset, dataset, left_out):
    """(method, overrides, budget) per run of a forget set: the swept settings, and under --budget-s the
    iterations each budget resolves to (bench/budget.py). A method that cannot run a budget is left out, and
    why is collected in left_out[(method, why)] -> budgets."""
    from bench import budget

    for m, cls in classes.items():
        for overrides in combos.get(m, [{}]):
            for seconds in budgets:
                if not seconds:
                    yield m, overrides, 0.0
                elif why := budget.fits(cls, preset, dataset, seconds):
                    left_out.setdefault((m, why), []).append(seconds)
                else:
                    yield (
                        m,
                        {**overrides, **budget.overrides(cls, preset, dataset, seconds, overrides)},
                        seconds,
                    )


def _evaluators(args, tiers) -> dict[str, tuple[tuple[str, ...], tuple[tuple[str, str], ...]]]:
    """Per dataset tier: the evaluators to run and the options they read (weights paths), checked before any run
    starts.

    By default: every evaluator except those that need an option the user did not give and the tier does not ship
    (clip_score without --clip-model on the class tier; the text tier ships its tiny CLIP); one named in
    --evaluators without its option is an error.
    """
    from bench.attack import evaluator_names
    from bench.registry import EVALUATORS

    given = {"inception_weights": getattr(args, "inception_weights", None),
             "fid_reference": getattr(args, "fid_reference", None),
             "clip_model": getattr(args, "clip_model", None)}  # fmt: skip
    out, used = {}, set()
    for tier in dict.fromkeys(tiers):
        classes = {e: EVALUATORS.get(e) for e in EVALUATORS}
        defaults = [
            e for e, c in classes.items() if not c.needs or given.get(c.needs) or tier in c.shipped_for
        ]
        names = evaluator_names(
            args.evaluators, defaults
        )  # '+NAME' adds to the defaults; attacks are left out
        options: dict[str, str] = {}
        for e in names:
            options.update(EVALUATORS.get(e).resolve_options(given, tier))
        if getattr(args, "judge", None) == "clip":
            options.update(_zero_shot_judge(given, tier))
            used.add("clip_model")
        used |= set(options)
        out[tier] = (tuple(names), tuple(sorted(options.items())))
    for key, value in given.items():
        if value and key not in used:
            log.warning("--%s is unused: no evaluator in --evaluators reads it", key.replace("_", "-"))
    return out


def _zero_shot_judge(given: dict, tier: str) -> dict[str, str]:
    """--judge clip: the run option naming the CLIP folder of its zero-shot judge (bench/text/zero_shot.py)."""
    from bench.config import JUDGE_CLIP
    from evaluators.clip_score import check_clip_dir

    if tier != "text":
        raise BenchError("--judge clip: a zero-shot judge over concept names is the text tier's; the class tier's "
                         "datasets are judged by their trained judge")  # fmt: skip
    if not given.get("clip_model"):
        raise BenchError("--judge clip needs --clip-model DIR, the local CLIP folder it classifies with")
    return {JUDGE_CLIP: str(check_clip_dir(Path(given["clip_model"])))}


def summary_table(rows, results: Path | None = None) -> str:
    """A compact pivot of result rows: one line per (dataset, forget set, method), mean over seeds; runs that
    differ by a swept setting are rows of their own (sweep.label_swept)."""
    import pandas as pd

    from bench import store
    from bench.report.tables import with_condition
    from bench.sweep import label_swept

    df = with_condition(pd.DataFrame(rows))
    if results is not None:
        df = label_swept(df, {rid: store.run_dir(results, rid) for rid in df["run_id"].unique()})
    df["column"] = df["metric"] + "[" + df["subset"] + "]"
    keep = ["accuracy[forget]", "accuracy[retain]", "to_anchor[forget]", "fd_judge[retain]", "unlearn_s[all]",
            "images_per_s[all]", "nfe[all]"]  # fmt: skip
    order = list(dict.fromkeys(df["method"]))
    # A row per sampling condition ("guidance 3"), and per budget under --budget-s.
    index = [
        "dataset",
        "forget_set",
        "condition",
        *(["budget_s"] if "budget_s" in df.columns else []),
        "method",
    ]
    df = df.fillna({"budget_s": 0.0}) if "budget_s" in df.columns else df
    table = df.pivot_table(index=index, columns="column", values="value", aggfunc="mean", sort=False)
    table = table[[c for c in keep if c in table.columns] + [c for c in table.columns if c not in keep]]
    table = table.reindex(sorted(table.index, key=lambda i: (*i[:-1], order.index(i[-1]))))
    seeds = df.groupby(index)["seed"].nunique()
    table.insert(0, "seeds", seeds.reindex(table.index).values)
    return table.to_string(float_format=lambda v: f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}")


# What `bench run` does for an option neither the command line nor a sweep file gives.
RUN_DEFAULTS = {"datasets": ["fashion-mnist"], "forget_sets": ["class-0"], "seeds": [0], "preset": "default",
                "launcher": "inline", "workers": 2, "nproc": 1, "results": DEFAULT_RESULTS, "device": "cpu",
                "checkpoint_every": 50}  # fmt: skip


def cmd_run(args) -> None:
    from bench import attack, launch, status, store, sweep
    from bench.context import Runtime

    sweep.resolve_args(args, RUN_DEFAULTS)
    attacks = attack.requested(args.evaluators)  # --evaluators +robustness: bench/attack.py, after the runs
    args.methods = attack.with_controls(args.methods, attacks)
    cluster_sets = [s for s in args.sets if s.startswith("slurm.")]  # the cluster preset's, not a method's
    args.sets = [s for s in args.sets if not s.startswith("slurm.")]
    if args.results.exists() and not args.results.is_dir():
        raise BenchError(f"--results {args.results} is a file, not a sweep folder")
    specs = make_specs(args)
    plan = launch.plan(specs, args.results, force=args.force)
    print(f"{len(specs)} runs, {len(plan.todo)} to do, {len(plan.active)} queued or running, "
          f"sweep folder {args.results}")  # fmt: skip
    if args.dry_run:
        for s in specs:
            state = "todo" if s in plan.todo else "queued" if s in plan.active else "done"
            settings = " ".join([*([f"budget={s.budget_s:g}s"] if s.budget_s else []),
                                 *(f"{k}={v}" for k, v in s.overrides)])  # fmt: skip
            print(f"  {state}  {s.run_id}{f'  {settings}' if settings else ''}")
        return
    if args.sweep_file and (record := sweep.write_record(args.results, args.sweep_file, specs)):
        print(f"resolved sweep written to {record}")
    runtime = Runtime(device=args.device, amp=args.amp, data_dir=args.data_dir, checkpoint_every=args.checkpoint_every,
                      progress=sys.stderr.isatty(), nproc=args.nproc)  # fmt: skip
    if args.launcher != "slurm":  # on SLURM the device is the compute node's, checked in the job
        runtime.check()
    if plan.todo:  # a finished sweep in a read-only folder can still be listed
        store.writable_dir(args.results, "--results")
    launched = launch.launch(plan.todo, args.results, runtime, launcher=args.launcher, cluster=args.cluster,
                             cluster_sets=cluster_sets, workers=args.workers, force=args.force)  # fmt: skip
    launch.print_launched(launched, args.results)
    if args.launcher == "slurm":
        if not args.wait:
            print(
                f"follow with: bench status --results {args.results}"
                if launched.job_ids
                else "nothing to submit"
            )
            return
        launched.states = status.follow(args.results, [s.run_id for s in plan.todo + plan.active])
    if attacks:
        attack.after_run(args.results, specs, runtime, attacks)
    if not launched.states:
        return
    done = [s.run_id for s in launched.states.values() if s.state == "done"]
    rows = [r for rid in done for r in store.read_metrics(store.run_dir(args.results, rid) / "metrics.jsonl")]
    if rows:
        print(summary_table(rows, args.results))
    held = {rid: s for rid, s in launched.states.items() if s.state in ("pending", "running")}
    if held:  # another `bench run` took them first: they are its to finish
        print(f"{len(held)} runs are held by another process; `bench status --results {args.results}` follows "
              f"them:\n{status.format_states(held)}")  # fmt: skip
    failed = {rid: s for rid, s in launched.states.items() if s.state not in ("done", "pending", "running")}
    if failed:
        raise BenchError(f"{len(failed)} of {len(launched.states)} runs did not finish; rerun the same command "
                         f"to retry them:\n{status.format_states(failed)}")  # fmt: skip


def cmd_status(args) -> None:
    from bench import status

    if not (args.results / "runs").is_dir():
        raise BenchError(f"--results {args.results}: no runs there (expected {args.results / 'runs'}/RUN_ID)")
    print(status.format_states(status.run_states(args.results)))


def cmd_perf(args) -> None:
    import importlib

    from bench.context import Runtime
    from benchmarks import BENCHMARKS

    for name in args.names or list(BENCHMARKS):
        if name not in BENCHMARKS:
            raise unknown("benchmark", name, BENCHMARKS)
    from benchmarks.common import write_summary

    device = Runtime(device=args.device).torch_device
    tables, t0 = {}, time.perf_counter()
    for name in args.names or list(BENCHMARKS):
        print(f"== {name}")
        module = importlib.import_module(BENCHMARKS[name])
        tables[name] = module.table(module.run(device, amp=args.amp))
    path = write_summary(tables, argv=sys.argv[1:], seconds=time.perf_counter() - t0)
    print(f"== all tables: {path}")


def cmd_attack(args) -> None:
    from bench.attack import cmd_attack as attack

    attack(args)


def cmd_report(args) -> None:
    from bench.report import make_report

    report = make_report(args.results, args.out, strict=args.strict)
    print(report.markdown)
    print("wrote:")
    for path in report.paths:
        print(f"  {path}")


COMMANDS = {
    "ls": cmd_ls,
    "show": cmd_show,
    "run": cmd_run,
    "pretrain": teacher_commands.cmd_pretrain,
    "status": cmd_status,
    "report": cmd_report,
    "perf": cmd_perf,
    "import-teacher": teacher_commands.cmd_import_teacher,
    "attack": cmd_attack,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("diffusers", "torchmetrics", "timm"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        COMMANDS[args.command](args)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    except OSError as e:  # a folder or file the user pointed at that cannot be read or written
        where = f" {e.filename}" if e.filename else ""
        print(f"error: cannot access{where}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0
