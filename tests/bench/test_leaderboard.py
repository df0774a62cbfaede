"""Leaderboards from run records: order, intervals, paired tests, failures, plots, reported rows, CLI."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.cli.main import main
from bench.data.layout import Layout
from bench.evaluation.leaderboard import NOT_SIGNIFICANT, SYNTHETIC_NOTE, build_leaderboard, load_reported, pareto_front
from bench.evaluation.records import load_run, split_tag, write_run
from bench.evaluation.tasks import make_task
from bench.evaluation.training import TrainResult

N_BOOT = 200
CI = re.compile(r"\d\.\d+ \[\d\.\d+, \d\.\d+\]")


def _costs(infer: float, train: float = 30.0) -> dict:
    return {"train_seconds": train, "infer_seconds_per_slide": infer, "peak_memory_mb": 812.0, "params": 1_250_000,
            "flops": None, "device": "cpu (test)", "trainable_params": 1_250_000,
            "peak_memory_kind": "peak_rss_since_reset",
            "feature_seconds": 0.0, "feature_seconds_per_slide": 0.0}


def _record(workdir: Path, suite: str, dataset: str, task, method: str, frame: pd.DataFrame | None, *,
            seed: int = 0, infer: float = 0.1, error: str | None = None, synthetic: bool = True,
            sha256: str | None = None, ended: str = "2025-01-01T00:01:00+00:00"):
    """A record as the runner writes it: the split file's path inside the work folder (absolute here)."""
    paradigm, encoder, aggregator = method.split("/")
    split = {"path": str(Layout(workdir).split_file(dataset, "holdout", seed)),
             "sha256": sha256 or f"{seed:02d}" + "ab" * 31, "protocol": "holdout", "seed": seed, "fold": 0}
    run_dir = Layout(workdir).run_dir(suite, dataset, method, split_tag("holdout", seed, 0))
    info = {"name": method, "paradigm": paradigm, "encoder": encoder, "aggregator": aggregator, "params": {},
            "aggregator_params": {}, "weights_id": "random-init", "random_init": True, "params_source": "suite"}
    result = None if frame is None else TrainResult(predictions={"test": frame, "val": frame}, costs=_costs(infer))
    return write_run(run_dir, suite=suite, dataset=dataset, task=task, method=info, split=split, seed=seed,
                     config_hash="h", result=result, status="failed" if frame is None else "ok", error=error,
                     started="2025-01-01T00:00:00+00:00", ended=ended, n_bootstrap=N_BOOT,
                     bootstrap_seed=seed, synthetic=synthetic, command=f"bench run --suite {suite}")


def _classification(n: int = 120, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Predictions of four methods on the same bags: strong, its near twin, chance, and a mid one."""
    rng = np.random.default_rng(seed)
    y = np.tile([0, 1], n // 2)
    base = dict(bag_id=[f"s{i}" for i in range(n)], patient_id=[f"p{i}" for i in range(n)], label=y)

    def frame(p1):
        p1 = np.clip(p1, 1e-3, 1 - 1e-3)
        return pd.DataFrame({**base, "prob_0": 1 - p1, "prob_1": p1})

    strong = 0.5 + 0.3 * (2 * y - 1) + rng.normal(0, 0.3, n)
    twin = strong.copy()
    order = np.argsort(strong)
    k = next(k for k in range(n - 1) if y[order[k]] == 0 and y[order[k + 1]] == 1)
    i, j = order[k], order[k + 1]
    twin[i], twin[j] = strong[j], strong[i]  # neighbours in rank swap: one pair flips, AUC moves by 1/3600
    mid = 0.5 + 0.1 * (2 * y - 1) + rng.normal(0, 0.2, n)
    chance = rng.uniform(0, 1, n)
    return {"two-stage/r18/abmil": frame(strong), "e2e/r18/abmilx": frame(twin),
            "two-stage/r18/mean": frame(mid), "gma/r18/gma": frame(chance)}


def _survival(n: int = 80, seed: int = 0, noise: float = 0.5) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    risk = rng.normal(0, 1, n)
    time = rng.exponential(np.exp(-risk)) * 10 + 0.1
    event = (rng.uniform(0, 1, n) < 0.7).astype(int)
    return pd.DataFrame({"bag_id": [f"p{i}" for i in range(n)], "patient_id": [f"p{i}" for i in range(n)],
                         "time": time, "event": event, "risk": risk + rng.normal(0, noise, n)})


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    root = tmp_path_factory.mktemp("board")
    work = root / "work"
    task = make_task("classification", classes=("IDC", "ILC"))
    infer = {"two-stage/r18/abmil": 0.5, "e2e/r18/abmilx": 0.05, "two-stage/r18/mean": 0.02, "gma/r18/gma": 0.9}
    for method, frame in _classification().items():
        _record(work, "subtyping", "tcga-brca", task, method, frame, infer=infer[method])
    _record(work, "subtyping", "tcga-brca", task, "two-stage/r18/transmil", None,
            error="TrainingError: loss became NaN at epoch 3 | planted")
    sweep = Layout(work).sweep_dir("subtyping", "two-stage/r18/abmil/tcga-brca/holdout-seed0-fold0")
    sweep.mkdir(parents=True)
    (sweep / "best.json").write_text(json.dumps({
        "metric": "val_auc", "n_trials": 12, "n_complete": 9, "n_pruned": 2, "n_failed": 1, "best_value": 0.9123,
        "best_trial": 7, "best_params": {"lr": 0.000213, "aggregator.dropout": 0.25},
        "importances": {"lr": 0.8, "aggregator.dropout": 0.2}}))
    out = root / "boards"
    path = build_leaderboard(work, "subtyping", out, reported="abmilx", command="bench run --suite subtyping")
    return work, out, path, path.read_text(encoding="utf-8")


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def _table_rows(text: str) -> list[dict[str, str]]:
    """The first GitHub table in `text` as dicts."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]
            if len(ln.strip("|").split("|")) == len(header)]


def _measured(text: str) -> list[dict[str, str]]:
    section = _section(text, "## tcga-brca")
    return _table_rows(section.split("**Failed runs**")[0])


def test_rows_sorted_by_primary_metric_best_bold_intervals_from_records(board):
    work, _, _, text = board
    rows = _measured(text)
    assert [r["aggregator"] for r in rows][0] in ("abmil", "abmilx")  # the strong pair first
    assert [r["aggregator"] for r in rows][2:] == ["mean", "gma"]
    means = [float(re.search(r"\d\.\d+", r["AUC"]).group()) for r in rows]
    assert means == sorted(means, reverse=True)
    assert rows[0]["AUC"].startswith("**") and not rows[-1]["AUC"].startswith("**")
    assert rows[0]["vs best"] == "best"
    for r in rows:
        method = f"{r['paradigm']}/{r['encoder']}/{r['aggregator']}"
        record = load_run(Layout(work).run_dir("subtyping", "tcga-brca", method, "holdout-seed0-fold0"))
        for metric, column in (("auc", "AUC"), ("balanced_accuracy", "balanced acc"), ("accuracy", "accuracy")):
            ci = record.metrics[metric]
            assert r[column].strip("*") == f"{ci['mean']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"
            assert CI.fullmatch(r[column].strip("*"))
    costs = {r["aggregator"]: r for r in rows}
    assert costs["abmil"]["infer s/slide"] == "0.5" and costs["abmil"]["train time"] == "30.0 s"
    assert costs["abmil"]["peak memory"] == "812 MiB (RSS)" and costs["abmil"]["params"] == "1.25M"


def test_near_identical_method_is_not_significant_and_worse_ones_are(board):
    _, _, _, text = board
    rows = {r["aggregator"]: r for r in _measured(text)}
    twin = rows["abmilx"] if rows["abmil"]["vs best"] == "best" else rows["abmil"]
    assert twin["vs best"].startswith(NOT_SIGNIFICANT)
    assert twin["vs best"].startswith(f"{NOT_SIGNIFICANT} p=") and float(twin["vs best"].split("p=")[1]) > 0.5
    for worse in ("mean", "gma"):
        mark = rows[worse]["vs best"]
        assert re.fullmatch(r"p[=<]0\.\d+", mark) and float(mark[2:]) < 0.05, mark
    assert f"`{NOT_SIGNIFICANT}` in `vs best`" in text  # the legend


def test_failed_runs_listed_apart_with_error(board):
    _, _, _, text = board
    assert "transmil" not in [r["aggregator"] for r in _measured(text)]
    failed = _section(text, "## tcga-brca").split("**Failed runs**")[1]
    assert "`two-stage/r18/transmil` `holdout-seed0-fold0`: TrainingError: loss became NaN at epoch 3" in failed


def test_title_footer_and_sweeps(board):
    work, out, _, text = board
    assert text.splitlines()[0] == f"# Leaderboard: subtyping — {SYNTHETIC_NOTE}"
    assert "`" + "00" + "ab" * 31 + "`" in text  # the split file's sha256
    assert "cpu (test)" in text and "bench run --suite subtyping" in text
    # the board is committed: no machine paths (the work folder is outside the current folder here)
    assert str(work.parent) not in text
    assert "bench leaderboard --suite subtyping --workdir <workdir> --out <out>" in text
    assert "records under `runs/subtyping/` of the work folder" in text
    assert _table_rows(text.split("Split files (")[1]) == [
        {"dataset": "tcga-brca", "split file": "`splits/tcga-brca/holdout-seed0.csv`",
         "sha256": "`00" + "ab" * 31 + "`",
         "seeds": "0", "folds": "0"}]
    assert "200 patient-level bootstrap resamples" in text
    sweeps = _table_rows(_section(text, "## tcga-brca").split("#### Sweeps")[1])
    assert sweeps == [{"method": "two-stage/r18/abmil", "split": "holdout-seed0-fold0", "trials": "12", "failed": "1", "pruned": "2",
                       "best val_auc": "0.912", "best params": "lr=0.000213, aggregator.dropout=0.25",
                       "importance": "lr 0.80, aggregator.dropout 0.20"}]


def test_reported_rows_in_their_own_table(board):
    _, _, _, text = board
    section = _section(text, "## tcga-brca")
    measured, reported = section.split("#### Reported in the ABMILX paper (not measured here)")
    assert "83.80" not in measured and "UNI" not in measured
    rows = _table_rows(reported)
    paper = load_reported("abmilx")
    brca = paper[(paper["dataset"] == "TCGA-BRCA") & (paper["task"] == "classification")]
    assert len(rows) == len(brca) > 10
    r50 = next(r for r in rows if r["encoder"] == "ResNet-50" and r["aggregator"] == "ABMIL")
    assert r50["AUC (%)"] == "83.80 ± 6.55"  # Table 1 of the paper
    e2e = next(r for r in rows if r["encoder"] == "ResNet-50" and r["aggregator"] == "ABMILX")
    assert e2e["AUC (%)"] == "95.17" and "Best-of-two-stage" in e2e["note"]


def test_plots_exist_and_are_linked(board):
    _, out, path, text = board
    links = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert sorted(links) == ["subtyping/tcga-brca-cost.png", "subtyping/tcga-brca-roc.png"]
    for link in links:
        png = path.parent / link
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_pareto_front():
    pts = [(1.0, 0.7), (0.1, 0.6), (0.5, 0.65), (0.2, 0.55), (2.0, 0.69)]
    assert pareto_front(pts) == [1, 2, 0]
    assert pareto_front(pts, higher=False) == [1, 3]


def test_survival_several_splits_km_plot_and_reported_by_data_name(tmp_path):
    work = tmp_path / "work"
    task = make_task("survival")
    for seed in (0, 1):
        _record(work, "survival", "tcga-brca-surv", task, "e2e/r18/abmilx", _survival(seed=seed, noise=0.3), seed=seed)
        _record(work, "survival", "tcga-brca-surv", task, "two-stage/r18/abmil", _survival(seed=seed, noise=3.0),
                seed=seed, infer=0.3)
    text = build_leaderboard(work, "survival", tmp_path / "out", reported="abmilx",
                             data_names={"tcga-brca-surv": "TCGA-BRCA"}).read_text()
    section = _section(text, "## tcga-brca-surv")
    measured, reported = section.split("#### Reported in the ABMILX paper")
    rows = _table_rows(measured)
    assert [r["aggregator"] for r in rows] == ["abmilx", "abmil"] and {r["splits"] for r in rows} == {"2"}
    recs = [load_run(Layout(work).run_dir("survival", "tcga-brca-surv", "e2e/r18/abmilx", f"holdout-seed{s}-fold0"))
            for s in (0, 1)]
    mean = np.mean([r.metrics["c_index"]["mean"] for r in recs])
    low = np.mean([r.metrics["c_index"]["low"] for r in recs])
    assert rows[0]["C-index"].strip("*").startswith(f"{mean:.3f} [{low:.3f}, ")
    assert float(rows[0]["sd C-index"]) == pytest.approx(np.std([r.metrics["c_index"]["mean"] for r in recs], ddof=1),
                                                         abs=6e-4)
    assert "64.93 ± 9.1" in reported and "83.80" not in reported  # BRCA survival rows (Table 2), not subtyping AUCs
    assert SYNTHETIC_NOTE in text.splitlines()[0]
    assert (tmp_path / "out" / "survival" / "tcga-brca-surv-km.png").is_file()
    assert "](survival/tcga-brca-surv-km.png)" in text


def test_cli_empty_workdir_is_a_clear_error(tmp_path, capsys):
    assert main(["leaderboard", "--suite", "subtyping", "--workdir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "error: no run records for suite 'subtyping'" in err
    assert str(tmp_path / "empty" / "runs" / "subtyping") in err and "bench run --suite subtyping" in err


def test_cli_unknown_suite_with_records_prints_the_board(tmp_path, capsys):
    work = tmp_path / "work"
    task = make_task("classification", classes=("A", "B"))
    frames = _classification(n=40)
    _record(work, "train", "demo", task, "two-stage/r18/abmil", frames["two-stage/r18/abmil"], synthetic=False)
    out = tmp_path / "boards"
    assert main(["leaderboard", "--suite", "train", "--workdir", str(work), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# Leaderboard: train\n") and SYNTHETIC_NOTE not in printed
    assert CI.search(printed) and "Reported in" not in printed
    assert (out / "train.md").read_text() == printed.rstrip("\n") + "\n"


def test_shown_paths_relative_to_work_folder_and_current_folder(tmp_path, monkeypatch):
    work = tmp_path / "work"
    task = make_task("classification", classes=("A", "B"))
    _record(work, "train", "demo", task, "two-stage/r18/abmil", _classification(n=40)["two-stage/r18/abmil"])
    _record(work, "train", "demo", task, "two-stage/r18/mean", _classification(n=40)["two-stage/r18/mean"])
    raw = json.loads((Layout(work).run_dir("train", "demo", "two-stage/r18/mean", "holdout-seed0-fold0")
                      / "run.json").read_text())
    assert raw["split"]["path"] == str(work / "splits" / "demo" / "holdout-seed0.csv")  # absolute, as recorded
    monkeypatch.chdir(tmp_path)
    text = build_leaderboard(work, "train", tmp_path / "boards",
                             command="bench run --suite x --workdir /abs/w").read_text()
    assert str(tmp_path) not in text.replace("/abs/w", "")
    assert "`bench leaderboard --suite train --workdir work --out boards`" in text
    assert "`splits/demo/holdout-seed0.csv`" in text
    assert "Reproduce the runs: `bench run --suite x --workdir /abs/w`." in text  # the command as recorded


def test_records_of_another_split_file_are_not_ranked_and_named(tmp_path):
    """tcga-brca seed 0: abmil and mean on split file A, gma (ok) and abmilx (failed) on file B."""
    work = tmp_path / "work"
    task = make_task("classification", classes=("IDC", "ILC"))
    frames = _classification(n=60)
    a, b = "aa" * 32, "bb" * 32
    _record(work, "subtyping", "tcga-brca", task, "two-stage/r18/abmil", frames["two-stage/r18/abmil"], sha256=a)
    _record(work, "subtyping", "tcga-brca", task, "two-stage/r18/mean", frames["two-stage/r18/mean"], sha256=a)
    _record(work, "subtyping", "tcga-brca", task, "gma/r18/gma", frames["gma/r18/gma"], sha256=b,
            ended="2025-01-02T00:00:00+00:00")  # the latest record does not outvote two
    _record(work, "subtyping", "tcga-brca", task, "e2e/r18/abmilx", None, error="TrainingError: planted", sha256=b)
    text = build_leaderboard(work, "subtyping", tmp_path / "boards").read_text()
    section = _section(text, "## tcga-brca")
    rows = _table_rows(section)
    assert [r["aggregator"] for r in rows] == ["abmil", "mean"]  # gma (file B) is not in the table
    assert "gma" not in section.split("**Not ranked")[0].split("**Failed runs**")[0]
    off = section.split("**Not ranked: made on another split file**")[1].split("\n\n", 2)[1]
    assert off.count("\n- ") == 0 and off.startswith("- `gma/r18/gma` `holdout-seed0-fold0`: ")
    assert ("split file `splits/tcga-brca/holdout-seed0.csv` (sha256 `bbbbbbbbbbbb`); the table uses another "
            "version of that file (sha256 `aaaaaaaaaaaa`)") in off
    assert ("`bench run --suite subtyping --datasets tcga-brca --seeds 0 --methods gma/r18/gma --force`" in off)
    assert "e2e/r18/abmilx" in section.split("**Failed runs**")[1]  # failed stays failed, whatever its file
    assert "1 not ranked (made on another split file)" in text
    split_rows = _table_rows(text.split("Split files (")[1])
    assert [r["sha256"] for r in split_rows] == ["`" + "aa" * 32 + "`"]  # only the file the table uses


def test_split_file_tie_goes_to_latest_record_and_advice_follows_the_file_on_disk(tmp_path):
    import hashlib

    content = "slide_id,fold0\ns1,test\n"
    work = tmp_path / "work"
    task = make_task("classification", classes=("IDC", "ILC"))
    frames = _classification(n=60)
    sha_now = hashlib.sha256(content.encode()).hexdigest()
    # one record on each file: the later one (abmil) wins the tie, though gma's file is the one now on disk
    _record(work, "subtyping", "tcga-brca", task, "two-stage/r18/abmil", frames["two-stage/r18/abmil"],
            sha256="aa" * 32, ended="2025-01-03T00:00:00+00:00")
    _record(work, "subtyping", "tcga-brca", task, "gma/r18/gma", frames["gma/r18/gma"], sha256=sha_now,
            ended="2025-01-02T00:00:00+00:00")
    path = Layout(work).split_file("tcga-brca", "holdout", 0)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    section = _section(build_leaderboard(work, "subtyping", tmp_path / "boards").read_text(), "## tcga-brca")
    assert [r["aggregator"] for r in _table_rows(section)] == ["abmil"]
    off = section.split("**Not ranked")[1]
    assert ("`gma/r18/gma` `holdout-seed0-fold0`: split file `splits/tcga-brca/holdout-seed0.csv` "
            f"(sha256 `{sha_now[:12]}`)") in off
    # gma is on the current file: the advice is to rerun the table's records, not gma
    assert ("This record is on the split file now in the work folder and the table's are not: rerun those with "
            "`bench run --suite subtyping --datasets tcga-brca --seeds 0 --force`.") in off


def test_split_files_rule():
    from bench.evaluation.leaderboard import split_files
    from bench.evaluation.records import RunRecord

    def rec(sha, ended, tag="holdout-seed0-fold0"):
        return RunRecord(Path("x"), {"split": {"tag": tag, "sha256": sha}, "ended": ended})

    assert split_files([rec("a", "2025-01-01T00:00:00+00:00"), rec("b", "2025-01-05T00:00:00+00:00"),
                        rec("a", "2025-01-02T00:00:00+00:00")]) == {"holdout-seed0-fold0": "a"}  # most records
    assert split_files([rec("a", "2025-01-01T00:00:00+00:00"),
                        rec("b", "2025-01-01T01:00:00+01:00")]) == {"holdout-seed0-fold0": "a"}  # same instant: smaller
    assert split_files([rec("a", "2025-01-01T00:00:00+00:00"), rec("b", "2025-01-01T00:00:01+00:00"),
                        rec("c", None, tag="holdout-seed1-fold0")]) == {"holdout-seed0-fold0": "b",
                                                                           "holdout-seed1-fold0": "c"}
    tie = [rec("a", "2025-01-01T00:00:00+00:00"), rec("b", "2025-01-02T00:00:00+00:00"),
           rec("b", "2025-01-03T00:00:00+00:00"), rec("a", "2025-01-05T00:00:00"), rec("c", "2025-01-09T00:00:00"),
           rec("c", "not a date")]
    assert split_files(tie) == {"holdout-seed0-fold0": "c"}  # 2 each: the most recent record (naive = UTC)
    assert split_files(tie[:4]) == {"holdout-seed0-fold0": "a"}


def test_unreadable_records_are_listed_on_the_board(tmp_path):
    work = tmp_path / "work"
    task = make_task("classification", classes=("A", "B"))
    frames = _classification(n=40)
    layout = Layout(work)
    for method in ("two-stage/r18/abmil", "two-stage/r18/mean", "e2e/r18/abmilx"):
        _record(work, "train", "demo", task, method, frames.get(method, frames["two-stage/r18/abmil"]))
    damaged = layout.run_dir("train", "demo", "two-stage/r18/mean", "holdout-seed0-fold0")
    (damaged / "run.json").write_text('{"schema": 1, "suite": ')  # cut short
    old = layout.run_dir("train", "demo", "e2e/r18/abmilx", "holdout-seed0-fold0")
    (old / "run.json").write_text(json.dumps({"schema": 0}))
    interrupted = layout.run_dir("train", "demo", "gma/r18/gma", "holdout-seed0-fold0")
    (interrupted / "checkpoint").mkdir(parents=True)
    (interrupted / "checkpoint" / "aggregator.safetensors").write_bytes(b"x")
    orphan = layout.run_dir("train", "other", "two-stage/r18/abmil", "holdout-seed0-fold0")
    orphan.mkdir(parents=True)
    (orphan / "predictions.csv").write_text("bag_id\n")
    layout.run_dir("train", "demo", "two-stage/r18/dsmil", "holdout-seed0-fold0").mkdir(parents=True)  # not a run
    for run_dir in (layout.run_dir("train", "demo", "two-stage/r18/abmil", "holdout-seed0-fold0"), interrupted):
        (run_dir / "gma").mkdir()  # a trainer's job folder inside the run folder: part of that run, not a run
        (run_dir / "gma" / "predictions-val.csv").write_text("bag_id\n")
    text = build_leaderboard(work, "train", tmp_path / "boards").read_text()
    demo = _section(text, "## demo")
    assert [r["aggregator"] for r in _table_rows(demo)] == ["abmil"]  # the rest of the board still renders
    listed = demo.split("**Unreadable records** (skipped, not in the table):")[1].strip().splitlines()
    assert listed == [
        "- `runs/train/demo/e2e/r18/abmilx/holdout-seed0-fold0/run.json`: run record is not a schema-1 record "
        "(schema 0); rerun it with --force",
        "- `runs/train/demo/gma/r18/gma/holdout-seed0-fold0`: no run.json, only checkpoint/ (an interrupted run, "
        "or its record was deleted); the next `bench run --suite train` reruns it",
        "- `runs/train/demo/two-stage/r18/mean/holdout-seed0-fold0/run.json`: run record cannot be read "
        "(Expecting value: line 1 column 24 (char 23)); delete the folder and rerun",
    ]
    other = _section(text, "## other")
    assert "No readable record of this dataset." in other
    assert ("`runs/train/other/two-stage/r18/abmil/holdout-seed0-fold0`: no run.json, only predictions.csv" in other)
    assert "4 run folders without a readable record, skipped (listed under their dataset)" in text
    assert str(tmp_path) not in text


def test_skipped_runs_are_listed_with_their_reason_under_their_dataset(tmp_path):
    work = tmp_path / "work"
    task = make_task("classification", classes=("A", "B"))
    frames = _classification(n=40)
    layout = Layout(work)
    _record(work, "train", "demo", task, "two-stage/r18/abmil", frames["two-stage/r18/abmil"])
    _record(work, "train", "demo", task, "two-stage/r18/mean", frames["two-stage/r18/abmil"])

    def skip(dataset: str, method: str, reason: str) -> Path:
        run_dir = layout.run_dir("train", dataset, method, "holdout-seed0-fold0")
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "run-skipped.json"  # as bench run writes it (runner._record_skipped)
        path.write_text(json.dumps({"status": "skipped", "dataset": dataset, "method": method,
                                    "split": "holdout-seed0-fold0", "reason": reason}))
        return path

    skip("demo", "two-stage/r18/2dmamba", "KernelUnavailable: aggregator '2dmamba' cannot run here: no CUDA")
    skip("demo", "two-stage/r18/mean", "KernelUnavailable: no kernel this time")  # beside an earlier ok record
    skip("other", "two-stage/r18/2dmamba", "KernelUnavailable: no CUDA")  # a dataset with nothing else
    (layout.run_dir("train", "demo", "two-stage/r18/abmil", "holdout-seed0-fold0") / "run-skipped.json").write_text(
        "{not json")  # damaged: left out, the board still renders
    text = build_leaderboard(work, "train", tmp_path / "boards").read_text()
    demo = _section(text, "## demo")
    assert sorted(r["aggregator"] for r in _table_rows(demo)) == ["abmil", "mean"]
    listed = demo.split("**Skipped runs** (this machine cannot run them; not in the table unless an earlier record "
                        "is):")[1].strip().splitlines()
    assert listed == [
        "- `two-stage/r18/2dmamba` `holdout-seed0-fold0`: KernelUnavailable: aggregator '2dmamba' cannot run here: "
        "no CUDA — `runs/train/demo/two-stage/r18/2dmamba/holdout-seed0-fold0/run-skipped.json`",
        "- `two-stage/r18/mean` `holdout-seed0-fold0`: KernelUnavailable: no kernel this time (its earlier record is "
        "in the table) — `runs/train/demo/two-stage/r18/mean/holdout-seed0-fold0/run-skipped.json`",
    ]
    other = _section(text, "## other")
    assert "No readable record of this dataset." in other and "`two-stage/r18/2dmamba`" in other


def test_only_unreadable_records_is_an_error_that_names_them(tmp_path):
    run_dir = Layout(tmp_path).run_dir("train", "demo", "two-stage/r18/abmil", "holdout-seed0-fold0")
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text("not json")
    from bench.common.errors import MissingFileError

    with pytest.raises(MissingFileError, match=r"1 unreadable; runs/train/demo/two-stage/r18/abmil/"
                                               r"holdout-seed0-fold0/run.json: run record cannot be read"):
        build_leaderboard(tmp_path, "train", tmp_path / "boards")


GOLDEN = Path(__file__).parent / "golden" / "leaderboard.md"
GENERATED = re.compile(r"Generated \S+;")  # the only volatile part of a board built from fixed records


def _fixed_metadata(path: Path, command: str) -> None:
    """Replace what `write_run` takes from the running machine (versions, host) with fixed values."""
    data = json.loads(path.read_text())
    data["command"] = command
    data["versions"] = {"python": "3.11.7", "torch": "2.5.1", "timm": "1.0.11", "numpy": "2.1.3", "harness": "0.1.0",
                        "platform": "Linux-6.8.0-x86_64-with-glibc2.36"}
    data["host"] = {"platform": "Linux-6.8.0-x86_64-with-glibc2.36", "cpu": "AMD EPYC 9454", "python": "3.11.7"}
    path.write_text(json.dumps(data, indent=2))


def test_golden_leaderboard(tmp_path, monkeypatch):
    """The whole board from fixed records equals tests/bench/golden/leaderboard.md.

    The records have fixed predictions, dates, versions and host; only the generation date is
    normalised. After an intended change of the board, regenerate the file and review its diff
    (it is what users read on GitHub):

        UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/bench/test_leaderboard.py -k golden
        git diff tests/bench/golden/
    """
    monkeypatch.chdir(tmp_path)  # relative folders, as `bench run` passes them by default
    work, out, suite = Path("work"), Path("leaderboards"), "golden"
    layout = Layout(work)
    cls = make_task("classification", classes=("IDC", "ILC"))
    frames = _classification(n=60)
    infer = {"two-stage/r18/abmil": 0.5, "e2e/r18/abmilx": 0.05, "two-stage/r18/mean": 0.02}
    for i, (method, x) in enumerate(infer.items()):
        _record(work, suite, "tcga-brca", cls, method, frames[method], infer=x, synthetic=False,
                ended=f"2025-03-0{i + 2}T10:00:00+00:00")
    _record(work, suite, "tcga-brca", cls, "two-stage/r18/transmil", None, synthetic=False,
            error="TrainingError: loss became NaN at epoch 3", ended="2025-03-02T11:00:00+00:00")
    _record(work, suite, "tcga-brca", cls, "gma/r18/gma", frames["gma/r18/gma"], infer=0.9, synthetic=False,
            sha256="ff" * 32, ended="2025-02-20T10:00:00+00:00")  # made before the split file was rewritten
    _record(work, suite, "tcga-brca", cls, "two-stage/r18/dsmil", frames["two-stage/r18/mean"], synthetic=False)
    surv = make_task("survival")
    for seed in (0, 1):
        _record(work, suite, "tcga-brca-surv", surv, "e2e/r18/abmilx", _survival(seed=seed, noise=0.3), seed=seed,
                infer=0.05, synthetic=False, ended=f"2025-03-0{seed + 6}T10:00:00+00:00")
        _record(work, suite, "tcga-brca-surv", surv, "two-stage/r18/abmil", _survival(seed=seed, noise=3.0), seed=seed,
                infer=0.3, synthetic=False, ended=f"2025-03-0{seed + 6}T12:00:00+00:00")
    for run_json in layout.runs_root(suite).rglob("run.json"):
        _fixed_metadata(run_json, f"bench run --suite {suite} --data-root data")
    damaged = layout.run_dir(suite, "tcga-brca", "two-stage/r18/dsmil", "holdout-seed0-fold0") / "run.json"
    damaged.write_text(damaged.read_text()[:200])  # cut short, as by a full disk
    sweep = layout.sweep_dir(suite, "two-stage/r18/abmil/tcga-brca/holdout-seed0-fold0")
    sweep.mkdir(parents=True)
    (sweep / "best.json").write_text(json.dumps({
        "metric": "val_auc", "n_trials": 20, "n_complete": 18, "n_pruned": 1, "n_failed": 1, "best_value": 0.9123,
        "best_trial": 7, "best_params": {"lr": 0.000213, "aggregator.dropout": 0.25},
        "importances": {"lr": 0.8, "aggregator.dropout": 0.2}}))

    text = GENERATED.sub("Generated <date>;", build_leaderboard(work, suite, out).read_text(encoding="utf-8"))
    assert text.count("Generated <date>;") == 1
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text, encoding="utf-8")
    assert GOLDEN.is_file(), f"{GOLDEN} is missing; write it with UPDATE_GOLDEN=1 (see this test's docstring)"
    expected = GOLDEN.read_text(encoding="utf-8")
    assert text == expected, ("the board differs from tests/bench/golden/leaderboard.md; if the change is intended, "
                              "regenerate it with UPDATE_GOLDEN=1 (see this test's docstring) and review the diff")
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text):
        assert (out / link).is_file()


def test_planted_effects_are_named_and_checked_by_the_paired_bootstrap(board, tmp_path):
    work, _, _, _ = board
    knob = {"planted": "witness_rate", "value": 0.1, "expected": "mean pooling falls toward chance first"}
    expect = [{"better": "two-stage/r18/abmil", "than": "two-stage/r18/mean", **knob},   # strong > mid: recovered
              {"better": "two-stage/r18/mean", "than": "two-stage/r18/abmil", **knob},   # the other way: reversed
              {"better": "two-stage/r18/abmil", "than": "e2e/r18/abmilx", **knob},       # twins: not recovered
              {"better": "two-stage/r18/abmil", "than": "two-stage/r18/transmil", **knob}]  # failed run
    path = build_leaderboard(work, "subtyping", tmp_path / "out", expectations={"tcga-brca": expect})
    section = _section(path.read_text(encoding="utf-8"), "## tcga-brca")
    planted = [ln for ln in section.splitlines() if ln.startswith("**Planted effect**")]
    assert len(planted) == 4
    assert section.index("**Planted effect**") < section.index("| paradigm")  # next to (above) the table
    assert all("`witness_rate` = 0.1 (mean pooling falls toward chance first)" in ln for ln in planted)
    assert planted[0].endswith("**recovered**: the interval lies above 0.")
    assert planted[1].endswith("**reversed**: the interval lies below 0 on a split.")
    assert planted[2].endswith("**not recovered**: the interval contains 0 (no significant difference).")
    assert "Not checked: no finished run of `two-stage/r18/transmil`." in planted[3]
    # the figures are those of the paired bootstrap on the records' own resamples
    from bench.evaluation.metrics import paired_bootstrap

    a = load_run(Layout(work).run_dir("subtyping", "tcga-brca", "two-stage/r18/abmil", "holdout-seed0-fold0"))
    b = load_run(Layout(work).run_dir("subtyping", "tcga-brca", "two-stage/r18/mean", "holdout-seed0-fold0"))
    r = paired_bootstrap(a.task(), a.predictions(), b.predictions(), "auc", n_resamples=N_BOOT, seed=0)
    assert f"Found: {r.difference:+.3f} [{r.low:+.3f}, {r.high:+.3f}]" in planted[0]
    # real (non-synthetic) records: no planted-effect lines even when asked
    real = tmp_path / "real"
    task = make_task("classification", classes=("IDC", "ILC"))
    for method, frame in _classification().items():
        _record(real, "subtyping", "tcga-brca", task, method, frame, synthetic=False)
    text = build_leaderboard(real, "subtyping", tmp_path / "out2", expectations={"tcga-brca": expect}).read_text()
    assert "Planted effect" not in text


def test_zero_width_intervals_are_explained(tmp_path):
    work = tmp_path / "work"
    task = make_task("classification", classes=("IDC", "ILC"))
    frames = _classification()
    y = frames["two-stage/r18/abmil"]["label"].to_numpy()
    perfect = frames["two-stage/r18/abmil"].assign(prob_1=np.where(y == 1, 0.9, 0.1), prob_0=np.where(y == 1, 0.1, 0.9))
    inverted = perfect.assign(prob_1=perfect["prob_0"], prob_0=perfect["prob_1"])
    _record(work, "subtyping", "tcga-brca", task, "e2e/r18/abmilx", perfect)
    _record(work, "subtyping", "tcga-brca", task, "two-stage/r18/mean", inverted)
    _record(work, "subtyping", "tcga-brca", task, "two-stage/r18/abmil", frames["two-stage/r18/mean"])
    text = build_leaderboard(work, "subtyping", tmp_path / "out").read_text(encoding="utf-8")
    assert "- `e2e/r18/abmilx`: AUC 1.000 with a zero-width interval: every bootstrap resample" in text
    assert "- `two-stage/r18/mean`: AUC 0.000 with a zero-width interval: every pair is ranked the wrong way" in text
    assert "`two-stage/r18/abmil`: AUC" not in text  # a real interval gets no line


def test_a_constant_grader_gets_its_zero_kappa_explained(tmp_path):
    work = tmp_path / "work"
    task = make_task("grading", n_grades=6)
    y = np.arange(60) % 6
    probs = np.full((60, 6), 0.1)
    probs[:, 2] = 0.5  # grade 2 for every bag
    frame = pd.DataFrame({"bag_id": [f"s{i}" for i in range(60)], "patient_id": [f"p{i}" for i in range(60)],
                          "label": y, **{f"prob_{k}": probs[:, k] for k in range(6)}})
    _record(work, "grading", "panda", task, "two-stage/r18/mean", frame)
    text = build_leaderboard(work, "grading", tmp_path / "out").read_text(encoding="utf-8")
    assert ("- `two-stage/r18/mean`: QWK 0.000 with a zero-width interval: the method gives every test bag the same "
            "grade") in text
