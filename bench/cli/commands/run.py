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
    p.add_argument("--workers", type=int, default=2, help="patch-reading workers of feature extraction (default: 2)")
    p.add_argument("--force", action="store_true", help="retrain methods whose records are up to date")
    p.add_argument("--list", action="store_true", help="list the suite's datasets and methods and exit")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bench.common.console import info
    from bench.orchestration.runner import RunOptions, outcome_table, run_suite, stage_table
    from bench.orchestration.suite import load_suite

    suite = load_suite(args.suite, demo=args.data_root is None)
    suite = suite.select(datasets=args.datasets, methods=args.methods)
    if args.list:
        _print_listing(suite)
        return 0
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


def command_line() -> str:
    """The command as typed (for the leaderboard footer), with the program name as `bench`."""
    return "bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _print_listing(suite) -> None:
    from tabulate import tabulate

    print(f"suite {suite.name} ({'synthetic demo' if suite.demo else 'real data'}): {suite.description}")
    print(tabulate([[d.name, d.task, d.data, d.split.get("protocol", "holdout")] for d in suite.datasets],
                   headers=["dataset", "task", "data folder", "split"], tablefmt="github"))
    print()
    print(tabulate([[m.name, m.paradigm, m.encoder, m.aggregator, ", ".join(m.search) or "-"] for m in suite.methods],
                   headers=["method", "paradigm", "encoder", "aggregator", "search space"], tablefmt="github"))
