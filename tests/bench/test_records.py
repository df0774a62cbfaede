"""Run records: evaluation at write time, failed runs kept, currency by config hash, `bench runs`."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from bench.cli.main import main
from bench.evaluation.records import is_current, iter_runs, load_run, split_tag, write_run
from bench.evaluation.tasks import make_task
from bench.evaluation.training import TrainResult

SPLIT = {"path": "splits/mini/holdout-seed0.csv", "sha256": "ab" * 32, "protocol": "holdout", "seed": 0, "fold": 0}


def _method(name="two-stage/resnet18-trunc/abmil"):
    paradigm, encoder, aggregator = name.split("/")
    return {"name": name, "paradigm": paradigm, "encoder": encoder, "aggregator": aggregator,
            "params": {"lr": 1e-3}, "aggregator_params": {}, "weights_id": "random-init", "random_init": True,
            "params_source": "suite"}


def _predictions(n=60, seed=0, signal=1.5):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, n)
    logit = signal * (label - 0.5) + rng.normal(size=n)
    p1 = 1 / (1 + np.exp(-logit))
    return pd.DataFrame({"bag_id": [f"s{i}" for i in range(n)], "patient_id": [f"p{i // 2}" for i in range(n)],
                         "label": label, "prob_0": 1 - p1, "prob_1": p1})


def _write(run_dir, result, status="ok", error=None, chash="h1", **kw):
    task = make_task("classification", classes=("IDC", "ILC"))
    return write_run(run_dir, suite="tiny", dataset="mini", task=task, method=_method(), split=SPLIT, seed=0,
                     config_hash=chash, result=result, status=status, error=error, started="2026-01-01T00:00:00",
                     ended="2026-01-01T00:01:00", n_bootstrap=300, bootstrap_seed=3, **kw)


def test_split_tag():
    assert split_tag("kfold", 2, 4) == "kfold-seed2-fold4"


def test_ok_record_evaluates_test_predictions_and_reads_back(tmp_path):
    test = _predictions()
    result = TrainResult(predictions={"test": test, "val": _predictions(20, seed=1)}, best_epoch=2, best_value=0.8,
                         costs={"train_seconds": 1.5, "infer_seconds_per_slide": 0.01, "peak_memory_mb": float("nan")},
                         params={"lr": 1e-3, "epochs": 3}, extra={"ranks": [1, 2]})
    record = _write(tmp_path / "run", result, synthetic=True, extra={"skipped_slides": [("s9", "no tissue")]})
    auc = record.metrics["auc"]
    # the point estimate is sklearn's AUC on the whole test table; the interval brackets the resample mean
    assert auc["estimate"] == pytest.approx(roc_auc_score(test["label"], test["prob_1"]), abs=1e-12)
    assert auc["low"] <= auc["mean"] <= auc["high"] and auc["n_resamples"] == 300 and auc["seed"] == 3
    assert set(record.metrics) == {"auc", "balanced_accuracy", "f1_macro", "accuracy"}
    data = json.loads((tmp_path / "run" / "run.json").read_text())  # strict JSON: NaN became null
    assert data["costs"]["peak_memory_mb"] is None and data["synthetic"] is True
    assert data["extra"] == {"skipped_slides": [["s9", "no tissue"]], "ranks": [1, 2]}
    assert data["split"]["tag"] == "holdout-seed0-fold0" and data["n_test"] == 60
    assert data["val"] == {"metric": "auc", "best_epoch": 2, "best_value": 0.8}
    back = load_run(tmp_path / "run")
    pd.testing.assert_frame_equal(back.predictions("test"), test, check_dtype=False)
    assert len(back.predictions("val")) == 20
    assert back.task().classes == ("IDC", "ILC")
    assert is_current(tmp_path / "run", "h1") and not is_current(tmp_path / "run", "h2")


def test_failed_record_keeps_the_error_and_is_never_current(tmp_path):
    record = _write(tmp_path / "run", None, status="failed", error="TrainingError: loss became nan")
    assert record.status == "failed" and record.metrics == {}
    assert record.data["error"] == "TrainingError: loss became nan"
    assert (tmp_path / "run" / "run.json").exists() and not (tmp_path / "run" / "predictions.csv").exists()
    assert not is_current(tmp_path / "run", "h1")


def test_a_failed_rerun_never_replaces_a_finished_result(tmp_path, capsys):
    run = tmp_path / "work" / "runs" / "tiny" / "mini" / "two-stage" / "resnet18-trunc" / "abmil" / "holdout-seed0-fold0"
    _write(run, TrainResult(predictions={"test": _predictions(), "val": _predictions(20, seed=1)}))
    (run / "aggregator.safetensors").write_bytes(b"weights")
    before = {name: (run / name).read_bytes() for name in ("run.json", "predictions.csv", "predictions-val.csv")}
    failed = _write(run, None, status="failed", error="ConfigError: unknown parameter 'patienc'", chash="h2")
    assert failed.status == "failed" and failed.run_dir == run
    assert {name: (run / name).read_bytes() for name in before} == before  # the finished result is untouched
    assert (run / "aggregator.safetensors").read_bytes() == b"weights"
    assert json.loads((run / "run-failed.json").read_text())["error"].startswith("ConfigError: unknown parameter")
    assert load_run(run).ok and is_current(run, "h1")
    # `bench runs` shows the finished record and the failed rerun beside it; the leaderboard reads only the first
    assert [r.status for r in iter_runs(tmp_path / "work", "tiny", failed_reruns=True)] == ["ok", "failed"]
    assert [r.status for r in iter_runs(tmp_path / "work", "tiny")] == ["ok"]
    assert main(["runs", "--workdir", str(tmp_path / "work")]) == 0
    out = capsys.readouterr().out
    assert "auc 0." in out and "unknown parameter 'patienc'" in out
    # a newer finished result replaces the old one and clears the failed rerun
    _write(run, TrainResult(predictions={"test": _predictions(seed=5)}), chash="h3")
    assert is_current(run, "h3") and not (run / "run-failed.json").exists()
    assert not (run / "predictions-val.csv").exists()  # no stale validation predictions of the older run


def test_ok_without_test_predictions_is_refused(tmp_path):
    from bench.common.errors import DataError

    with pytest.raises(DataError, match="no test predictions"):
        _write(tmp_path / "run", TrainResult(predictions={"val": _predictions()}))


def test_iter_runs_skips_a_damaged_record_with_a_warning_and_bench_runs_lists(tmp_path, capsys):
    work = tmp_path / "work"
    base = work / "runs" / "tiny" / "mini" / "two-stage" / "resnet18-trunc"
    _write(base / "abmil" / "holdout-seed0-fold0", TrainResult(predictions={"test": _predictions()}))
    _write(base / "mean" / "holdout-seed0-fold0", None, status="failed", error="RuntimeError: planted")
    broken = base / "dsmil" / "holdout-seed0-fold0"
    broken.mkdir(parents=True)
    (broken / "run.json").write_text("{not json")
    records = iter_runs(work, "tiny")
    assert [r.status for r in records] == ["ok", "failed"]
    assert "cannot be read" in capsys.readouterr().err
    assert main(["runs", "--workdir", str(work)]) == 0
    out = capsys.readouterr().out
    assert "auc 0." in out and "RuntimeError: planted" in out and "2 run(s), 1 failed" in out
    assert main(["runs", "--workdir", str(work), "--failed"]) == 0
    assert "planted" in capsys.readouterr().out


def test_bench_runs_on_an_empty_workdir_says_what_to_run(tmp_path, capsys):
    assert main(["runs", "--workdir", str(tmp_path)]) == 2
    assert "bench run --suite" in capsys.readouterr().err


def test_the_operating_point_comes_from_validation_alone(tmp_path):
    from sklearn.metrics import balanced_accuracy_score

    val = _predictions(40, seed=1)
    val["prob_1"] = np.clip(val["prob_1"] * 0.4 + 0.5, 0, 1)  # scores far from 0.5: argmax would be poor
    val["prob_0"] = 1 - val["prob_1"]
    test = _predictions(60, seed=2)
    first = _write(tmp_path / "a", TrainResult(predictions={"test": test, "val": val}))
    op = first.data["operating_point"]
    t = op["threshold"]
    # the threshold maximises balanced accuracy on validation (= Youden's J): no other cut does better
    best = max(balanced_accuracy_score(val["label"], (val["prob_1"] >= c).astype(int))
               for c in np.unique(val["prob_1"]))
    assert op["val_balanced_accuracy"] == pytest.approx(best, abs=1e-12)
    assert balanced_accuracy_score(val["label"], (val["prob_1"] >= t).astype(int)) == pytest.approx(best)
    # the test metrics use it
    expect = balanced_accuracy_score(test["label"], (test["prob_1"] >= t).astype(int))
    assert first.metrics["balanced_accuracy"]["estimate"] == pytest.approx(expect, abs=1e-12)
    assert first.task().threshold == t
    # flipping every test label changes the test metrics, never the threshold
    flipped = test.assign(label=1 - test["label"])
    second = _write(tmp_path / "b", TrainResult(predictions={"test": flipped, "val": val}))
    assert second.data["operating_point"]["threshold"] == t
    assert second.metrics["balanced_accuracy"]["estimate"] != first.metrics["balanced_accuracy"]["estimate"]


def test_one_class_validation_falls_back_to_argmax_visibly(tmp_path):
    val = _predictions(20, seed=1)
    val["label"] = 0
    record = _write(tmp_path / "run", TrainResult(predictions={"test": _predictions(), "val": val}))
    op = record.data["operating_point"]
    assert op["rule"] == "argmax" and "one class only" in op["why"] and record.task().threshold is None
    test = _predictions()
    argmax = (test["prob_1"] > test["prob_0"]).astype(int)
    from sklearn.metrics import balanced_accuracy_score

    assert record.metrics["balanced_accuracy"]["estimate"] == pytest.approx(
        balanced_accuracy_score(test["label"], argmax), abs=1e-12)
