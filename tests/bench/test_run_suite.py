"""`bench run` end to end on a tiny synthetic suite: two-stage + E2E + GMA, records, leaderboard, resume, failures."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench.orchestration.runner import RunOptions, run_suite, stage_table
from bench.orchestration.suite import load_suite

TINY = """
name = "tiny"
description = "tiny synthetic suite for tests"
seeds = [0]
bootstrap = 200

[defaults.two-stage]
epochs = 3
lr = 1e-3

[defaults.e2e]
epochs = 1
lr = 3e-4
samples = 8
workers = 0
infer_chunk = 64

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
e2e = { magnification = 10, patch_size = 64, input_size = 32, scales = [[10, 0.75], [5, 0.25]] }
synthetic = { kind = "subtyping", n_slides = 12, width = 1024, height = 768, minority_fraction = 0.5 }

[[methods]]
paradigm = "two-stage"
encoder = "resnet18-trunc"
aggregators = ["abmil", "mean"]
random_init = true
[methods.search]
lr = { type = "float", low = 1e-4, high = 1e-2, log = true }
"aggregator.dropout" = { type = "categorical", choices = [0.1, 7.0] }

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
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-suite")
    path = root / "tiny.toml"
    path.write_text(TINY)
    return root, path


def _options(root: Path, **kw) -> RunOptions:
    return RunOptions(workdir=root / "work", leaderboards=root / "boards", extract_workers=0, device="cpu",
                      command="bench run --suite tiny.toml", **kw)


def test_suite_runs_end_to_end_then_reuses_everything(tiny):
    root, path = tiny
    suite = load_suite(path)
    report = run_suite(suite, _options(root))
    status = {o.method: o.status for o in report.outcomes}
    assert status == {"two-stage/resnet18-trunc/abmil": "ok", "two-stage/resnet18-trunc/mean": "ok",
                      "e2e/resnet18-trunc/abmilx": "ok", "gma/resnet18-trunc/gma": "ok"}, report.failed
    for o in report.outcomes:
        record = json.loads((o.run_dir / "run.json").read_text())
        assert record["status"] == "ok"
        auc = record["metrics"]["auc"]
        assert 0 <= auc["low"] <= auc["mean"] <= auc["high"] <= 1 and auc["n_resamples"] == 200
        costs = record["costs"]
        assert costs["train_seconds"] > 0 and costs["infer_seconds_per_slide"] > 0 and costs["params"] > 0
        assert (o.run_dir / "predictions.csv").exists()
    two = json.loads((report.outcomes[0].run_dir / "run.json").read_text())
    assert two["costs"]["feature_seconds"] > 0  # two-stage pays for its share of feature extraction
    gma = json.loads((report.outcomes[-1].run_dir / "run.json").read_text())
    assert len(gma["extra"]["ranks"]) == 3  # per-rank costs of 1 aggregator + 2 encoder processes

    board = report.leaderboard.read_text()
    assert "synthetic" in board.lower()
    for method in status:
        assert method.split("/")[-1] in board
    assert re.search(r"\d\.\d+ \[\d\.\d+, \d\.\d+\]", board)  # mean [low, high]
    assert "Unreadable" not in board and "Not ranked" not in board and "Failed runs" not in board
    assert str(root) not in board  # committed leaderboards carry no machine-specific paths

    # the stage table says what the extraction ran with (extract_workers=0: read in the main process)
    (note,) = report.stage_notes["extract"]
    assert re.fullmatch(r"resnet18-trunc: batch \d+, 0 reading worker\(s\) \(as asked\), \d+ encoder thread\(s\), cpu",
                        note), note
    table = stage_table(report)
    assert re.search(r"\| extract +\| +[\d.]+ \| resnet18-trunc: batch \d+, 0 reading worker", table), table
    last = json.loads((root / "work" / "runs" / "tiny" / "last-run.json").read_text())
    assert last["stage_settings"]["extract"] == report.stage_notes["extract"]

    again = run_suite(suite, _options(root))
    assert {o.status for o in again.outcomes} == {"cached"}
    assert again.stage_seconds.get("train two-stage", 0) == 0
    assert "extract" not in again.stage_notes  # nothing extracted, nothing to report


def test_a_finished_run_keeps_its_weights_but_not_its_resume_checkpoint(tiny):
    root, path = tiny
    report = run_suite(load_suite(path).select(methods=["e2e/*", "two-stage/*/abmil"]), _options(root, force=True))
    assert {o.status for o in report.outcomes} == {"ok"}
    for outcome in report.outcomes:
        assert not (outcome.run_dir / "checkpoint").exists(), outcome.run_dir
        assert list(outcome.run_dir.glob("*.safetensors")), outcome.run_dir  # the selected weights stay


def test_failing_method_is_recorded_and_others_go_on(tiny, monkeypatch):
    root, path = tiny
    suite = load_suite(path).select(methods=["two-stage/*"])
    import bench.orchestration.runner as runner

    run_suite(suite, _options(root))  # both methods finished (cached after the first test)
    real = runner.train_method

    def flaky(prep, method, *args, **kwargs):
        if method.aggregator == "mean":
            raise RuntimeError("planted bug in the mean trainer")
        return real(prep, method, *args, **kwargs)

    monkeypatch.setattr(runner, "train_method", flaky)
    report = run_suite(suite, _options(root, force=True))
    status = {o.method: o.status for o in report.outcomes}
    assert status == {"two-stage/resnet18-trunc/abmil": "ok", "two-stage/resnet18-trunc/mean": "failed"}
    failed = json.loads(report.failed[0].record.read_text())
    assert failed["status"] == "failed" and "planted bug" in failed["error"]
    # the mean method had finished: its finished record stays, the failure sits beside it
    assert report.failed[0].record.name == "run-failed.json"
    assert json.loads((report.failed[0].run_dir / "run.json").read_text())["status"] == "ok"
    assert "traceback" in failed["extra"]  # a bug (not bad input) keeps its traceback


def test_interrupted_run_resumes_without_redoing_finished_methods(tiny, monkeypatch):
    root, path = tiny
    suite = load_suite(path).select(methods=["two-stage/*"])
    import bench.orchestration.runner as runner

    real = runner.train_method
    calls: list[str] = []

    def interrupted(prep, method, *args, **kwargs):
        calls.append(method.aggregator)
        if method.aggregator == "mean":
            raise KeyboardInterrupt
        return real(prep, method, *args, **kwargs)

    import shutil

    # mean has no record yet (an earlier test may have left one): the interrupted run must not finish it
    for folder in (root / "work" / "runs").rglob("mean"):
        shutil.rmtree(folder)
    monkeypatch.setattr(runner, "train_method", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_suite(suite, _options(root, force=True))
    monkeypatch.setattr(runner, "train_method", real)
    report = run_suite(suite, _options(root))
    assert {o.method: o.status for o in report.outcomes} == {"two-stage/resnet18-trunc/abmil": "cached",
                                                              "two-stage/resnet18-trunc/mean": "ok"}


def test_sweep_resumes_records_failures_and_feeds_run_params_best(tiny):
    from bench.data.layout import Layout
    from bench.evaluation.sweeps import read_best
    from bench.orchestration.sweep import run_sweep

    root, path = tiny
    suite = load_suite(path)
    method = "two-stage/resnet18-trunc/abmil"
    options = _options(root)
    first = run_sweep(suite, method, 3, options, seed=0)["holdout-seed0-fold0"]
    assert first["n_trials"] == 3
    best = run_sweep(suite, method, 3, options, seed=0)["holdout-seed0-fold0"]  # resumed: three more trials
    assert best["n_trials"] == 6
    assert best["n_failed"] >= 1  # dropout 7.0 is refused by the aggregator: a planted failing trial
    assert best["best_params"]["aggregator.dropout"] == 0.1
    assert read_best(Layout(options.workdir), "tiny", method, "mini", "holdout-seed0-fold0")["best_value"] == \
        best["best_value"]
    trials = Layout(options.workdir).sweep_dir("tiny", f"{method}/mini/holdout-seed0-fold0") / "trials"
    assert not list(trials.rglob("predictions*.csv"))  # trials never predict the test split

    report = run_suite(suite.select(methods=[method]), RunOptions(**{**options.__dict__, "params": "best"}))
    record = json.loads((report.outcomes[0].run_dir / "run.json").read_text())
    assert record["params"]["lr"] == pytest.approx(best["best_params"]["lr"])
