"""Fault injection: `bench run` killed (SIGKILL, SIGINT) at many points of a suite, then rerun.

Run on purpose (not in the default run; about 10 minutes on 2 cores):

    .venv/bin/python -m pytest -m faults tests/faults -s

A reference run goes through a small synthetic suite (two-stage, E2E, GMA) uninterrupted. A
second work folder is then driven through the same suite by a sequence of runs, each killed at
a planned point: when its output shows a stage (synthesis, tiling, split, extraction, each
trainer mid-epoch, GMA ranks, evaluation, leaderboard; runs aimed past extraction pass
`--force`, so finished methods train again and every point is reached) plus a seeded random delay, with
SIGKILL to the `bench` process alone (its children must die with it) or SIGINT to its process
group (Ctrl-C in a terminal), and a few kills at seeded random times. After every kill:

- no process of that run is left (torchrun and GMA ranks included) within a grace period;
- every file that passes as complete opens (HDF5, JSON, safetensors, CSV); partial files
  carry the partial mark.

Finally the suite is rerun to completion, and its records (every metric of every run) and
the leaderboard's metric cells must equal the reference's.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.faults

SUITE = """
name = "faults"
description = "fault-injection suite (synthetic)"
seeds = [0]
bootstrap = 200

[defaults.two-stage]
epochs = 4
lr = 1e-3

[defaults.e2e]
epochs = 2
lr = 3e-4
samples = 8
workers = 0
infer_chunk = 64

[defaults.gma]
epochs = 2
lr = 3e-4
tiles = 8
nproc = 3
timeout_s = 240

[[datasets]]
name = "mini"
task = "classification"
classes = ["IDC", "ILC"]
split = { protocol = "holdout", ratios = [0.6, 0.4], val_fraction = 0.25 }
two_stage = { magnification = 10, patch_size = 64, input_size = 32 }
e2e = { magnification = 10, patch_size = 64, input_size = 32, scales = [[10, 0.75], [5, 0.25]] }
synthetic = { kind = "subtyping", n_slides = 12, width = 1024, height = 768, minority_fraction = 0.5 }

[[methods]]
paradigm = "two-stage"
encoder = "resnet18-trunc"
aggregators = ["abmil", "mean"]
random_init = true

[[methods]]
paradigm = "e2e"
encoder = "resnet18-trunc"
aggregator = "abmilx"
random_init = true

[[methods]]
paradigm = "gma"
encoder = "resnet18-trunc"
aggregator = "gma"
random_init = true

[demo]
description = "fault injection on the suite's synthetic cohort"
"""


@dataclass(frozen=True)
class KillPoint:
    stage: str
    trigger: str  # regex on the run's output (progress bars included); "" = a random time after start
    delay: float  # seconds after the trigger (or after start)
    signal: int


def _plan(rng: random.Random) -> list[KillPoint]:
    k, i = signal.SIGKILL, signal.SIGINT
    staged = [
        ("synthesize", r"synthetic cohort in", (0.2, 1.5), (k, i)),
        ("tile", r"tile \d", (0.0, 0.6), (k, i)),
        ("split", r"\] tile \S+: \d+ slides", (0.0,), (k,)),
        ("extract", r"extract resnet18", (0.1, 0.8, 0.4), (k, i, k)),
        ("train two-stage", r"training \(two-stage", (0.3, 1.5, 3.0), (k, i, k)),
        ("evaluate", r"test auc", (0.0,), (k,)),
        ("train e2e", r"training \(e2e", (0.5, 3.0, 6.0), (k, i, k)),
        ("train gma", r"training \(gma", (1.0, 5.0), (k, i)),
        ("gma ranks mid-epoch", r"training \(gma", (8.0, 11.0), (k, k)),
        ("leaderboard", r"gma/\S+ \S+: test auc", (0.0,), (k,)),
    ]
    points = [KillPoint(stage, trig, d + rng.uniform(0, 0.3), sig)
              for stage, trig, delays, sigs in staged for d, sig in zip(delays, sigs)]
    points += [KillPoint("random time", "", rng.uniform(2.0, 25.0), rng.choice([k, i])) for _ in range(3)]
    return points


def _bench(suite: Path, work: Path, boards: Path) -> list[str]:
    script = Path(sys.executable).with_name("bench")  # the console script, as a user runs it
    entry = [str(script)] if script.exists() else [sys.executable, "-m", "bench.cli.main"]
    return [*entry, "run", "--suite", str(suite), "--workdir", str(work),
            "--leaderboards", str(boards), "--workers", "0", "--device", "cpu"]


def _env() -> dict[str, str]:
    return {**os.environ, "BENCH_PROGRESS": "1", "PYTHONUNBUFFERED": "1"}


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes whose arguments mention `text` (the run's work folder)."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().split(")")[-1].split()[0]
        except OSError:
            continue
        if text in cmd and state != "Z":
            out.append(f"{proc.name}: {cmd[:200]}")
    return out


def _check_files(work: Path) -> int:
    """Open every file that passes as complete; return how many were checked."""
    import h5py
    import pandas as pd
    from safetensors.torch import load_file

    from bench.common.files import is_partial

    n = 0
    for path in work.rglob("*"):
        if not path.is_file() or is_partial(path) or path.name.endswith(".lock"):
            continue
        if path.suffix == ".h5":
            with h5py.File(path, "r") as f:  # every dataset, in groups too, reads in full
                f.visititems(lambda _, obj: obj[()] if isinstance(obj, h5py.Dataset) else None)
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".safetensors":
            load_file(str(path))
        elif path.suffix == ".csv" and path.stat().st_size:
            pd.read_csv(path)
        else:
            continue
        n += 1
    return n


def _kill_at(point: KillPoint, cmd: list[str], cwd: Path, timeout: float = 400) -> tuple[bool, str]:
    """Run `cmd` until `point` and signal it; (reached?, output). Not reached: the run ended first."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    out = b""
    start = time.monotonic()
    pattern = re.compile(point.trigger.encode()) if point.trigger else None
    fire_at = start + point.delay if pattern is None else None
    try:
        while True:
            now = time.monotonic()
            if now - start > timeout:
                raise AssertionError(f"run did not reach {point} within {timeout} s:\n{out.decode()[-3000:]}")
            if fire_at is None and pattern is not None and pattern.search(out):
                fire_at = now + point.delay
            if fire_at is not None and now >= fire_at:
                break
            ready, _, _ = select.select([proc.stdout], [], [], 0.05)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:  # the run ended before the point
                    proc.wait()
                    return False, out.decode(errors="replace")
                out += chunk
        if point.signal == signal.SIGINT:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
        else:
            os.kill(proc.pid, signal.SIGKILL)  # the parent alone: its children must not outlive it
        rest, _ = proc.communicate(timeout=120)
        return True, (out + rest).decode(errors="replace")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


_CELL = re.compile(r"\d+\.\d{3} \[\d+\.\d{3}, \d+\.\d{3}\]")


def _metrics(work: Path, boards: Path) -> tuple[dict, dict]:
    records = {}
    for path in sorted((work / "runs").rglob("run.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        records[str(path.parent.relative_to(work))] = (data["status"], data["metrics"])
    cells = {}
    for line in (boards / "faults.md").read_text(encoding="utf-8").splitlines():
        found = _CELL.findall(line)
        method = re.search(r"(two-stage|e2e|gma)/\S+?(?=\s|\*|\|)", line)
        if found and method:
            cells.setdefault(method.group(0), []).append(found)
    return records, cells


def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path):
    suite = tmp_path / "faults.toml"
    suite.write_text(SUITE)
    outside = tmp_path / "elsewhere"  # run from a folder outside the checkout, as a user would
    outside.mkdir()

    ref_work, ref_boards = tmp_path / "ref", tmp_path / "ref-boards"
    t0 = time.monotonic()
    done = subprocess.run(_bench(suite, ref_work, ref_boards), cwd=outside, env=_env(), capture_output=True,
                          text=True, timeout=900)
    reference_seconds = time.monotonic() - t0
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    ref_records, ref_cells = _metrics(ref_work, ref_boards)
    assert ref_records and all(status == "ok" for status, _ in ref_records.values())

    work, boards = tmp_path / "work", tmp_path / "boards"
    cmd = _bench(suite, work, boards)
    rng = random.Random(20261202)
    reached, missed, checked = [], [], 0
    for point in _plan(rng):
        # the stages before training run once and are then cached; to kill training, evaluation and GMA at
        # every planned point, those runs retrain finished methods (--force), resuming interrupted ones
        force = point.stage not in ("synthesize", "tile", "split", "extract")
        hit, output = _kill_at(point, cmd + (["--force"] if force else []), outside)
        (reached if hit else missed).append(point)
        deadline = time.monotonic() + 30
        while (left := _processes_mentioning(str(work))) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"processes left after {point}:\n" + "\n".join(left)
        checked += _check_files(work)
        if point.signal == signal.SIGINT and hit:
            assert "Traceback" not in output, f"SIGINT at {point} printed a traceback:\n{output[-3000:]}"

    final = subprocess.run(cmd, cwd=outside, env=_env(), capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, final.stdout[-2000:] + final.stderr[-4000:]
    records, cells = _metrics(work, boards)
    summary = (f"kill points reached: {len(reached)} ({sum(p.signal == signal.SIGKILL for p in reached)} SIGKILL, "
               f"{sum(p.signal == signal.SIGINT for p in reached)} SIGINT) over stages "
               f"{sorted({p.stage for p in reached})}; not reached (stage already done): "
               f"{[p.stage for p in missed]}; files checked after kills: {checked}; "
               f"reference run {reference_seconds:.0f} s")
    print(summary)
    (tmp_path / "summary.txt").write_text(summary)
    assert records == ref_records, "records after the killed runs differ from the uninterrupted run"
    assert cells == ref_cells, "leaderboard metric cells differ from the uninterrupted run"
    assert len(reached) >= 20, summary
    assert not _processes_mentioning(str(work))
