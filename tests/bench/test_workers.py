"""Workers sharing one suite (bench worker, bench run --executor): same records as one process, each item once,
a SIGKILLed worker's item taken over, the SLURM path through submitit's local executor.

Slow (worker processes import torch and train): `pytest -m slow tests/bench/test_workers.py`; the kill test
is in the fault group: `pytest -m faults tests/bench/test_workers.py`.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SUITE = """
name = "tinyw"
description = "tiny synthetic suite for the worker tests"
seeds = [0, 1]
bootstrap = 100

[defaults.two-stage]
epochs = 4
lr = 1e-3

[defaults.gma]
epochs = 1
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
e2e = { magnification = 10, patch_size = 64, input_size = 32 }
synthetic = { kind = "subtyping", n_slides = 12, width = 1024, height = 768, minority_fraction = 0.5 }

[[methods]]
paradigm = "two-stage"
encoder = "resnet18-trunc"
aggregators = ["abmil", "mean"]
random_init = true

[demo]
defaults.two-stage = { epochs = 4 }
"""
GMA = """
[[methods]]
paradigm = "gma"
encoder = "resnet18-trunc"
aggregator = "gma"
random_init = true
"""
LEASE = 4.0


def _env() -> dict[str, str]:
    # one thread per process: the same arithmetic in every process, and 3 workers fit 2 cores
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "BENCH_PROGRESS": "0"}


def _bench(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench.cli.main", *args]


def _common(suite: Path, work: Path) -> list[str]:
    return ["--suite", str(suite), "--workdir", str(work), "--leaderboards", str(work / "boards"), "--device", "cpu",
            "--workers", "0"]


def _metrics(work: Path) -> dict[str, str]:
    """Every run record's metrics, as the exact JSON text (byte-identical is the claim)."""
    out = {}
    for path in sorted((work / "runs").rglob("run.json")):
        record = json.loads(path.read_text())
        assert record["status"] == "ok", (path, record["error"])
        out[str(path.relative_to(work / "runs"))] = json.dumps(record["metrics"], sort_keys=True)
    return out


def _events(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "work" / "tinyw" / "events.jsonl").read_text().splitlines()]


def _item_runs(work: Path) -> collections.Counter:
    return collections.Counter((e["event"], e["item"]) for e in _events(work) if e["event"] in ("start", "done"))


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("workers")
    path = root / "tinyw.toml"
    path.write_text(SUITE)
    return path


@pytest.fixture(scope="module")
def reference(suite_file):
    """The one-process `bench run` of the suite."""
    work = suite_file.parent / "sequential"
    subprocess.run(_bench("run", *_common(suite_file, work)), check=True, env=_env(), capture_output=True,
                   timeout=900)
    metrics = _metrics(work)
    assert len(metrics) == 4
    return metrics


def _status(suite: Path, work: Path) -> str:
    done = subprocess.run(_bench("status", "--suite", str(suite), "--workdir", str(work)), env=_env(),
                          capture_output=True, text=True, timeout=300, check=True)
    return done.stdout


@pytest.mark.slow
def test_three_workers_give_the_records_of_one_process_and_run_each_item_once(suite_file, reference):
    work = suite_file.parent / "three"
    procs = [subprocess.Popen(_bench("worker", *_common(suite_file, work), "--worker-id", f"w{i}", "--lease", "20"),
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(3)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], logs
    assert _metrics(work) == reference  # byte-identical metrics of every run
    runs = _item_runs(work)
    items = {item for _, item in runs}
    assert len(items) == 1 + 1 + 2 + 4 + 4 + 1  # cohort, tile, 2 splits, 4 extract shards, 4 train, leaderboard
    assert all(runs[("start", i)] == 1 and runs[("done", i)] == 1 for i in items), runs
    assert len({e["worker"] for e in _events(work) if e["event"] == "done"}) >= 2  # the work was shared
    assert (work / "boards" / "tinyw.md").is_file()
    status = _status(suite_file, work)
    assert "| done    |      13 |" in status and "| ready   |       0 |" in status, status
    # a second round finds everything current and does nothing
    again = subprocess.run(_bench("worker", *_common(suite_file, work)), env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and "0 item(s) done here" in again.stderr, again.stderr
    assert _item_runs(work) == runs


@pytest.mark.slow
def test_bench_run_with_the_local_executor_gives_the_records_of_one_process(suite_file, reference):
    work = suite_file.parent / "local"
    done = subprocess.run(_bench("run", *_common(suite_file, work), "--executor", "local", "--jobs", "2"),
                          env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _metrics(work) == reference
    assert "2 local worker(s)" in done.stderr and "items: done 13" in done.stderr
    assert "| abmil" in done.stdout or "abmil" in done.stdout  # the leaderboard is printed
    runs = _item_runs(work)
    assert all(runs[("done", i)] == 1 for _, i in runs) and len({i for _, i in runs}) == 13


@pytest.mark.faults
def test_a_sigkilled_worker_is_taken_over_and_the_suite_completes(suite_file, reference):
    work = suite_file.parent / "killed"
    args = [*_common(suite_file, work), "--lease", str(LEASE)]
    victim = subprocess.Popen(_bench("worker", *args, "--worker-id", "victim"), env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    helper = subprocess.Popen(_bench("worker", *args, "--worker-id", "helper"), env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed_item, deadline = None, time.time() + 600
    while killed_item is None and time.time() < deadline:  # kill the victim 1.5 s into its first training
        time.sleep(0.2)
        if (work / "work" / "tinyw" / "events.jsonl").exists():
            starts = [e for e in _events(work) if e["event"] == "start" and e["worker"] == "victim"
                      and e["item"].startswith("train/")]
            if starts and time.time() - starts[0]["t"] > 1.5:
                killed_item = starts[0]["item"]
    assert killed_item is not None, "the victim never started a training item"
    victim.send_signal(signal.SIGKILL)
    killed_at = time.time()
    victim.wait(timeout=30)
    log = helper.communicate(timeout=900)[0]
    assert helper.returncode == 0, log
    events = _events(work)
    taken = [e for e in events if e["event"] == "start" and e["item"] == killed_item and e["worker"] == "helper"]
    assert len(taken) == 1 and taken[0]["took_over"], [e for e in events if e["item"] == killed_item]
    # taken over once the lease ran out, and within 5 s of that (or of the helper becoming free)
    free = max([killed_at + LEASE - 1.0] + [e["t"] for e in events if e["worker"] == "helper"
                                              and e["event"] in ("done", "failed") and e["t"] < taken[0]["t"]])
    assert killed_at - 1.0 + LEASE <= taken[0]["t"] <= free + 5.0 + 1.0, (killed_at, taken[0]["t"], free)
    runs = _item_runs(work)
    assert all(runs[("done", i)] == 1 for _, i in runs), runs  # no item run twice to completion
    assert _metrics(work) == reference


@pytest.mark.slow
def test_the_slurm_path_through_submitit_local_executor_runs_a_gma_item(suite_file, tmp_path):
    from bench.orchestration.plan import Context, build_plan, counts, item_states
    from bench.orchestration.runner import RunOptions
    from bench.orchestration.worker import SlurmOptions, WorkerOptions, WorkerSpec, submit_slurm

    path = tmp_path / "tinyw.toml"
    path.write_text(SUITE + GMA)
    options = RunOptions(workdir=tmp_path / "w", leaderboards=tmp_path / "w" / "boards", device="cpu",
                         extract_workers=0, seeds=(0,))
    spec = WorkerSpec(str(path), None, None, options, WorkerOptions(lease_s=30, poll_s=1.0),
                      env=(("OMP_NUM_THREADS", "1"),))
    jobs = submit_slurm(spec, 2, SlurmOptions(time_min=20), cluster="local")
    assert len(jobs) == 3  # an array of 2 workers plus the allocation for the GMA item (nproc 3 > 1 GPU a worker)
    results = [job.result() for job in jobs]
    from bench.orchestration.suite import load_suite

    plan = build_plan(load_suite(path, demo=True), options)
    assert len(plan.items) == 1 + 1 + 1 + 4 + 3 + 1  # cohort, tiling (shared), split, 4 shards, 3 train, leaderboard
    ran = [i["id"] for r in results for i in r["items"] if i["status"] == "ok"]
    assert sorted(ran) == sorted(it.id for it in plan.items)  # each item once, over the three jobs
    assert counts(item_states(Context(plan, readonly=True)))["done"] == len(plan.items)
    gma = json.loads(next((options.workdir / "runs").rglob("gma/*/run.json")).read_text())
    assert gma["status"] == "ok" and len(gma["extra"]["ranks"]) == 3


def test_executor_errors_name_the_fix(tmp_path, monkeypatch, capsys):
    from bench.cli.main import main

    path = tmp_path / "tinyw.toml"
    path.write_text(SUITE)
    assert main(["run", "--suite", str(path), "--workdir", str(tmp_path / "w"), "--executor", "kubernetes"]) == 2
    assert "known executors: local, slurm" in capsys.readouterr().err
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert main(["run", "--suite", str(path), "--workdir", str(tmp_path / "w"), "--executor", "slurm"]) == 2
    err = capsys.readouterr().err
    assert "sbatch" in err and "bench worker" in err


def test_a_worker_on_a_read_only_work_folder_says_which_folder(tmp_path, monkeypatch, capsys):
    import errno

    from bench.cli.main import main

    path = tmp_path / "tinyw.toml"
    path.write_text(SUITE)

    def read_only(self, data):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "write_bytes", read_only)  # tests run as root, where chmod stops nothing
    assert main(["worker", "--suite", str(path), "--workdir", str(tmp_path / "w"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {tmp_path / 'w' / 'work' / 'tinyw'}: [Errno 30] Read-only file system" in err, err
    assert not (tmp_path / "w" / "work" / "tinyw" / "events.jsonl").exists()  # nothing claimed or logged
