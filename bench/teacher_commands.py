"""`bench pretrain` and `bench import-teacher`: the commands that make or bring a teacher (bench/cli.py parses
their arguments)."""

from __future__ import annotations

import logging

from bench.errors import BenchError


def cmd_pretrain(args) -> None:
    from bench.models.store import user_store
    from bench.pretrain import pretrain_named

    out_root = (args.out or user_store()).expanduser().resolve()
    kwargs = {"dataset": args.dataset, "preset": args.preset, "seed": args.seed, "out_root": out_root,
              "data_dir": args.data_dir.resolve() if args.data_dir else None, "device": args.device, "amp": args.amp,
              "clip_only": args.clip_only}  # fmt: skip
    if args.launcher == "slurm":
        import submitit

        from bench import clusters, prerequisites

        if args.cluster is None:
            raise BenchError(f"--launcher slurm needs --cluster NAME ({', '.join(clusters.cluster_names())}) or a "
                             ".toml path")  # fmt: skip
        cfg = clusters.load_cluster(args.cluster, args.sets)
        folder = out_root / "jobs"
        ranks = (
            clusters.rank_params(cfg, args.nproc) if args.nproc > 1 else None
        )  # one task per rank (and GPU)
        job = prerequisites.submit_call(cfg, folder, "bench-pretrain", pretrain_named, kwargs, params=ranks)
        print(f"submitted the pretraining as SLURM job {job.job_id} (requeued and resumed on a time limit); "
              f"logs in {folder}")  # fmt: skip
        if not args.wait:
            return
        try:
            out = job.results()[0]  # waits for the job (every task), requeues included; rank 0's result
        except (
            submitit.core.utils.UncompletedJobError
        ) as e:  # failed or cancelled: its traceback is in the log
            raise BenchError(f"SLURM job {job.job_id} did not finish: {str(e).splitlines()[0]}; log: "
                             f"{job.paths.stderr}") from e  # fmt: skip
    else:
        if args.sets:
            raise BenchError(f"--set {args.sets[0]}: slurm.* settings need --launcher slurm")
        if args.nproc > 1:
            import torch

            from bench import distributed
            from bench.context import Runtime

            gpus = torch.cuda.device_count()
            if Runtime(device=args.device).torch_device.type == "cuda" and args.nproc > gpus:
                raise BenchError(f"--nproc {args.nproc} --device cuda: one GPU per process, and this machine has "
                                 f"{gpus}")  # fmt: skip
            out = distributed.spawn(_pretrain_rank, args.nproc, kwargs, device=args.device)
        else:
            out = pretrain_named(**kwargs)
    print(f"{'the tiny CLIP' if args.clip_only else 'teacher and judge'} written to {out}")
    print((out / "MANIFEST.json").read_text())


def _pretrain_rank(world, kwargs: dict):
    """One process of `bench pretrain --nproc N` (distributed.spawn has joined it to the others)."""
    from bench.pretrain import pretrain_named

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return pretrain_named(**kwargs)


def cmd_import_teacher(args) -> None:
    import shlex

    from bench.models.import_official import import_teacher

    argv = [str(args.ckpt), "--config", str(args.config), "--out", str(args.out)]
    record = import_teacher(
        args.ckpt, config=args.config, out=args.out, command=f"bench import-teacher {shlex.join(argv)}"
    )
    ck = record["checkpoint"]
    print(f"teacher written to {args.out}: {record['weights']} weights of {ck['path']} (step {ck['step']}, sha256 "
          f"{ck['sha256'][:12]}); raw weights in {args.out / record['raw_weights']}; record "
          f"{args.out / 'import.json'}")  # fmt: skip
    print(f"use it with: bench run --teacher {shlex.quote(str(args.out))} ...")
