"""Runner and sweep pieces that need no trainer: data roots, tilings, parameters, bench train's suite, sweeps' files."""

from __future__ import annotations

import json

import pytest

from bench.common.errors import ConfigError, DataError, MissingFileError
from bench.data.layout import Layout
from bench.orchestration.runner import cohort_folder, make_task_for, method_settings, split_params, tilings_needed
from bench.orchestration.suite import load_suite, parse_suite
from bench.evaluation.sweeps import read_best, sweep_dir
from bench.orchestration.sweep import _redact, _val_value, summarize_study


def test_wrong_data_root_is_an_error_never_synthetic(tmp_path):
    suite = load_suite("subtyping")
    ds = suite.dataset("tcga-brca")
    layout = Layout(tmp_path / "work")
    assert cohort_folder(ds, None, layout) == (layout.data_dir("tcga-brca"), True)
    with pytest.raises(MissingFileError, match="does not exist or is not a folder"):
        cohort_folder(ds, tmp_path / "nowhere", layout)
    (tmp_path / "root" / "OTHER").mkdir(parents=True)
    with pytest.raises(MissingFileError, match=r"TCGA-BRCA/labels.csv.*Folders found.*OTHER"):
        cohort_folder(ds, tmp_path / "root", layout)
    (tmp_path / "root" / "TCGA-BRCA").mkdir()
    (tmp_path / "root" / "TCGA-BRCA" / "labels.csv").write_text("slide_id,patient_id,label\n")
    assert cohort_folder(ds, tmp_path / "root", layout) == (tmp_path / "root" / "TCGA-BRCA", False)


def test_tilings_follow_the_paradigms():
    suite = load_suite("subtyping", demo=True)
    ds = suite.dataset("tcga-brca")
    two = suite.select(methods=["two-stage/*"]).methods
    e2e = suite.select(methods=["e2e/*"]).methods
    gma = suite.select(methods=["gma/*"]).methods
    assert tilings_needed(ds, two) == [(10.0, 64)]
    assert tilings_needed(ds, e2e) == [(10.0, 64), (5.0, 64)]  # main scale + context scale
    assert tilings_needed(ds, gma) == [(10.0, 64)]
    assert tilings_needed(ds, suite.methods) == [(10.0, 64), (5.0, 64)]


def test_parameters_layer_defaults_method_and_sweep():
    suite = load_suite("subtyping")
    m = suite.method("two-stage/uni/abmil")
    params, agg = method_settings(suite, m)
    assert params["lr"] == 1e-4 and params["epochs"] == 75 and agg == {}
    params, agg = method_settings(suite, m, {"lr": 3e-4, "aggregator.dropout": 0.1})
    assert params["lr"] == 3e-4 and agg == {"dropout": 0.1}
    assert split_params({"a": 1, "aggregator.b": 2}) == ({"a": 1}, {"b": 2})


def test_task_of_a_dataset(synthetic_cohort):
    from bench.data.cohort import load_cohort

    suite = load_suite("subtyping", demo=True)
    cohort = load_cohort(synthetic_cohort("subtyping", n_slides=6))
    task = make_task_for(suite.dataset("tcga-brca"), cohort)
    assert task.kind == "classification" and task.oversample_ratio == 2.0 and task.primary_metric == "auc"
    assert task.classes == cohort.classes


def _train_args(**kw):
    import argparse

    from bench.cli.commands import train

    p = argparse.ArgumentParser()
    train.add_arguments(p)
    argv = ["--cohort", "c"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", *([str(x) for x in v] if isinstance(v, list) else [str(v)])]
    return p.parse_args(argv)


def test_bench_train_builds_a_valid_suite():
    from bench.cli.commands.train import build_suite_dict

    args = _train_args(paradigm="e2e", epochs=3, param=["patience=4"], aggregator_param=["dropout=0.1"],
                       scales=["10:0.75", "5:0.25"], oversample=2)
    raw = build_suite_dict(args, "classification", ("A", "B"), "mini", "mini-folder")
    suite = parse_suite(raw, source="test")
    m = suite.methods[0]
    assert m.name == "e2e/resnet18-trunc/abmilx"
    assert suite.method_params(m) == {"optimizer": "adamw", "lr": 8e-5, "weight_decay": 0.0, "epochs": 3,
                                      "patience": 4}
    assert dict(m.aggregator_params) == {"dropout": 0.1}
    ds = suite.datasets[0]
    assert ds.e2e.magnification == 10 and ds.e2e.scales == ((10.0, 0.75), (5.0, 0.25)) and ds.oversample == 2
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        build_suite_dict(_train_args(param=["oops"]), "classification", ("A", "B"), "mini", "m")
    with pytest.raises(ConfigError, match="MAG:RATIO"):
        build_suite_dict(_train_args(scales=["x:y"]), "classification", ("A", "B"), "mini", "m")


def test_sweep_files_and_values(tmp_path):
    layout = Layout(tmp_path)
    assert read_best(layout, "s", "two-stage/r/abmil", "d", "holdout-seed0-fold0") is None
    folder = sweep_dir(layout, "s", "two-stage/r/abmil", "d", "holdout-seed0-fold0")
    assert folder == tmp_path / "sweeps" / "s" / "two-stage" / "r" / "abmil" / "d" / "holdout-seed0-fold0"
    folder.mkdir(parents=True)
    (folder / "best.json").write_text("{not json")
    with pytest.raises(DataError, match="damaged"):
        read_best(layout, "s", "two-stage/r/abmil", "d", "holdout-seed0-fold0")
    (folder / "best.json").write_text(json.dumps({"best_params": {"lr": 0.01}}))
    assert read_best(layout, "s", "two-stage/r/abmil", "d", "holdout-seed0-fold0")["best_params"] == {"lr": 0.01}
    assert _redact("postgresql://me:secret@db:5432/x") == "postgresql://me:***@db:5432/x"
    assert _redact("sqlite:///a/b.db") == "sqlite:///a/b.db"
    assert _val_value({"val_auc": 0.7, "auc": 0.1}, "auc") == 0.7
    assert _val_value({"val_auc": float("nan")}, "auc") is None
    assert _val_value({"val": {"auc": 0.6}}, "auc") == 0.6


def test_study_summary_counts_states_and_best(tmp_path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))

    def objective(trial):
        x = trial.suggest_float("x", 0, 1)
        trial.suggest_categorical("c", ["a", "b"])
        if trial.number == 1:
            raise ValueError("planted failure")
        if trial.number == 2:
            raise optuna.TrialPruned()
        return -((x - 0.3) ** 2)

    study.optimize(objective, n_trials=6, catch=(Exception,))
    best = summarize_study(study, dataset="d", method="m", metric="auc", storage="sqlite:///x.db")
    assert (best["n_trials"], best["n_complete"], best["n_failed"], best["n_pruned"]) == (6, 4, 1, 1)
    values = [t.value for t in study.trials if t.value is not None]
    assert best["best_value"] == max(values) and set(best["best_params"]) == {"x", "c"}
    assert set(best["importances"]) <= {"x", "c"} and best["metric"] == "val_auc"


_WORKER = """
import sys, time
import optuna
from bench.orchestration.sweep import open_study
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = open_study(sys.argv[1], "shared", seed=int(sys.argv[2]))
def objective(trial):
    x = trial.suggest_float("x", 0, 1)
    time.sleep(0.05)  # keep both writers inside the study at the same time
    return -((x - 0.3) ** 2)
study.optimize(objective, n_trials=6)
"""


def test_two_sweeps_writing_to_one_sqlite_study_at_once_keep_every_trial(tmp_path):
    import subprocess
    import sys

    import optuna

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    workers = [subprocess.Popen([sys.executable, str(script), storage, str(seed)], stderr=subprocess.PIPE, text=True)
               for seed in (0, 1)]
    errors = [w.communicate(timeout=240)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], errors
    study = optuna.load_study(study_name="shared", storage=storage)
    numbers = sorted(t.number for t in study.trials)
    assert numbers == list(range(12))  # both workers' trials, none lost or overwritten
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    # the sampler seed moves with the study's size, so the workers did not replay the same start-up points
    assert len({round(t.params["x"], 12) for t in study.trials}) == 12


def test_synthetic_cohort_of_a_dataset_with_its_own_labels_file_name(tmp_path):
    # the survival suite reads survival.csv from real data; the demo cohort the harness writes has labels.csv
    from bench.evaluation.costs import StageTimer
    from bench.orchestration.runner import RunOptions, prepare_dataset

    suite = parse_suite({
        "name": "s", "seeds": [0],
        "datasets": [{"name": "surv", "task": "survival", "labels": "survival.csv",
                      "split": {"protocol": "holdout", "ratios": [0.6, 0.4], "val_fraction": 0.25},
                      "two_stage": {"magnification": 10, "patch_size": 64, "input_size": 32},
                      "e2e": {"magnification": 10, "patch_size": 64, "input_size": 32},
                      "synthetic": {"kind": "survival", "n_slides": 8, "width": 768, "height": 512}}],
        "methods": [{"paradigm": "two-stage", "encoder": "resnet18-trunc", "aggregator": "mean", "random_init": True}],
    }, source="test")
    prep = prepare_dataset(suite, suite.datasets[0], RunOptions(workdir=tmp_path / "work"), StageTimer())
    assert prep.synthetic and prep.cohort.task == "survival" and len(prep.cohort.slide_ids) >= 8


def test_a_demo_cohort_written_with_other_settings_is_a_clear_error_not_reused(tmp_path):
    from dataclasses import replace

    from bench.common.errors import ConfigError
    from bench.orchestration.runner import make_synthetic
    from bench.orchestration.suite import thaw

    ds = load_suite("subtyping", demo=True).dataset("tcga-brca")
    small = replace(ds, synthetic={**thaw(ds.synthetic), "n_slides": 2, "width": 512, "height": 512})
    folder = make_synthetic(small, tmp_path / "data" / "tcga-brca")
    before = sorted(p.name for p in (folder / "slides").iterdir())
    other = replace(small, synthetic={**thaw(small.synthetic), "witness_rate": 0.3})
    with pytest.raises(ConfigError, match=r"other settings than dataset 'tcga-brca'.*--workdir"):
        make_synthetic(other, folder)
    assert sorted(p.name for p in (folder / "slides").iterdir()) == before  # nothing deleted or rewritten
    assert make_synthetic(small, folder) == folder  # the same settings reuse it
