"""Nested tuning: `bench sweep` tunes every fold on that fold's train/validation only, and
`bench run --params best` uses on each fold the parameters tuned on that fold."""

from __future__ import annotations

import json

import pandas as pd

from bench.data.layout import Layout
from bench.orchestration.runner import RunOptions, run_suite
from bench.orchestration.suite import load_suite
from bench.orchestration.sweep import run_sweep

SUITE = """
name = "nested"
seeds = [0]
bootstrap = 50

[defaults.two-stage]
epochs = 2
lr = 1e-3

[[datasets]]
name = "mini"
task = "classification"
classes = ["IDC", "ILC"]
split = { protocol = "kfold", folds = 3, val_fraction = 0.25 }
two_stage = { magnification = 10, patch_size = 64, input_size = 32 }
synthetic = { kind = "subtyping", n_slides = 12, width = 1024, height = 768, minority_fraction = 0.5 }

[[methods]]
paradigm = "two-stage"
encoder = "resnet18-trunc"
aggregator = "mean"
random_init = true
[methods.search]
lr = { type = "float", low = 1e-4, high = 1e-2, log = true }
"""


def test_no_parameter_used_on_a_fold_was_tuned_on_its_test_patients(tmp_path):
    path = tmp_path / "nested.toml"
    path.write_text(SUITE)
    suite = load_suite(path)
    options = RunOptions(workdir=tmp_path / "work", leaderboards=None, extract_workers=0, device="cpu")
    method = "two-stage/resnet18-trunc/mean"
    results = run_sweep(suite, method, 2, options)
    assert sorted(results) == ["kfold-seed0-fold0", "kfold-seed0-fold1", "kfold-seed0-fold2"]
    # each fold has its own study, with its own best parameters
    assert len({r["study"] for r in results.values()}) == 3

    report = run_suite(suite, RunOptions(**{**options.__dict__, "params": "best"}))
    assert [o.status for o in report.outcomes] == ["ok", "ok", "ok"]
    split_file = next((tmp_path / "work" / "splits" / "mini").glob("kfold-seed0.csv"))
    splits = pd.read_csv(split_file)
    for outcome in report.outcomes:
        record = json.loads((outcome.run_dir / "run.json").read_text())
        fold = record["split"]["fold"]
        tag = record["split"]["tag"]
        best = json.loads((Layout(options.workdir).sweep_dir("nested", f"{method}/mini/{tag}") / "best.json")
                          .read_text())
        assert record["method"]["params_source"] == "sweep" and record["method"]["params_tuned_on"] == tag
        assert record["params"]["lr"] == best["best_params"]["lr"]
        assert best["split"]["fold"] == fold and best["split"]["sha256"] == record["split"]["sha256"]
        # the patients the study trained and validated on hold none of this fold's test patients
        rows = splits[splits["fold"] == fold]
        test_patients = set(rows.loc[rows["part"] == "test", "patient_id"].astype(str))
        assert test_patients and not test_patients & set(best["tuned_on_patients"])
        assert len(best["tuned_on_patients"]) + len(test_patients) == splits["patient_id"].nunique()
