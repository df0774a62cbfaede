"""`bench status`: where the work items of a suite stand (for workers sharing a work folder)."""

from __future__ import annotations

import argparse

HELP = "show a suite's work items: pending / ready / claimed (by whom, since when) / done / failed"
DESCRIPTION = (
    "Count the work items of a suite by state and list the claimed ones (worker, host, since when, lease left) "
    "and the failed ones with their errors. Reads the work folder only; safe while workers run."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", required=True, help="built-in suite name or path to a suite .toml")
    p.add_argument("--workdir", default="workdir", help="shared work folder (default: workdir)")
    p.add_argument("--data-root", help="as given to the workers (default: synthetic demo cohorts)")
    p.add_argument("--datasets", nargs="+", metavar="NAME", help="only these datasets (as the workers)")
    p.add_argument("--methods", nargs="+", metavar="NAME", help="only these methods (as the workers)")
    p.add_argument("--seeds", nargs="+", type=int, metavar="K", help="seeds (as the workers)")
    p.add_argument("--no-leaderboard", action="store_true", help="as given to the workers")
    p.add_argument("--items", action="store_true", help="list every item with its state")


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from tabulate import tabulate

    from bench.orchestration.plan import Context, build_plan, counts, item_states
    from bench.orchestration.runner import RunOptions
    from bench.orchestration.suite import load_suite

    suite = load_suite(args.suite, demo=args.data_root is None).select(datasets=args.datasets, methods=args.methods)
    options = RunOptions(workdir=Path(args.workdir).absolute(),
                         data_root=Path(args.data_root).absolute() if args.data_root else None,
                         seeds=tuple(args.seeds) if args.seeds else None,
                         leaderboards=None if args.no_leaderboard else Path("leaderboards"))
    plan = build_plan(suite, options)
    states = item_states(Context(plan, readonly=True))
    total = counts(states)
    print(f"suite {suite.name} in {options.workdir}: {len(states)} items")
    print(tabulate([[k, v] for k, v in total.items()], headers=["state", "items"], tablefmt="github"))
    now = time.time()
    claimed = [s for s in states if s.state == "claimed" and s.claim]
    if claimed:
        print()
        print(tabulate([[s.item.id, s.claim["worker"], s.claim["host"],
                         time.strftime("%H:%M:%S", time.localtime(s.claim["claimed"])),
                         f"{now - s.claim['claimed']:.0f}", f"{s.claim['expires'] - now:.0f}"] for s in claimed],
                       headers=["claimed item", "worker", "host", "since", "running s", "lease left s"],
                       tablefmt="github"))
    failed = [s for s in states if s.state == "failed" or (s.record and s.record.get("status") == "failed"
                                                           and s.state not in ("done",))]
    if failed:
        print()
        print(tabulate([[s.item.id, s.state, s.record.get("attempts") if s.record else "",
                         (s.error or "")[:100]] for s in failed],
                       headers=["failed item", "state", "attempts", "error"], tablefmt="github"))
    per_worker: dict[str, list[float]] = {}
    for s in states:  # extraction throughput of each worker (slides extracted / seconds), from the item records
        rec = s.record or {}
        if s.item.kind == "extract" and rec.get("status") == "ok" and rec.get("extracted"):
            acc = per_worker.setdefault(f"{rec.get('worker')} ({rec.get('host')}, {rec.get('device')})", [0, 0.0])
            acc[0] += int(rec["extracted"])
            acc[1] += float(rec.get("seconds") or 0.0)
    if per_worker:
        print()
        print(tabulate([[w, n, f"{secs:.1f}", f"{n / secs:.2f}" if secs > 0 else ""]
                        for w, (n, secs) in sorted(per_worker.items())],
                       headers=["extracting worker", "slides", "seconds", "slides/s"], tablefmt="github"))
    if args.items:
        print()
        print(tabulate([[s.item.id, s.state, s.item.gpus] for s in states], headers=["item", "state", "gpus"],
                       tablefmt="github"))
    return 0
