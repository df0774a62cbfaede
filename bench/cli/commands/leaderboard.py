"""`bench leaderboard`: rebuild a suite's leaderboard from its run records."""

from __future__ import annotations

import argparse

HELP = "rebuild leaderboards/<suite>.md (+ plots) from the run records of a suite"
DESCRIPTION = (
    "Read every record under <workdir>/runs/<suite>/ and write <out>/<suite>.md with one table per dataset "
    "(metrics as bootstrap mean [95% interval], costs, paired tests against the best row, failed runs listed "
    "apart), the plots under <out>/<suite>/, sweep results, and for built-in suites the numbers reported in "
    "the paper in a separate table. Works for any suite name that has records (e.g. 'train' from `bench train`)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", required=True, help="suite name (built-in, a suite .toml, or any name with records)")
    p.add_argument("--workdir", default="workdir", help="work folder holding runs/ (default: workdir)")
    p.add_argument("--out", default="leaderboards",
                   help="folder for <suite>.md and <suite>/*.png (default: leaderboards)")
    p.add_argument("--reported", help="reference rows to show (default: the suite's `reported`; 'none' hides them)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bench.common.console import info
    from bench.evaluation.leaderboard import build_leaderboard
    from bench.orchestration.suite import builtin_suites, load_suite

    from bench.common.errors import ConfigError

    name, reported, data_names, expectations = args.suite, None, None, None
    if args.suite in builtin_suites() or args.suite.endswith(".toml"):
        suite = load_suite(args.suite)
        name, reported = suite.name, suite.reported
        data_names = {d.name: d.data for d in suite.datasets}
        try:  # the planted effects of the demo cohorts (checked only on synthetic records)
            expectations = load_suite(args.suite, demo=True).expectations()
        except ConfigError:  # no [demo] table
            expectations = None
    if args.reported is not None:
        reported = None if args.reported.lower() == "none" else args.reported
    path = build_leaderboard(Path(args.workdir), name, Path(args.out), reported=reported, data_names=data_names,
                             expectations=expectations)
    print(path.read_text(encoding="utf-8"))
    info(f"leaderboard: {path}")
    return 0
