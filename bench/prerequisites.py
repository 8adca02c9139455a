"""What a sweep needs before its runs can start (a dataset's teacher and judge, a method's per-teacher cache such
as SA's replay and Fisher), found up front so that SLURM gets them as jobs of their own which the sweep's array
waits for (`afterok`): no array task trains a teacher, or waits on another task's lock while holding a GPU."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import submitit

from bench.api import Method
from bench.config import RunSpec, resolve_config
from bench.context import RunContext, Runtime
from bench.data import make_dataset
from bench.errors import BenchError
from bench.models import store as model_store
from bench.presets import get_preset
from bench.registry import METHODS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Need:
    """One job to run before the sweep: "models" (train the teacher and judge, or the judge alone for --teacher)
    or "prepare" (a method's cache), for the runs like `spec`, after the needs named in `after`."""

    kind: str
    key: tuple
    spec: RunSpec
    after: tuple[tuple, ...] = ()

    @property
    def name(self) -> str:
        what = f"{self.spec.method}'s cache" if self.kind == "prepare" else "teacher and judge"
        return f"{what} for {self.spec.dataset} at preset {self.spec.preset}"


def _models_key(spec: RunSpec) -> tuple:
    return ("models", spec.dataset, spec.preset, spec.teacher_path)


def _models_missing(spec: RunSpec, runtime: Runtime) -> bool:
    from bench.text.pretrain import image_judge_missing
    from bench.text.run import is_text

    preset = get_preset(spec.preset)
    dataset = make_dataset(spec.dataset, data_dir=runtime.data_dir, image_size=preset.image_size)
    recipe = model_store.recipe_preset(dataset.name, preset, _teacher_seed())
    found = model_store.find_models(dataset.name, recipe.model_key, _teacher_seed())
    if is_text(dataset):  # its judge is its images' (bench/text/pretrain.py), its teacher maybe a folder
        teacher_missing = found is None and not spec.teacher_path
        return teacher_missing or (
            not spec.judge_clip and image_judge_missing(dataset, recipe, _teacher_seed())
        )
    if found is not None:
        return False
    if not spec.teacher_path:
        return True
    judge = model_store.model_dir(model_store.user_store(), dataset.name, recipe.model_key, _teacher_seed())
    return not (judge / "judge" / "model.safetensors").is_file()


def _teacher_seed() -> int:
    from bench.runner import TEACHER_SEED

    return TEACHER_SEED


def _prepares(method: str) -> bool:
    return METHODS.get(method).prepare is not Method.prepare


def find_needs(specs: list[RunSpec], runtime: Runtime) -> list[Need]:
    """The jobs these runs need first, in the order to submit them (models before the caches made from them)."""
    from bench import runner

    needs: dict[tuple, Need] = {}
    for spec in specs:
        key = _models_key(spec)
        if key not in needs and _models_missing(spec, runtime):
            needs[key] = Need("models", key, spec)
    for spec in specs:
        if not _prepares(spec.method):
            continue
        method = METHODS.get(spec.method)(
            resolve_config(METHODS.get(spec.method), spec.preset, dict(spec.overrides))
        )
        key = ("prepare", spec.method, spec.overrides, spec.dataset, spec.preset, spec.teacher_path)
        if key in needs:
            continue
        models = _models_key(spec)
        if models in needs:
            needs[key] = Need("prepare", key, spec, after=(models,))
            continue
        preset = get_preset(spec.preset)
        dataset = make_dataset(spec.dataset, data_dir=runtime.data_dir, image_size=preset.image_size)
        teacher, _, _ = runner.load_models(dataset, preset, teacher_path=spec.teacher_path)
        if not method.prepared(teacher):
            needs[key] = Need("prepare", key, spec)
    return list(needs.values())


def satisfy(need: Need, runtime: Runtime, folder: Path) -> None:
    """Do what a need asks for, here (the body of its job); a rerun after a requeue resumes or finds it done."""
    from bench import runner

    spec = need.spec
    preset = get_preset(spec.preset)
    dataset = make_dataset(spec.dataset, data_dir=runtime.data_dir, image_size=preset.image_size)
    device = runtime.torch_device
    teacher, _, _ = runner.load_models(dataset, preset, teacher_path=spec.teacher_path, device=device,
                                       amp=runtime.amp, judge_clip=spec.judge_clip)  # fmt: skip
    if need.kind == "prepare":
        method_cls = METHODS.get(spec.method)
        method = method_cls(resolve_config(method_cls, spec.preset, dict(spec.overrides)))
        work = Path(folder) / "prepare" / spec.run_id
        work.mkdir(parents=True, exist_ok=True)
        ctx = RunContext(run_dir=work, seed=spec.seed, preset=preset, dataset=dataset,
                         forget_set=dataset.forget_set(spec.forget_set), requires=method_cls.requires,
                         runtime=runtime)  # fmt: skip
        teacher.unet.to(device)
        method.prepare(teacher, ctx)


class RequeueableJob(submitit.helpers.Checkpointable):
    """A function call as a SLURM job: on a time limit or preemption it is requeued and called again, and the
    function resumes (teacher training from its last state dump)."""

    def __call__(self, fn, kwargs: dict, env: dict[str, str]):
        for key, value in env.items():  # for clusters that do not export the submitting shell's environment
            os.environ.setdefault(key, value)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus and "OMP_NUM_THREADS" not in os.environ:
            import torch

            torch.set_num_threads(int(cpus))
        return fn(**kwargs)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        from bench.launch import ignore_sigterm_for_requeue

        log.warning("time limit or preemption: requeueing; training resumes from its last state dump")
        ignore_sigterm_for_requeue()
        return super().checkpoint(*args, **kwargs)


def submit_call(cfg: dict, folder: Path, name: str, fn, kwargs: dict, *, after: list[str] = (),
                params: dict | None = None) -> submitit.Job:  # fmt: skip
    """Submit fn(**kwargs) as a requeueable job (after the jobs `after`, if they succeed), with extra submitit
    `params` (e.g. clusters.rank_params for several tasks)."""
    from bench import clusters
    from bench.launch import ENV_PREFIXES

    ex = clusters.executor(cfg, folder)
    extra = dict(cfg.get("additional") or {})
    if after:
        extra |= {"dependency": "afterok:" + ":".join(after), "kill-on-invalid-dep": "yes"}
    ex.update_parameters(name=name, slurm_additional_parameters=extra, **(params or {}))
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}
    try:
        return ex.submit(RequeueableJob(), fn, kwargs, env)
    except submitit.core.utils.FailedJobError as e:
        raise BenchError(f"sbatch refused the job {name} (cluster preset {cfg['name']!r}): {e}") from e


def submit(needs: list[Need], runtime: Runtime, cfg: dict, folder: Path) -> list[str]:
    """Submit each need as a job (after the jobs of the needs it waits for); return all their job ids."""
    ids: dict[tuple, str] = {}
    for need in needs:
        ids[need.key] = submit_call(cfg, folder, f"bench-{need.kind}", satisfy,
                                    {"need": need, "runtime": runtime, "folder": folder},
                                    after=[ids[k] for k in need.after]).job_id  # fmt: skip
        log.info("submitted the %s as SLURM job %s", need.name, ids[need.key])
    return list(ids.values())
