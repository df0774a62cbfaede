"""`bench runs`: list the run records of a work folder."""

from __future__ import annotations

import argparse

HELP = "list the run records (status, primary test metric with its interval, costs) as a table"
DESCRIPTION = (
    "Read every runs/<suite>/<dataset>/<method>/<split>/run.json under --workdir and print one row per run: "
    "status, the primary test metric as mean [95% interval] (or the error of a failed run), train seconds, "
    "inference seconds per slide. --failed shows only failed runs, with their errors in full."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="workdir", help="work folder (default: workdir)")
    p.add_argument("--suite", help="only this suite")
    p.add_argument("--failed", action="store_true", help="only failed runs, with their full errors")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bench.common.errors import MissingFileError
    from bench.data.layout import Layout
    from bench.evaluation.records import iter_runs, runs_table

    records = iter_runs(Path(args.workdir), args.suite, failed_reruns=True)
    if not records:
        root = Layout(Path(args.workdir)).runs_root(args.suite)
        raise MissingFileError(f"no run records under {root}; run `bench run --suite NAME --workdir {args.workdir}` "
                               "or `bench train ...` first")
    if args.failed:
        records = [r for r in records if not r.ok]
        for r in records:
            print(f"{r.run_dir}: {r.data.get('error')}")
        if not records:
            print("no failed runs")
        return 0
    print(runs_table(records))
    n_failed = sum(not r.ok for r in records)
    print(f"\n{len(records)} run(s), {n_failed} failed" + (" (bench runs --failed shows why)" if n_failed else ""))
    return 0
