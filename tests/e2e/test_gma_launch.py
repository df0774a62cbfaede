"""Launching GMA jobs: absolute paths from any folder, no torchrun banner, no rank outliving its launcher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("e2e.patches", reason="GMA reads patches through e2e.patches")

MAG, PATCH = 10.0, 64  # the tiling of the shared gma_fold fixture (tests/e2e/conftest.py)
ROOT = Path(__file__).resolve().parents[2]

# one torch thread: small models on 2 cores run faster, and timings do not fight the other tests
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def fold(gma_fold):
    return gma_fold  # tests/e2e/conftest.py: one tiled cohort for every GMA test module


def config(**kw):
    from e2e.gma.config import GMAConfig

    base = dict(encoder="resnet18-trunc", random_init=True, epochs=1, tiles=4, nproc=3, chunk=8, lr=1e-3,
                magnification=MAG, patch_size=PATCH, input_size=32, precision="fp32", timeout_s=60.0, device="cpu")
    return GMAConfig(**{**base, **kw})


def _fields(job: dict) -> dict[str, str]:
    """field name -> value of every path field (launch.JOB_PATHS) present in a job."""
    from e2e.gma.launch import JOB_PATHS

    out = {}
    for field in JOB_PATHS:
        *parents, key = field.split(".")
        table = job
        for name in parents:
            table = table.get(name) or {}
        for k in (list(table) if key == "*" else [key]):
            if table.get(k) is not None:
                out[f"{'.'.join(parents + [k])}"] = table[k]
    return out


# ----------------------------------------------------------------------------- absolute paths


def test_the_job_file_and_the_command_hold_only_absolute_paths(tmp_path, monkeypatch):
    from e2e.gma.launch import JOB, torchrun_command, write_job

    monkeypatch.chdir(tmp_path)
    job = {"kind": "train", "out": "run", "folder": Path("run/gma"), "tiles_dirs": {"10.0": "tiles/10x", "20.0": "t20"},
           "bags": {"split_path": "splits/holdout-seed0.csv", "fold": 0}, "config": {"weights": "w/enc.pt", "lr": 1},
           "cohort": {"root": "cohort", "labels": "cohort/labels.csv", "slide_dir": "cohort/slides", "name": "x"},
           "predict_test": True}
    path = write_job(job, "run/gma")
    assert path == tmp_path / "run" / "gma" / JOB
    written = json.loads(path.read_text())
    fields = _fields(written)
    assert len(fields) == 9  # every field of JOB_PATHS, both tiles folders
    for name, value in fields.items():
        assert Path(value).is_absolute(), (name, value)
    assert fields["tiles_dirs.10.0"] == str(tmp_path / "tiles" / "10x")
    assert fields["config.weights"] == str(tmp_path / "w" / "enc.pt")
    assert written["cohort"]["name"] == "x" and written["config"]["lr"] == 1 and written["bags"]["fold"] == 0
    assert job["out"] == "run"  # the caller's job is left as it was
    command = torchrun_command(Path("run/gma/job.json"), 3)
    assert command[-2:] == ["--job", str(path)]
    # a check job (no folder, no tiles): its out folder too
    assert json.loads(write_job({"kind": "check", "out": "chk", "weights": None}, "chk").read_text())["out"] == \
        str(tmp_path / "chk")


def test_train_gma_runs_from_another_folder_with_relative_paths_and_without_the_omp_banner(
        fold, tmp_path, monkeypatch, capsys):
    """`bench run` from a folder outside the repository: relative out, tiles, cohort and split paths."""
    from bench.data.cohort import load_cohort
    from e2e.gma.trainer import train_gma

    cohort, tiles, bags = fold
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert Path.cwd() != ROOT
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # torchrun would set it, with its banner
    rel_tiles = Path(os.path.relpath(tiles[MAG], elsewhere))
    rel_cohort = load_cohort(os.path.relpath(cohort.root, elsewhere))
    rel_bags = replace(bags, split_path=Path(os.path.relpath(bags.split_path, elsewhere)))
    capsys.readouterr()
    result = train_gma(rel_bags, rel_cohort, {MAG: rel_tiles}, config(), Path("run"), predict_test=False, echo=True)
    err = capsys.readouterr().err
    assert len(result.history) == 1 and list(result.predictions["val"]["bag_id"]) == list(bags.parts["val"]["bag_id"])
    assert all((elsewhere / "run" / f"{side}.safetensors").exists() for side in ("encoder", "aggregator"))
    job = json.loads((elsewhere / "run" / "gma" / "job.json").read_text())
    fields = _fields(job)
    assert {"out", "folder", "tiles_dirs.10.0", "bags.split_path", "cohort.root"} <= set(fields)
    assert all(Path(v).is_absolute() for v in fields.values()), fields
    assert fields["out"] == str(elsewhere / "run") and fields["tiles_dirs.10.0"] == str(tiles[MAG].resolve())
    assert job["launch"]["pid"] == os.getpid()
    # the ranks' output is streamed (echo=True), and torchrun no longer adds its banner to it
    assert "Setting OMP_NUM_THREADS" not in err and "*****" not in err, err


def test_child_env_sets_one_omp_thread_unless_set_and_makes_path_variables_absolute(tmp_path, monkeypatch):
    from e2e.gma.launch import child_env

    monkeypatch.chdir(tmp_path)
    env = child_env({"PATH": "/bin", "PYTHONPATH": f"src{os.pathsep}/abs/lib", "HF_HOME": "hf", "RANK": "3"})
    assert env["OMP_NUM_THREADS"] == "1" and "RANK" not in env and env["PATH"] == "/bin"
    assert env["PYTHONPATH"] == f"{tmp_path / 'src'}{os.pathsep}/abs/lib" and env["HF_HOME"] == str(tmp_path / "hf")
    assert child_env({"OMP_NUM_THREADS": "4"})["OMP_NUM_THREADS"] == "4"  # the caller's choice stays


# ----------------------------------------------------------------------------- a job ends with its launcher


def _gone_process() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_launcher_gone_tells_a_live_launcher_from_a_dead_or_replaced_one(tmp_path):
    from bench.common.files import write_json_atomic
    from e2e.gma.launch import LAUNCH, LauncherGone, ensure_launcher, launcher_gone, launcher_info

    me = launcher_info()
    job = {"out": str(tmp_path), LAUNCH: me}
    assert me["pid"] == os.getpid() and me["nonce"]
    assert launcher_gone(job) is None and launcher_gone({"out": str(tmp_path)}) is None  # hand-started: no launcher
    assert launcher_gone(job, check_job_file=True) is None  # no job file there: nothing took it over
    dead = {"out": str(tmp_path), LAUNCH: {**me, "pid": _gone_process()}}
    assert "is gone" in launcher_gone(dead)
    with pytest.raises(LauncherGone, match="stopping without writing results"):
        ensure_launcher(dead)
    if me["start"] is not None:  # Linux: a pid that now belongs to another process
        assert "another process" in launcher_gone({"out": str(tmp_path), LAUNCH: {**me, "start": "1"}})
    write_json_atomic(tmp_path / "job.json", {"kind": "train", LAUNCH: {**me, "nonce": "a later launch"}})
    assert "another launch" in launcher_gone(job, check_job_file=True)
    write_json_atomic(tmp_path / "job.json", {"kind": "train", LAUNCH: me})
    assert launcher_gone(job, check_job_file=True) is None


def test_a_rank_whose_launcher_is_gone_exits_without_writing_an_error_file(tmp_path, monkeypatch, capsys):
    from e2e.gma.entry import main
    from e2e.gma.launch import LAUNCH, ORPHAN_EXIT, launcher_info

    job = tmp_path / "job.json"
    job.write_text(json.dumps({"kind": "check", "out": str(tmp_path),
                               LAUNCH: {**launcher_info(), "pid": _gone_process()}}))
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(k, v)
    assert main(["--job", str(job)]) == ORPHAN_EXIT
    assert "is gone" in capsys.readouterr().err
    assert not (tmp_path / "errors").exists()


def test_the_rank_watchdog_ends_its_process_once_the_launcher_is_gone(tmp_path):
    from e2e.gma.launch import LAUNCH, ORPHAN_EXIT, _proc_stat

    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        stat = _proc_stat(launcher.pid)
        job = {"out": str(tmp_path), LAUNCH: {"pid": launcher.pid, "start": stat[1] if stat else None, "nonce": "n"}}
        rank = subprocess.Popen(
            [sys.executable, "-c", "import json, sys, time\nfrom e2e.gma.launch import start_watchdog\n"
             "start_watchdog(json.loads(sys.argv[1]), 1, interval=0.1)\nprint('watching', flush=True)\n"
             "time.sleep(60)\nprint('outlived the launcher', flush=True)", json.dumps(job)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert rank.stdout.readline().strip() == "watching"
        time.sleep(0.5)
        assert rank.poll() is None  # the launcher lives: the rank goes on
        launcher.kill()
        launcher.wait()
        start = time.monotonic()
        out, err = rank.communicate(timeout=20)
        assert rank.returncode == ORPHAN_EXIT and time.monotonic() - start < 5
        assert "outlived" not in out and f"launched this job (pid {launcher.pid}) is gone" in err
    finally:
        for proc in (launcher, locals().get("rank")):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def _processes_of(needle: str) -> list[int]:
    """Pids of the processes whose command line contains `needle` (via /proc)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if needle.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


_LAUNCHER = """
import json, sys
from pathlib import Path
from bench.data.cohort import load_cohort
from bench.data.splits import load_splits
from bench.evaluation.tasks import make_task
from bench.evaluation.training import fold_bags
from e2e.gma.config import GMAConfig
from e2e.gma.trainer import train_gma

root, tiles, split, out, mag, config = sys.argv[1:]
cohort = load_cohort(root)
bags = fold_bags(make_task("classification", classes=cohort.classes), cohort.table, load_splits(split), 0)
train_gma(bags, cohort, {float(mag): Path(tiles)}, GMAConfig(**json.loads(config)), Path(out), echo=True)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_of_the_launcher_stops_torchrun_and_every_rank_and_no_weights_are_written_after(fold, tmp_path):
    """`bench` killed by SIGKILL mid-job: torchrun and its ranks must not finish the job later on their own."""
    cohort, tiles, bags = fold
    out = tmp_path / "run"
    job_file = out / "gma" / "job.json"
    long = config(epochs=500).to_dict()  # far longer than the test: the ranks must not be left to finish it
    log = open(tmp_path / "launcher.log", "w")
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(cohort.root), str(tiles[MAG]),
                                 str(bags.split_path), str(out), str(MAG), json.dumps(long)],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while '"epoch"' not in ((out / "gma" / "events.jsonl").read_text() if (out / "gma" / "events.jsonl").exists()
                                else ""):
            assert launcher.poll() is None, (tmp_path / "launcher.log").read_text()
            assert time.monotonic() < deadline, "the job did not reach its first epoch"
            time.sleep(0.2)
        assert len(_processes_of(str(job_file))) == 4  # torchrun and its 3 ranks
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        killed = time.time()
        deadline = time.monotonic() + 60
        while _processes_of(str(job_file)) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _processes_of(str(job_file))
        assert not left, f"still running {time.time() - killed:.0f} s after the launcher's SIGKILL: {left}"
        time.sleep(2.0)  # nothing left that could write
        for name in ("encoder.safetensors", "aggregator.safetensors", "gma/result.json"):
            assert not (out / name).exists(), name
        late = [str(p.relative_to(out)) for p in out.rglob("*")
                if p.is_file() and p.stat().st_mtime > killed + 1.0]
        assert not late, f"written after the launcher was killed: {late}"
    finally:
        log.close()
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for pid in _processes_of(str(job_file)):  # the job's own processes only (its unique job path)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
