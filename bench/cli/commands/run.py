"""`bench run`: a whole suite, from slides to leaderboard."""

from __future__ import annotations

import argparse
import shlex
import sys

HELP = "run a suite end to end: tile, split, extract, train + evaluate every method, leaderboard"
DESCRIPTION = (
    "Run every stage of a suite (built-in: subtyping, grading, survival; or a suite .toml file) and write "
    "leaderboards/<suite>.md. Without --data-root the suite's [demo] runs on synthetic cohorts it writes itself "
    "(small encoders, random init: the numbers show the harness working, not the paradigms' merits). With "
    "--data-root DIR each dataset is read from DIR/<data>/labels.csv + slides/. Every stage is cached: a rerun "
    "skips what is done and resumes what was interrupted; a failing method is recorded as failed and the others "
    "go on (exit status 1 when any failed)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", required=True, help="built-in suite name or path to a suite .toml")
    p.add_argument("--data-root", help="folder with one subfolder per dataset (labels.csv + slides/); "
                                       "default: synthetic demo cohorts")
    p.add_argument("--workdir", default="workdir", help="work folder for data, tiles, features, runs (default: workdir)")
    p.add_argument("--datasets", nargs="+", metavar="NAME", help="only these datasets (names or glob patterns)")
    p.add_argument("--methods", nargs="+", metavar="NAME",
                   help="only these methods (names or glob patterns, e.g. 'e2e/*' 'two-stage/*/abmil')")
    p.add_argument("--seeds", nargs="+", type=int, metavar="K", help="seeds to run (default: the suite's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--params", choices=("suite", "best"), default="suite",
                   help="hyperparameters: the suite's, or the best found by `bench sweep` (default: suite)")
    p.add_argument("--leaderboards", default="leaderboards", help="folder for <suite>.md (default: leaderboards)")
    p.add_argument("--no-leaderboard", action="store_true", help="do not write the leaderboard")
    p.add_argument("--workers", type=int, default=None,
                   help="patch-reading workers of feature extraction (default: chosen from the cores, the encoder and "
                        "the device; the console prints the choice)")
    p.add_argument("--force", action="store_true", help="retrain methods whose records are up to date")
    p.add_argument("--list", action="store_true", help="list the suite's datasets and methods and exit")
    g = p.add_argument_group("many processes, GPUs or nodes (see bench worker)")
    g.add_argument("--executor", help="local: --jobs worker processes here (one per visible GPU by default); "
                                      "slurm: a submitit job array of workers (default: this process alone)")
    g.add_argument("--jobs", type=int, help="number of workers (local default: one per visible GPU, else 2; "
                                            "slurm default: 4)")
    g.add_argument("--partition", help="slurm: partition")
    g.add_argument("--gpus-per-worker", type=int, default=1, help="slurm: GPUs of each array job (default: 1)")
    g.add_argument("--cpus-per-worker", type=int, default=8, help="slurm: CPUs of each job (default: 8)")
    g.add_argument("--time-min", type=int, default=24 * 60, help="slurm: time limit in minutes (default: 1440)")
    g.add_argument("--gma-gpus", type=int, help="slurm: GPUs of the GMA allocation (default: the GMA items' nproc)")
    g.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="slurm: extra sbatch option, e.g. --sbatch account=mylab --sbatch qos=high (repeatable)")
    from bench.cli.commands.worker import add_worker_arguments

    add_worker_arguments(g)
    p.add_argument("--allow-missing-slides", action="store_true",
                   help="datasets on the authors' split (protocol paper): run on the slides present when some of "
                        "the split's slides are absent (they are listed; the test set is then not the paper's)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bench.common.console import info
    from bench.orchestration.runner import RunOptions, outcome_table, run_suite, stage_table
    from bench.orchestration.suite import load_suite

    suite = load_suite(args.suite, demo=args.data_root is None)
    suite = suite.select(datasets=args.datasets, methods=args.methods)
    if args.allow_missing_slides:
        suite = suite.allowing_missing_slides()
    if args.list:
        _print_listing(suite, tuple(args.seeds) if args.seeds else None)
        return 0
    if args.executor is not None:
        return run_executor(args)
    options = RunOptions(
        workdir=Path(args.workdir), data_root=Path(args.data_root) if args.data_root else None,
        seeds=tuple(args.seeds) if args.seeds else None, device=args.device, params=args.params,
        leaderboards=None if args.no_leaderboard else Path(args.leaderboards), force=args.force,
        extract_workers=args.workers, command=command_line(),
    )
    report = run_suite(suite, options)
    print(outcome_table(report))
    print()
    print(stage_table(report))
    if report.leaderboard is not None:
        print()
        print(report.leaderboard.read_text(encoding="utf-8"))
        info(f"leaderboard: {report.leaderboard}")
    if report.failed:
        info(f"{len(report.failed)} run(s) failed; their records keep the error (bench runs --workdir {args.workdir})")
        return 1
    return 0


def run_executor(args: argparse.Namespace) -> int:
    """`bench run --executor local|slurm`: the suite's work items done by worker processes or SLURM jobs."""
    from bench.common.errors import ConfigError
    from bench.cli.commands.worker import options_from
    from bench.orchestration.worker import EXECUTORS, SlurmOptions, run_local, submit_slurm

    known = [e for e in EXECUTORS if e != "inline"]
    if args.executor not in known:
        raise ConfigError(f"unknown executor {args.executor!r}; known executors: {', '.join(known)} "
                          "(or leave --executor out to run in this process)")
    if args.force:
        raise ConfigError("--force cannot be combined with --executor (workers never retrain finished runs); "
                          "run `bench run --force` without --executor")
    spec = options_from(args)
    if args.executor == "local":
        bad = run_local(spec, args.jobs)
        return 1 if bad else _after_workers(spec)
    extra = []
    for kv in args.sbatch:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            raise ConfigError(f"--sbatch expects KEY=VALUE (e.g. account=mylab), got {kv!r}")
        extra.append((key.lstrip("-"), value))
    slurm = SlurmOptions(partition=args.partition, gpus_per_worker=args.gpus_per_worker,
                         cpus_per_worker=args.cpus_per_worker, time_min=args.time_min, gma_gpus=args.gma_gpus,
                         extra=tuple(extra))
    submit_slurm(spec, args.jobs or 4, slurm)
    return 0


def _after_workers(spec) -> int:
    """Print the leaderboard the workers drew and say whether any item failed (exit status 1 then)."""
    from bench.common.console import info
    from bench.orchestration.plan import Context, build_plan, counts, item_states
    from bench.orchestration.worker import load_selected

    plan = build_plan(load_selected(spec), spec.options)
    states = item_states(Context(plan, readonly=True))
    total = counts(states)
    board = None if spec.options.leaderboards is None else spec.options.leaderboards / f"{plan.suite.name}.md"
    if board is not None and board.is_file():
        print(board.read_text(encoding="utf-8"))
        info(f"leaderboard: {board}")
    for s in states:
        if s.state in ("failed", "blocked"):
            info(f"{s.state}: {s.item.id}" + (f": {s.error}" if s.error else ""))
    if total["failed"] or total["blocked"]:
        return 1
    if total["done"] != len(states):
        info(f"not finished: " + ", ".join(f"{k} {v}" for k, v in total.items() if v and k != "done")
             + f" (bench status --suite {spec.suite} --workdir {spec.options.workdir})")
        return 1
    return 0


def command_line() -> str:
    """The command as typed (for the leaderboard footer), with the program name as `bench`."""
    return "bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _print_listing(suite, seeds: tuple[int, ...] | None = None) -> None:
    from tabulate import tabulate

    seeds = seeds or suite.seeds
    print(f"suite {suite.name} ({'synthetic demo' if suite.demo else 'real data'}): {suite.description}")
    _, folds = grid_size(suite, seeds)
    rows = [[d.name, d.task, d.data, d.split.get("protocol", "holdout"), f]
            for d, f in zip(suite.datasets, folds)]
    print(tabulate(rows, headers=["dataset", "task", "data folder", "split", "folds"], tablefmt="github"))
    print()
    print(tabulate([[m.name, m.paradigm, m.encoder, m.aggregator, ", ".join(m.search) or "-"] for m in suite.methods],
                   headers=["method", "paradigm", "encoder", "aggregator", "search space"], tablefmt="github"))
    print()
    print(grid_line(suite, seeds))


def grid_size(suite, seeds: tuple[int, ...]) -> tuple[int, list[int]]:
    """Runs `bench run` would do for `suite` (already selected) with `seeds`, and each dataset's fold count.

    Same loops as bench.orchestration.runner.run_suite: every method x seed x fold of every dataset, the folds
    being the dataset's `folds` list or all folds of its split protocol."""
    folds = [len(d.folds) if d.folds else d.split_spec().n_folds for d in suite.datasets]
    return len(suite.methods) * len(seeds) * sum(folds), folds


def grid_line(suite, seeds: tuple[int, ...]) -> str:
    """One line: datasets x methods x seeds x folds = N runs (folds summed over datasets where they differ)."""
    total, folds = grid_size(suite, seeds)
    head = f"{len(suite.methods)} methods x {len(seeds)} seeds"
    if len(set(folds)) <= 1:
        return (f"grid: {len(suite.datasets)} datasets x {head} x {folds[0] if folds else 0} folds = {total} runs")
    per = " + ".join(f"{d.name} {f}" for d, f in zip(suite.datasets, folds))
    return f"grid: {head} x ({per}) dataset folds = {total} runs"
