"""execute(spec): the one place that sequences load -> unlearn -> sample -> evaluate -> write."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import platform
import resource
import shutil
import subprocess
import time
from collections import defaultdict
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from bench import distributed, store
from bench.api import TRAIN_KIND, EvalContext, Measurement, SampleSet
from bench.config import RunSpec, resolve_config
from bench.context import RunContext, Runtime
from bench.data import make_dataset
from bench.errors import BenchError
from bench.files import share
from bench.models import store as model_store
from bench.presets import condition_name, get_preset
from bench.registry import DATASETS, EVALUATORS, METHODS
from bench.sampling import is_one_step
from bench.text.run import is_text, load_text_models, per_kind, text_eval_grid

log = logging.getLogger(__name__)

GRID_PER_CLASS = 8  # images per class kept as the run's sample grid (for `bench report`)
TEACHER_SEED = (
    0  # every run of a (dataset, preset) shares one teacher, so runs differ only by method and seed
)


def environment(device: torch.device) -> dict:
    """Provenance of a run: code revision, library versions, device."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        rev = ""
    libs = (
        "torch",
        "torchvision",
        "diffusers",
        "torchmetrics",
        "torch-fidelity",
        "transformers",
        "timm",
        "numpy",
        "unlearn-bench",
    )
    versions = {}
    for lib in libs:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = None
    return {"git_revision": rev, "python": platform.python_version(), "platform": platform.platform(),
            "device": str(device), "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch_threads": torch.get_num_threads(), "versions": versions}  # fmt: skip


def load_models(
    dataset, preset, *, teacher_path: str = "", device=None, amp: bool = False, judge_clip: str = ""
):
    """The (teacher, judge, info) for this dataset and preset, checksum-verified.

    They come from the model store (shipped, else the user's); when neither has them they are trained now with
    the recipe of models.store.recipe_preset() into the user store, and cached there for later runs.
    `teacher_path` (--teacher) replaces the teacher by an external diffusers UNet (on the text tier: a Stable
    Diffusion folder); the judge still comes from the store (trained alone when missing). `judge_clip` (the text
    tier's --judge clip) replaces the judge by a zero-shot one of that local CLIP folder.
    """
    device = device or torch.device("cpu")
    if is_text(dataset):
        return load_text_models(dataset, preset, seed=TEACHER_SEED, device=device, amp=amp,
                                teacher_path=teacher_path, judge_clip=judge_clip)  # fmt: skip
    recipe = model_store.recipe_preset(dataset.name, preset, TEACHER_SEED)
    found = model_store.find_models(dataset.name, recipe.model_key, TEACHER_SEED)
    shape = (dataset.channels, dataset.image_size, dataset.image_size)
    if teacher_path:
        teacher = model_store.load_external_teacher(Path(teacher_path), dataset=dataset.name, image_size=dataset.image_size,
                                                    channels=dataset.channels, num_classes=dataset.num_classes)  # fmt: skip
        from bench.pretrain import stored_judge

        judge_dir = stored_judge(dataset, recipe, seed=TEACHER_SEED, device=device)
        return teacher, model_store.load_judge(judge_dir), {"path": teacher_path, "judge": str(judge_dir)}
    if found is None:
        found = _train_models(dataset, recipe, device=device, amp=amp)
    manifest = model_store.verify(found)
    teacher, judge = model_store.load_teacher(found / "teacher"), model_store.load_judge(found / "judge")
    if teacher.image_shape != shape:
        raise BenchError(f"teacher in {found} makes {teacher.image_shape} images, dataset needs {shape}")
    return teacher, judge, {"path": str(found), "command": manifest.get("command")}


def _train_models(dataset, recipe, *, device, amp: bool) -> Path:
    """Pretrain the teacher and judge into the user store (waiting for another process that already does)."""
    from bench.pretrain import pretrain

    root = model_store.user_store()
    out = model_store.model_dir(root, dataset.name, recipe.model_key, TEACHER_SEED)
    with model_store.locked(out):
        if not (out / model_store.MANIFEST).is_file():
            t = recipe.teacher
            log.info("no teacher and judge for %s at preset %s: training them now with the %s recipe (teacher %d "
                     "steps at batch %d, judge %d epochs) into %s; later runs reuse them", dataset.name,
                     recipe.model_key, recipe.model_key, t.steps, t.batch_size, recipe.judge.epochs, out)  # fmt: skip
            torch.manual_seed(TEACHER_SEED)  # the teacher's initial weights come from the global generator
            # The manifest's recognisability check samples as many images per class as the preset's grid.
            pretrain(dataset, recipe, seed=TEACHER_SEED, out_root=root, device=device, amp=amp,
                     check_per_class=recipe.eval_per_class)  # fmt: skip
    return out


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with contextlib.suppress(OSError):  # Linux: writing 5 resets the process's peak resident set (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")


def process_memory_mb(field: str) -> float | None:
    """A memory figure of this process in MiB from /proc/self/status (Linux): VmRSS resident now, VmHWM its peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = process_memory_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Phases:
    """Wall-clock seconds of a run attempt by phase (its timings.json): model compute (unlearning less the
    harness's services, sampling, evaluation) versus everything else the harness does (loading, writing,
    bookkeeping), which `overhead_fraction` measures."""

    COMPUTE = ("unlearn_compute", "sample", "evaluate")

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._t0 = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0

    def summary(self) -> dict[str, float]:
        # Probes are the benchmark's time, not the run's.
        total = time.perf_counter() - self._t0 - self.seconds["probe"]
        compute = sum(self.seconds[k] for k in self.COMPUTE)
        return {**{f"{k}_s": v for k, v in sorted(self.seconds.items())}, "total_s": total,
                "overhead_s": total - compute, "overhead_fraction": (total - compute) / total}  # fmt: skip


def _finite(v) -> float | None:
    """A bound as JSON holds it: null rather than NaN (not JSON) where there is none."""
    return float(v) if v is not None and math.isfinite(v) else None


def eval_grid(num_classes: int, per_class: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """Labels and per-image seeds of the evaluation grid: image j of class c has the same seed in every method."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    seeds = [seed * 10_000_019 + c * 100_003 + j for c in range(num_classes) for j in range(per_class)]
    return labels, seeds


def teacher_weights(method_cls, teacher) -> dict:
    """Which teacher weights the method started from: its EMA weights, or its raw ones where the official code
    starts there and the teacher keeps them (the shipped default teacher has EMA weights only)."""
    wants = method_cls.starts_from
    used = "raw" if wants == "raw" and teacher.raw is not None else "ema"
    note = "" if used == wants else "the teacher keeps EMA weights only"
    return {"started_from": used, "official": wants, **({"note": note} if note else {})}


def sampling_fields(model, preset, guidance: float | None = None, steps: int | None = None) -> dict:
    """How the images were sampled, carried by every row (guidance and steps: the preset's unless given): a
    one-step generator takes no steps or guidance."""
    if is_one_step(model):
        return {"sampler": "one-step", "guidance": None}
    w = preset.guidance if guidance is None else guidance
    return {"sampler": f"ddim-{steps or preset.sampler_steps} eta {preset.eta:g}", "guidance": w}


def check_config(spec: RunSpec, d: Path) -> None:
    """Refuse a run folder made with another config than the code now resolves for its spec (a preset's scaling
    or a paper default changed since): its figures would not be what the spec means today, and resuming it
    would mix two configs. The run id hashes the spec, not the resolved config, so this is where it shows."""
    path = d / "spec.json"
    if not path.is_file():
        return  # nothing ran yet
    try:
        record = json.loads(path.read_text())
        saved = record["config"]
        same = all(record[k] == v for k, v in json.loads(json.dumps(spec.to_dict(), default=str)).items())
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise BenchError(f"broken run record {path} ({e!r}): rerun the run with --force (replaces it)") from e
    if not same:
        raise BenchError(f"run record {path} describes another run than its folder's id {spec.run_id} (edited?): "
                         "rerun the run with --force (replaces it)")  # fmt: skip
    config = resolve_config(METHODS.get(spec.method), spec.preset, dict(spec.overrides))
    now = json.loads(json.dumps(vars(config), default=str))
    changed = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if changed:
        diff = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
        raise BenchError(
            f"run {spec.run_id} in {d.parent} was made with another {spec.method} config than this code resolves "
            f"for preset {spec.preset} ({diff}): rerun it with --force (replaces it) or use another --results folder"
        )


def _help_unlearn(spec, d, runtime, method, teacher, preset, dataset, forget_set, world) -> Path:
    """A rank other than 0 of a data-parallel run: the same unlearning as rank 0 (which holds the same model at
    the end), on this rank's slice of every batch; its RunContext writes nothing."""
    torch.manual_seed(distributed.rank_seed(spec.seed, world))  # its own dropout masks
    ctx = RunContext(run_dir=d, seed=spec.seed, preset=preset, dataset=dataset, forget_set=forget_set,
                     requires=type(method).requires, runtime=runtime, world=world)  # fmt: skip
    teacher.unet.to(runtime.torch_device)
    method.unlearn(teacher, forget_set, ctx)
    return d


def execute(spec: RunSpec, results: Path, runtime: Runtime, *, force: bool = False) -> Path:
    """Run one spec to completion (resuming whatever an interrupted attempt left) and return its directory."""
    d = store.run_dir(results, spec.run_id)
    # With several ranks (bench/distributed.py) rank 0 alone writes, samples and evaluates; the others only help
    # a data-parallel method unlearn (_help_unlearn).
    world = distributed.current()
    if force and d.exists() and world.is_main:
        shutil.rmtree(d)
    if force:
        world.barrier()
    check_config(spec, d)
    preset = get_preset(spec.preset)
    if store.is_done(d):
        if evaluated_as_planned(spec, d):
            return d
        log.info("%s: evaluating its saved model again under %s (it was evaluated under %s)", spec.run_id,
                 ", ".join(condition_names(preset, spec.dataset)),
                 ", ".join(store.done_conditions(d) or ["the preset's guidance of its time"]))  # fmt: skip
        store.reopen(d)
    phases = Phases()
    device = runtime.torch_device
    dataset = make_dataset(spec.dataset, data_dir=runtime.data_dir, image_size=preset.image_size)
    forget_set = dataset.forget_set(spec.forget_set)
    data = dataset.data_identity()
    if spec.data and data["digest"] != spec.data:
        raise BenchError(f"the {spec.dataset} files in {data['root']} are not those run {spec.run_id} was planned on "
                         "(other names or sizes): check --data-dir / BENCH_DATA_DIR here")  # fmt: skip
    method_cls = METHODS.get(spec.method)
    if not world.is_main and (not method_cls.data_parallel or (d / "model" / "unlearn.json").is_file()):
        return d  # nothing for this rank to do: rank 0 runs a method that does not split its batch alone
    config = resolve_config(method_cls, spec.preset, dict(spec.overrides))
    evaluators = [EVALUATORS.get(name)() for name in spec.evaluators]
    anchors = method_cls(config).anchors(forget_set)
    with phases("load"):
        teacher, judge, teacher_info = load_models(dataset, preset, teacher_path=spec.teacher_path, device=device,
                                                   amp=runtime.amp, judge_clip=spec.judge_clip)  # fmt: skip
    if not world.is_main:
        return _help_unlearn(spec, d, runtime, method_cls(config), teacher, preset, dataset, forget_set,
                             world)  # fmt: skip
    d.mkdir(parents=True, exist_ok=True)  # only now: bad data or models leave no run folder behind
    store.write_json(d / "spec.json", {**spec.to_dict(), "run_id": spec.run_id, "config": vars(config),
                                       "teacher": teacher_info, "data_files": data, "forget": forget_set.forget,
                                       "anchor": forget_set.anchor, "anchors_used": anchors,
                                       "teacher_weights": teacher_weights(method_cls, teacher)})  # fmt: skip
    store.write_json(d / "env.json", {**environment(device), "ranks": world.size})

    torch.manual_seed(spec.seed)
    _reset_peak_memory(device)
    model_dir = d / "model"
    if (model_dir / "unlearn.json").is_file():  # unlearning finished before an interruption
        with phases("load"):
            model, unlearn_s = model_store.load_run_model(model_dir)  # checked against its checksums
            reused = model_store.run_model_reused(model_dir)
    else:
        ctx = RunContext(run_dir=d, seed=spec.seed, preset=preset, dataset=dataset, forget_set=forget_set,
                         requires=method_cls.requires, runtime=runtime,
                         world=world if method_cls.data_parallel else distributed.SINGLE)  # fmt: skip
        teacher.unet.to(device)
        log.info("%s: unlearning %s with %s", spec.run_id, forget_set.name, spec.method)
        with phases("unlearn_compute"):
            model = method_cls(config).unlearn(teacher, forget_set, ctx)
        phases.seconds["unlearn_compute"] -= ctx.service_s + ctx.probe_s
        phases.seconds["unlearn_service"] += ctx.service_s
        phases.seconds["probe"] += ctx.probe_s
        unlearn_s, reused = ctx.elapsed(), ctx.reused
        with phases("write"):
            tmp = d / "model.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model_store.save_run_model(
                model, tmp, unlearn_s=unlearn_s, reused=reused
            )  # unlearn.json records the checksums
            shutil.rmtree(model_dir, ignore_errors=True)
            tmp.rename(model_dir)
            shutil.rmtree(d / "state", ignore_errors=True)

    if is_text(dataset):
        per_class = per_kind(preset)
        conditions, labels, seeds, kinds = text_eval_grid(dataset.captions, per_class, spec.seed)
    else:
        per_class = preset.eval_per_class
        labels, seeds = eval_grid(dataset.num_classes, per_class, spec.seed)
        conditions, kinds = labels, None
    ectx = EvalContext(
        dataset=dataset,
        forget_set=forget_set,
        judge=judge,
        device=device,
        options={"fid_reference": preset.fid_reference, **dict(spec.options)},
        anchors=anchors,
        model_key=model_store.recipe_preset(dataset.name, preset, spec.seed).model_key,
        seed=spec.seed,
    )
    # What the method loaded from a cache instead of computing (a stored oracle, sfd-2stage's stage 1), and the
    # seconds it took when it was computed: unlearn_s is this run's own time.
    cached = {"reused": reused["what"] if reused else "", "reused_s": reused["seconds"] if reused else None}
    rows, outcomes = [], {}
    for guidance, names in sampling_plan(model, preset, spec.dataset):
        t0 = time.perf_counter()
        with phases("sample"), tqdm(total=len(seeds), desc=f"sampling the grid ({names[0]})", unit="img",
                                    mininterval=2, leave=False, disable=not runtime.progress) as bar:  # fmt: skip
            images = model.sample(conditions, seeds, steps=preset.sampler_steps, guidance=guidance, eta=preset.eta,
                                  device=device, amp=runtime.amp, progress=bar.update)  # fmt: skip
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        sample_s = time.perf_counter() - t0
        _check_finite(images, spec, d, model_dir)
        samples = SampleSet(images=images, labels=labels, nfe=model.nfe(steps=preset.sampler_steps, guidance=guidance),
                            sample_s=sample_s, unlearn_s=unlearn_s, peak_mem_mb=_peak_memory_mb(device),
                            kinds=kinds, prompts=conditions if kinds is not None else None)  # fmt: skip
        if names[0] == condition_name(preset.guidance):  # the main protocol's images: the run's sample grid
            _save_grid(samples, dataset.num_classes, per_class, d, phases)
        sampled = sampling_fields(model, preset, guidance) | cached
        for ev in evaluators:
            with phases("evaluate"):
                measured = [Measurement.of(item) for item in ev(samples, ectx)]
                extra = ev.row_fields(ectx)
            for condition in names:
                for m in measured:
                    rows.append(_row(spec, ev, m, method_cls, condition, sampled | extra))
                    if m.outcomes is not None:
                        outcomes[store.outcome_key(m.metric.key, condition)] = (m.outcomes, m.test)
    with phases("write"):
        store.write_outcomes(d, outcomes)  # before the metrics: DONE, written last, records both checksums
        store.write_metrics(d / "metrics.jsonl", rows)
    store.write_json(d / "timings.json", phases.summary())
    store.mark_done(d, conditions=condition_names(preset, spec.dataset))
    return d


def guidances(preset, dataset: str = "") -> tuple[float, ...]:
    """The guidance scales every run of this preset on `dataset` is evaluated at, main first. The text tier's runs
    only at the main one: another would double its sampling, the larger part of its default sweep's 15 minutes
    (README); its one-step generator (text-sfd) is read beside the multi-step models at their main guidance."""
    kind = dataset.partition(":")[0]  # textfolder:PATH is a text dataset; imagefolder:PATH is not
    if kind in DATASETS and is_text(DATASETS.get(kind)):
        return (preset.guidance,)
    return preset.conditions


def condition_names(preset, dataset: str = "") -> list[str]:
    """The conditions every run of this preset on `dataset` is evaluated under (the `condition` of its rows)."""
    return [condition_name(w) for w in guidances(preset, dataset)]


def sampling_plan(model, preset, dataset: str = "") -> list[tuple[float, list[str]]]:
    """(guidance, the conditions its samples serve) per sampling of the evaluation grid: a multi-step model is
    sampled once per condition, a one-step generator once for all (it takes no guidance)."""
    if is_one_step(model):
        return [(1.0, condition_names(preset, dataset))]
    return [(w, [condition_name(w)]) for w in guidances(preset, dataset)]


def evaluated_as_planned(spec: RunSpec, d: Path) -> bool:
    """Whether a finished run was evaluated under the conditions its preset asks for now (a run finished before
    the default preset sampled at guidance 3 was not: the next `bench run` evaluates its saved model again)."""
    return store.done_conditions(d) == condition_names(get_preset(spec.preset), spec.dataset)


def _check_finite(images: torch.Tensor, spec: RunSpec, d: Path, model_dir: Path) -> None:
    bad = int((~torch.isfinite(images.flatten(1)).all(1)).sum())
    if bad:  # NaN would crash the evaluators' linear algebra (a segfault in MKL), and inf mean nothing
        raise BenchError(
            f"the model produced non-finite images (NaN or inf in {bad} of {len(images)}): the method diverged; "
            f"see {d / 'train_log.jsonl'} for its losses, and lower its learning rate or change its config "
            f"(--set {spec.method}.NAME=VALUE; {d / 'spec.json'} has the config). The saved model is kept in "
            f"{model_dir}, so this run fails the same way until you rerun it with --force"
        )


def _save_grid(samples: SampleSet, num_classes: int, per_class: int, d: Path, phases: Phases) -> None:
    """The first GRID_PER_CLASS images of each class as 8-bit pixels (`bench report`'s sample grids): `images`,
    from the training prompts on the text tier, whose other prompt kinds get a grid each (`images_<kind>`)."""
    grids = {}
    for kind, images in samples.by_kind().items():
        grid = images.view(num_classes, per_class, *images.shape[1:])[:, :GRID_PER_CLASS]
        key = "images" if kind in ("", TRAIN_KIND) else f"images_{kind}"
        grids[key] = ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).contiguous()
    with phases("write"):
        save_file(grids, d / "samples.safetensors")
        share(d / "samples.safetensors")


def _row(spec: RunSpec, ev, m: Measurement, method_cls, condition: str, fields: dict) -> dict:
    """One tidy metric row: what was measured, its interval, and how the images were made."""
    low, high = (_finite(b) for b in m.ci) if m.ci is not None else (None, None)
    return {"run_id": spec.run_id, "method": spec.method, "dataset": spec.dataset, "forget_set": spec.forget_set,
            "seed": spec.seed, "evaluator": ev.name, "metric": m.metric.name, "subset": m.metric.subset,
            "value": float(m.value), "n": int(m.n), "higher_is_better": m.metric.higher_is_better,
            "unit": m.metric.unit, "ci_low": low, "ci_high": high, "ci_method": m.ci_method or None,
            "preset": spec.preset, "condition": condition, "evaluator_version": ev.version,
            "method_version": method_cls.version, **({"budget_s": spec.budget_s} if spec.budget_s else {}),
            **fields}  # fmt: skip
