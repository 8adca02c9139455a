"""Robustness attacks on finished runs (`bench attack`, `bench run --evaluators +robustness`): load a run's saved
model (checksummed), the judge and only the data each attack's threat model allows, and write its rows atomically
into the run folder, never inside model/ and under no name the report's or the runner's records read:

  RUN/robustness/<attack>/rows.jsonl   tidy rows (as metrics.jsonl's, plus the attack's parameters)
  RUN/robustness/<attack>/DONE         written last: version, config, the rows' sha256, seconds, what did not apply
  RUN/robustness/<attack>/state/       the resumable dump while it runs (removed when it finishes)

A finished attack is skipped; a killed one resumes from its last dump to the same rows.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.config import JUDGE_CLIP
from bench.errors import BenchError

log = logging.getLogger(__name__)

FOLDER = "robustness"
SUITE = "robustness"  # `--evaluators +robustness`: every attack
# Why an attack of one tier does not apply to a run of the other (Attack.tier; bench/text).
TEXT_TIER = "the attack probes class labels; the text tier's is textual-inversion"
CLASS_TIER = "textual inversion adds a word to a text encoder, and a class-conditional model has none"
DONE = "DONE"
ROWS = "rows.jsonl"
ERROR = "error.txt"
CONTROLS = ("original", "retrain")


# --evaluators: attacks are requested there but are no evaluator of the run (they do not enter its id) ----------


def _attack_names() -> list[str]:
    from bench.registry import ATTACKS

    return ATTACKS.names()


def requested(names: Sequence[str] | None) -> tuple[str, ...]:
    """The attacks `--evaluators` asks for: `robustness` (all of them) or attack names, with or without '+'."""
    out: list[str] = []
    for n in (v.lstrip("+") for v in names or ()):
        out += _attack_names() if n == SUITE else [n] if n in _attack_names() else []
    return tuple(dict.fromkeys(out))


def evaluator_names(names: Sequence[str] | None, defaults: list[str]) -> list[str]:
    """The run's evaluators: the defaults unless named; '+NAME' adds to the defaults; attacks are left out (a run
    always has its own evaluation: naming attacks alone keeps the defaults)."""
    if not names:
        return list(defaults)
    attacks = {SUITE, *_attack_names()}
    plus = any(n.startswith("+") for n in names)
    rest = [n.lstrip("+") for n in names if n.lstrip("+") not in attacks]
    return list(dict.fromkeys([*defaults, *rest])) if plus or not rest else rest


def with_controls(methods: list[str] | None, attacks: Sequence[str]) -> list[str] | None:
    """Without --methods, an attacked sweep also runs the oracle (`retrain`; `original` is a default method): the
    attacks mean something only beside the ceiling and the model that never saw the class."""
    if methods is not None or not attacks:
        return methods
    from bench.registry import METHODS

    log.info("robustness: the sweep includes the controls %s (the oracle comes from the model store where it is "
             "kept, else it trains once)", " and ".join(CONTROLS))  # fmt: skip
    return [m for m in METHODS if not METHODS.get(m).oracle or m in CONTROLS]


# One run ---------------------------------------------------------------------------------------------------


def rows_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_done(d: Path) -> dict | None:
    try:
        record = json.loads((d / DONE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise BenchError(f"broken attack record {d / DONE} ({e}): rerun with `bench attack --force`") from e
    return record if isinstance(record, dict) else None


def _config_json(config) -> dict:
    return json.loads(json.dumps(vars(config), default=str))


def _finished(d: Path, cls, config) -> bool:
    """Whether the attack finished with this version and config; one made otherwise is refused, not mixed."""
    record = read_done(d)
    if record is None:
        return False
    if record.get("version") != cls.version or record.get("config") != _config_json(config):
        raise BenchError(f"attack {cls.name} in {d} was made with another version or config than this code's: "
                         "rerun it with `bench attack --force` (replaces it)")  # fmt: skip
    return True


def _row(spec: dict, cls, model, f, sampled: dict) -> dict[str, Any]:
    m = f.metric
    return {"run_id": spec["run_id"], "method": spec["method"], "dataset": spec["dataset"],
            "forget_set": spec["forget_set"], "seed": spec["seed"], "evaluator": cls.name, "metric": m.name,
            "subset": m.subset, "value": float(f.value), "n": int(f.n), "higher_is_better": m.higher_is_better,
            "unit": m.unit, "preset": spec["preset"], "evaluator_version": cls.version, "kind": "attack",
            "threat": cls.threat, "model_kind": model.kind, **sampled, **f.params}  # fmt: skip


class _Loaded:
    """What every attack of a run shares: its spec and preset at once; the dataset, forget set, teacher and judge
    when an attack first needs them; the cache of the teacher's reference figures."""

    def __init__(self, run_dir: Path, runtime):
        from bench.presets import get_preset

        self.runtime = runtime
        try:
            self.spec = json.loads((run_dir / "spec.json").read_text())
        except (OSError, ValueError) as e:
            raise BenchError(f"cannot read {run_dir / 'spec.json'} ({e}): is {run_dir} a run folder?") from e
        self.preset = get_preset(self.spec["preset"])
        self.cache: dict[str, Any] = {}
        self._models = None

    def models(self):
        """(dataset, forget set, teacher, judge), loaded and checked once."""
        if self._models is None:
            from bench.data import make_dataset
            from bench.runner import load_models

            spec, runtime = self.spec, self.runtime
            dataset = make_dataset(
                spec["dataset"], data_dir=runtime.data_dir, image_size=self.preset.image_size
            )
            data = dataset.data_identity()
            if spec.get("data") and data["digest"] != spec["data"]:
                raise BenchError(f"the {spec['dataset']} files in {data['root']} are not those run "
                                 f"{spec['run_id']} was made on: check --data-dir / BENCH_DATA_DIR")  # fmt: skip
            teacher, judge, _ = load_models(dataset, self.preset, teacher_path=spec.get("teacher_path", ""),
                                            device=runtime.torch_device, amp=runtime.amp,
                                            judge_clip=spec.get("options", {}).get(JUDGE_CLIP, ""))  # fmt: skip
            teacher.unet.to(runtime.torch_device)
            self._models = (dataset, dataset.forget_set(spec["forget_set"]), teacher, judge)
        return self._models


def _attack_one(run_dir: Path, name: str, loaded: _Loaded, runtime) -> str:
    from attacks.base import AttackContext, Resume
    from bench import store
    from bench.config import resolve_config
    from bench.context import RunContext
    from bench.models.store import load_run_model
    from bench.registry import ATTACKS
    from bench.runner import sampling_fields

    cls = ATTACKS.get(name)
    spec, preset = loaded.spec, loaded.preset
    config = resolve_config(cls, spec["preset"], {})
    d = run_dir / FOLDER / name
    if _finished(d, cls, config):
        return "done"
    dataset, forget_set, teacher, judge = loaded.models()
    model, _ = load_run_model(run_dir / "model")  # a fresh copy, checked against its checksums
    attack = cls(config)
    tier = "text" if model.kind.startswith("text-") else "class"
    reason = attack.applies(model) if cls.tier == tier else TEXT_TIER if tier == "text" else CLASS_TIER
    skipped = attack.not_applicable(model) if cls.tier == tier else {}
    rows, t0 = [], time.perf_counter()
    d.mkdir(parents=True, exist_ok=True)
    if not reason:
        ctx = RunContext(run_dir=d, seed=spec["seed"], preset=preset, dataset=dataset, forget_set=forget_set,
                         requires=cls.requires, runtime=runtime)  # fmt: skip
        actx = AttackContext(run=ctx, judge=judge, teacher=teacher, preset=preset, _cache=loaded.cache)
        model.unet.to(runtime.torch_device)
        findings = attack.run(model, actx, Resume(ctx))
        sampled = sampling_fields(model, preset, preset.attack_guidance, preset.attack_sampler_steps)
        rows = [_row(spec, cls, model, f, sampled) for f in findings]
    seconds = time.perf_counter() - t0
    store.write_metrics(d / ROWS, rows)
    store.write_json(d / DONE, {"attack": name, "version": cls.version, "config": _config_json(config),
                                "threat": cls.threat, "rows": len(rows), "rows_sha256": rows_sha(d / ROWS),
                                "seconds": seconds, "model_kind": model.kind,
                                **({"does_not_apply": reason} if reason else {}),
                                **({"not_applicable": skipped} if skipped else {})})  # fmt: skip
    shutil.rmtree(d / "state", ignore_errors=True)
    (d / ERROR).unlink(missing_ok=True)
    return f"does not apply: {reason}" if reason else "done"


def attack_run(run_dir: Path, names: Sequence[str], runtime, *, force: bool = False) -> dict[str, str]:
    """Run the named attacks on one finished run: attack -> 'done', 'does not apply: ...', 'failed: ...', or
    'held' (another process attacks this run now)."""
    from bench import store

    run_dir = Path(run_dir)
    if not store.is_done(run_dir):
        return dict.fromkeys(names, "skipped: the run is not finished")
    out = run_dir / FOLDER
    out.mkdir(exist_ok=True)
    with open(out / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return dict.fromkeys(names, "held by another process")
        if force:
            for name in names:
                shutil.rmtree(out / name, ignore_errors=True)
        loaded = _Loaded(run_dir, runtime)
        status = {}
        for name in names:
            try:
                status[name] = _attack_one(run_dir, name, loaded, runtime)
            except BenchError:
                raise
            except Exception as e:
                (out / name).mkdir(parents=True, exist_ok=True)
                store.atomic_write_text(out / name / ERROR, traceback.format_exc())
                status[name] = f"failed: {e!r} (traceback in {out / name / ERROR})"
    return status


def attack_sweep(results: Path, names: Sequence[str], runtime, *, run_ids: Sequence[str] | None = None,
                 force: bool = False) -> dict[str, dict[str, str]]:  # fmt: skip
    """Attack every finished run of a sweep folder (or those of `run_ids`): run id -> attack -> status."""
    root = Path(results) / "runs"
    if not root.is_dir():
        raise BenchError(f"--results {results}: no runs there (expected {root}/RUN_ID)")
    ids = sorted(p.name for p in root.iterdir() if p.is_dir()) if run_ids is None else list(run_ids)
    out = {}
    for i, rid in enumerate(ids, 1):
        log.info("[%d/%d] attacking %s: %s", i, len(ids), rid, ", ".join(names))
        out[rid] = attack_run(root / rid, names, runtime, force=force)
    missing = _missing_controls(results)
    if missing:
        log.warning("robustness: %s: the attacks on the other methods are read against it", missing)
    return out


def _missing_controls(results: Path) -> str:
    """Which controls no run of the sweep folder is (the report reads every run there)."""
    from bench.registry import DATASETS
    from bench.text.run import is_text

    methods = set()
    for d in (Path(results) / "runs").iterdir():
        try:
            spec = json.loads((d / "spec.json").read_text())
        except (OSError, ValueError):
            continue
        dataset = DATASETS.get(spec["dataset"]) if spec.get("dataset") in DATASETS else None
        if not is_text(dataset):  # the controls are the class tier's: the text tier has no retrain
            methods.add(spec.get("method"))
    lacking = [m for m in CONTROLS if m not in methods]
    return f"the sweep has no {' or '.join(lacking)} run (add it to --methods)" if lacking and methods else ""


def format_status(status: dict[str, dict[str, str]]) -> str:
    lines = [f"{rid}  " + ", ".join(f"{a}: {s}" for a, s in per.items()) for rid, per in status.items()]
    counts: dict[str, int] = {}
    for per in status.values():
        for s in per.values():
            counts[s.split(":")[0]] = counts.get(s.split(":")[0], 0) + 1
    lines.append(f"{len(status)} runs: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return "\n".join(lines)


def raise_failures(status: dict[str, dict[str, str]]) -> None:
    failed = {rid: per for rid, per in status.items() if any(s.startswith("failed") for s in per.values())}
    if failed:
        raise BenchError(f"attacks failed on {len(failed)} runs; rerun the same command to retry them:\n"
                         f"{format_status(failed)}")  # fmt: skip


# Reading ---------------------------------------------------------------------------------------------------


def load_rows(results: Path) -> list[dict]:
    """Every finished attack's rows under `results` (a file that does not match its DONE's checksum is skipped
    with a warning naming it)."""
    rows = []
    for done in sorted(Path(results).glob(f"**/{FOLDER}/*/{DONE}")):  # as the report finds metrics.jsonl
        d = done.parent
        record = read_done(d)
        path = d / ROWS
        if not record or not path.is_file() or rows_sha(path) != record.get("rows_sha256"):
            log.warning("skipped %s: it does not match the checksum in %s", path, done)
            continue
        try:
            found = [json.loads(line) for line in path.read_text().splitlines()]
        except (OSError, ValueError) as e:
            raise BenchError(f"broken attack rows {path}: {e}; rerun with `bench attack --force`") from e
        run_id = d.parent.parent.name
        if any(not isinstance(r, dict) or r.get("run_id") != run_id for r in found):
            raise BenchError(f"broken attack rows {path}: not all rows are of its run {run_id}")
        rows += found
    return rows


# The command -----------------------------------------------------------------------------------------------


def add_parser(sub, *, csv, runtime_args) -> None:
    """`bench attack --results DIR [--attacks a,b] [--force]` (called by bench.cli.build_parser)."""
    from bench.cli import DEFAULT_RESULTS

    p = sub.add_parser("attack", help="robustness attacks on the finished runs of a sweep (without unlearning "
                       "again): relearning, embedding inversion, concealment, sampling conditions")  # fmt: skip
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="sweep folder")
    p.add_argument("--attacks", type=csv, default=None, help="comma-separated (default: all)")
    p.add_argument("--runs", type=csv, default=None, help="run ids (default: every finished run)")
    p.add_argument("--force", action="store_true", help="redo finished attacks")
    p.add_argument("--cards", action="store_true", help="print each attack's card (threat model, sources, how it "
                   "applies to one-step generators, defaults) and exit")  # fmt: skip
    runtime_args(p)


def format_card(card: dict) -> str:
    lines = [f"{card['name']}: {card['title']}", f"  threat model: {card['threat']}",
             f"  real data it reads: {', '.join(card['requires']) or 'none'}", f"  sources: {card['sources']}",
             f"  one-step generators: {card['one_step']}", f"  metrics: {', '.join(card['metrics'])}", "  defaults:"]  # fmt: skip
    lines += [f"    {k:<16} {v!s:<20} {src}" for k, (v, src) in card["defaults"].items()]
    lines += [f"  preset {p}: {json.dumps(s['overrides'])} ({s['why']})" for p, s in card["scaled"].items()]
    return "\n".join(lines)


def cmd_attack(args) -> None:
    import sys

    from bench.context import Runtime
    from bench.registry import ATTACKS

    names = args.attacks or ATTACKS.names()
    for n in names:
        ATTACKS.get(n)  # unknown names list the valid ones
    if args.cards:
        print("\n\n".join(format_card(ATTACKS.get(n).card()) for n in names))
        return
    runtime = Runtime(device=args.device, amp=args.amp, data_dir=args.data_dir, progress=sys.stderr.isatty())
    runtime.check()
    status = attack_sweep(args.results, names, runtime, run_ids=args.runs, force=args.force)
    print(format_status(status))
    raise_failures(status)


def after_run(results: Path, specs, runtime, attacks: Sequence[str]) -> None:
    """`bench run --evaluators +robustness`: attack the sweep's finished runs once its runs are launched."""
    status = attack_sweep(results, attacks, runtime, run_ids=[s.run_id for s in specs])
    print(format_status(status))
    raise_failures(status)
