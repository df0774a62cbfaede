"""`bench worker`: claim and do the ready work items of a suite, alongside any number of other workers."""

from __future__ import annotations

import argparse

HELP = "claim and run a suite's ready work items (many workers, GPUs or nodes can share one work folder)"
DESCRIPTION = (
    "Turn the suite into work items (cohort, tile, split, extract shards, train + evaluate per method, seed and "
    "fold, leaderboard) and do the ready ones, one claim at a time, until none is left or waiting on other "
    "workers; then exit 0. Start as many as you like on one --workdir (a SLURM array, one per GPU, tmux): each "
    "item is claimed once (lock files safe on NFS and Lustre, with a lease renewed by heartbeat); an item whose "
    "worker died is taken over once its lease runs out and resumes from its checkpoint. Progress: bench status."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", required=True, help="built-in suite name or path to a suite .toml")
    p.add_argument("--workdir", default="workdir", help="shared work folder (default: workdir)")
    p.add_argument("--data-root", help="folder with one subfolder per dataset; default: synthetic demo cohorts")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:K (default: auto)")
    p.add_argument("--datasets", nargs="+", metavar="NAME", help="only these datasets (as bench run)")
    p.add_argument("--methods", nargs="+", metavar="NAME", help="only these methods (as bench run)")
    p.add_argument("--seeds", nargs="+", type=int, metavar="K", help="seeds to run (default: the suite's)")
    p.add_argument("--params", choices=("suite", "best"), default="suite", help="hyperparameters (as bench run)")
    p.add_argument("--leaderboards", default="leaderboards", help="folder for <suite>.md (default: leaderboards)")
    p.add_argument("--no-leaderboard", action="store_true", help="leave the leaderboard item out")
    p.add_argument("--workers", type=int, default=None,
                   help="patch-reading workers of feature extraction (default: chosen from the cores and the encoder)")
    add_worker_arguments(p)


def add_worker_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--worker-id", help="name shown in claims and bench status (default: host-pid-random)")
    p.add_argument("--lease", type=float, default=60.0,
                   help="seconds a claim lives without a heartbeat before others take it over (default: 60)")
    p.add_argument("--gpus", type=int, help="GPUs this worker may use for one item (default 1 on CUDA; GMA items "
                                            "needing nproc GPUs are left to a worker with --gpus >= nproc)")


def options_from(args: argparse.Namespace):
    """(WorkerSpec, Suite) from the arguments `bench worker` and `bench run --executor` share."""
    import shlex
    import sys
    from pathlib import Path

    from bench.orchestration.runner import RunOptions
    from bench.orchestration.worker import WorkerOptions, WorkerSpec

    options = RunOptions(
        workdir=Path(args.workdir).absolute(), data_root=Path(args.data_root).absolute() if args.data_root else None,
        seeds=tuple(args.seeds) if args.seeds else None, device=args.device, params=args.params,
        leaderboards=None if args.no_leaderboard else Path(args.leaderboards).absolute(),
        extract_workers=args.workers, command="bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    wopts = WorkerOptions(worker_id=args.worker_id, lease_s=args.lease, gpus=args.gpus)
    suite_arg = args.suite
    if suite_arg.endswith(".toml"):
        suite_arg = str(Path(suite_arg).absolute())
    return WorkerSpec(suite_arg, tuple(args.datasets) if args.datasets else None,
                      tuple(args.methods) if args.methods else None, options, wopts)


def run(args: argparse.Namespace) -> int:
    from bench.common.console import info
    from bench.orchestration.worker import load_selected, run_worker

    spec = options_from(args)
    report = run_worker(load_selected(spec), spec.options, spec.worker)
    ran = [i for i in report.items if i["status"] in ("ok", "failed")]
    failed = [i for i in ran if i["status"] == "failed"]
    info(f"worker {report.worker}: {len(ran)} item(s) done here ({len(failed)} failed); suite: "
         + ", ".join(f"{k} {v}" for k, v in report.counts.items() if v))
    return 0
