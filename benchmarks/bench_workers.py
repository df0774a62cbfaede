"""Workers sharing one suite: 1 vs 2 local workers, the cost of claiming an item, takeover latency.

1. Wall time of a small synthetic suite (two-stage ABMIL + mean pooling, 2 seeds; 13 items) done by one
   `bench worker` process against two started together, each in a fresh work folder; also the part after
   tiling (from the first extract item's start to the last item's end, from the event log), which is where
   the work is parallel. Ratio = 1 worker / 2 workers (goal >= 1.6x after tiling on 2 free cores).
2. Claim overhead per item: `try_claim` + heartbeat start + `release` on a local folder, and one
   `item_states` pass over the finished plan (what a worker does between items), per item.
3. Takeover latency: a child process claims with a lease of L seconds and is SIGKILLed; a taker
   polling every P seconds claims it; seconds from the kill to the takeover (goal <= L + 5 s).

The machine this ran on is shared (other processes use the same cores), so timings are noisy.

Run: .venv/bin/python benchmarks/bench_workers.py [--skip-suite] [--lease 3] [--poll 0.5]
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUITE = """
name = "benchw"
description = "worker benchmark suite (synthetic)"
seeds = [0, 1]
bootstrap = 200

[defaults.two-stage]
epochs = 6
lr = 1e-3

[[datasets]]
name = "mini"
task = "classification"
classes = ["IDC", "ILC"]
split = { protocol = "holdout", ratios = [0.6, 0.4], val_fraction = 0.25 }
two_stage = { magnification = 10, patch_size = 64, input_size = 32 }
e2e = { magnification = 10, patch_size = 64, input_size = 32 }
synthetic = { kind = "subtyping", n_slides = 16, width = 1024, height = 768, minority_fraction = 0.5 }

[[methods]]
paradigm = "two-stage"
encoder = "resnet18-trunc"
aggregators = ["abmil", "mean"]
random_init = true

[demo]
defaults.two-stage = { epochs = 6 }
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "BENCH_PROGRESS": "0"}


def run_workers(suite: Path, work: Path, n: int) -> tuple[float, float]:
    """(wall seconds of n workers on a fresh work folder, seconds from the first extract start to the end)."""
    args = ["--suite", str(suite), "--workdir", str(work), "--leaderboards", str(work / "boards"), "--device", "cpu",
            "--workers", "0"]
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "bench.cli.main", "worker", *args, "--worker-id", f"w{i}"],
                              env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(n)]
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"worker exited with {p.returncode}")
    wall = time.perf_counter() - start
    events = [json.loads(line) for line in (work / "work" / "benchw" / "events.jsonl").read_text().splitlines()]
    first = min(e["t"] for e in events if e["event"] == "start" and e["item"].startswith("extract/"))
    last = max(e["t"] for e in events if e["event"] in ("done", "failed"))
    return wall, last - first


def claim_overhead(folder: Path, n: int = 200) -> float:
    from bench.orchestration.claims import try_claim

    times = []
    for i in range(n):
        t0 = time.perf_counter()
        claim = try_claim(folder / f"item{i}.claim", worker="bench", lease_s=60).start_heartbeat()
        claim.check()
        claim.release()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def plan_pass_per_item(suite: Path, work: Path) -> float:
    from bench.orchestration.plan import Context, build_plan, item_states
    from bench.orchestration.runner import RunOptions
    from bench.orchestration.suite import load_suite

    plan = build_plan(load_suite(suite, demo=True),
                      RunOptions(workdir=work, leaderboards=work / "boards", device="cpu", extract_workers=0))
    ctx = Context(plan)
    done: set[str] = set()
    item_states(ctx, done)  # the first pass checks every output (a worker does it once)
    t0 = time.perf_counter()
    for _ in range(5):
        item_states(ctx, done)
    return (time.perf_counter() - t0) / 5 / len(plan.items)


def _hold(path: str, lease: float, ready) -> None:
    from bench.orchestration.claims import try_claim

    try_claim(Path(path), worker="victim", lease_s=lease).start_heartbeat()
    ready.set()
    time.sleep(3600)


def takeover_latency(folder: Path, lease: float, poll: float) -> float:
    from bench.orchestration.claims import try_claim

    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    path = folder / "victim.claim"
    victim = ctx.Process(target=_hold, args=(str(path), lease, ready))
    victim.start()
    ready.wait(30)
    time.sleep(lease)  # a few heartbeats
    os.kill(victim.pid, signal.SIGKILL)
    killed = time.perf_counter()
    victim.join()
    while try_claim(path, worker="taker", lease_s=lease) is None:
        time.sleep(poll)
    return time.perf_counter() - killed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip-suite", action="store_true", help="only the claim overhead and takeover latency")
    ap.add_argument("--lease", type=float, default=3.0)
    ap.add_argument("--poll", type=float, default=0.5)
    args = ap.parse_args()
    print(f"# bench_workers {datetime.date.today()} on {os.cpu_count()} CPUs (shared machine: timings are noisy)")
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        root = Path(tmp)
        suite = root / "benchw.toml"
        suite.write_text(SUITE)
        if not args.skip_suite:
            w1, p1 = run_workers(suite, root / "one", 1)
            w2, p2 = run_workers(suite, root / "two", 2)
            print(f"suite (13 items): 1 worker {w1:.1f} s, 2 workers {w2:.1f} s, ratio {w1 / w2:.2f}x; after tiling "
                  f"{p1:.1f} s vs {p2:.1f} s, ratio {p1 / p2:.2f}x (goal >= 1.6x)")
            per = plan_pass_per_item(suite, root / "two")
            print(f"plan state pass on the finished suite: {per * 1000:.2f} ms per item")
        (root / "claims").mkdir()
        med = claim_overhead(root / "claims")
        print(f"claim + heartbeat start + check + release: median {med * 1000:.2f} ms per item (goal < 50 ms)")
        lat = takeover_latency(root, args.lease, args.poll)
        print(f"takeover after SIGKILL: {lat:.2f} s with lease {args.lease:g} s, poll {args.poll:g} s "
              f"(goal <= lease + 5 s)")


if __name__ == "__main__":
    main()
