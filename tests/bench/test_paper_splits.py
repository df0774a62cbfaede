"""The authors' shipped splits: counts, the `paper` protocol's split file, missing slides, wrong folders."""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from bench.common.errors import ConfigError, DataError
from bench.data import paper
from bench.data.cohort import Cohort, load_cohort
from bench.data.paper import PAPER_SPLITS, paper_labels, read_paper_split, shipped_file
from bench.data.splits import SplitSpec, load_splits, write_splits

ROOT = Path(__file__).resolve().parents[2]
TASKS = {"abmilx-tcga-brca-subtyping": "classification", "abmilx-panda": "grading",
         "abmilx-tcga-brca-survival": "survival"}


def paper_cohort(root: Path, name: str, *, drop: int = 0, rename=None, relabel: dict | None = None) -> Cohort:
    """A cohort folder holding the shipped labels and an empty placeholder per slide (splits never open them)."""
    labels = paper_labels(name)
    if drop:
        labels = labels.iloc[drop:]
    if rename is not None:
        labels = labels.assign(slide_id=labels["slide_id"].map(rename))
    if relabel:
        labels = labels.assign(label=[relabel.get(s, v) for s, v in zip(labels["slide_id"], labels["label"])])
    (root / "slides").mkdir(parents=True)
    labels.to_csv(root / "labels.csv", index=False)
    for sid in labels["slide_id"]:
        (root / "slides" / f"{sid}.svs").touch()
    classes = ("IDC", "ILC") if name.endswith("subtyping") else None
    return load_cohort(root, name=name, task=TASKS[name], classes=classes)


def test_shipped_files_are_the_authors_unchanged():
    readme = shipped_file("README.md").read_text(encoding="utf-8")
    assert paper.PROVENANCE["commit"] in readme and paper.PROVENANCE["repository"] in readme
    for spec in PAPER_SPLITS.values():
        for file, sha in spec.files:
            assert hashlib.sha256(shipped_file(file).read_bytes()).hexdigest() == sha
            # the copy in the package is byte-identical to the one in the shared data folder, when present
            shared = ROOT.parent / "shared" / "data" / "abmilx-labels" / file
            if shared.exists():
                assert shared.read_bytes() == shipped_file(file).read_bytes()


def test_brca_subtyping_counts_duplicated_ilc_once():
    raw = pd.read_csv(shipped_file("subtyping_tcga_brca_resample.csv"), dtype=str)
    assert len(raw) == 1123  # the file as the authors ran it: training ILC listed twice
    t = read_paper_split("abmilx-tcga-brca-subtyping")
    assert len(t) == 985 and t["slide_id"].is_unique
    counts = Counter(zip(t["part"], t["label"]))
    assert (counts["test", "IDC"], counts["test", "ILC"]) == (194, 40)
    assert (counts["val", "IDC"], counts["val", "ILC"]) == (75, 20)
    assert (counts["train", "IDC"], counts["train", "ILC"]) == (518, 138)
    # the resampled file, once de-duplicated, is the plain one
    plain = pd.read_csv(shipped_file("subtyping_tcga_brca.csv"), dtype=str)
    assert set(zip(plain["slide"], plain["fold"], plain["label"])) == set(zip(t["slide_id"], t["part"], t["label"]))


def test_panda_and_survival_counts():
    t = read_paper_split("abmilx-panda")
    assert t["part"].value_counts().to_dict() == {"train": 7143, "test": 2040, "val": 1019}
    s = read_paper_split("abmilx-tcga-brca-survival")
    per_fold = {f: g.drop_duplicates("patient_id")["part"].value_counts().to_dict() for f, g in s.groupby("fold")}
    assert per_fold == {0: {"train": 671, "test": 336}, 1: {"train": 671, "test": 336},
                        2: {"train": 672, "test": 335}}
    assert not s["slide_id"].str.endswith(".pt").any() and set(s["event"]) == {0, 1}
    assert (s["fold"] == 0).sum() == 1073 and s.loc[s["fold"] == 0, "patient_id"].nunique() == 1007  # ';'-joined WSI
    # every patient is tested exactly once over the 3 folds
    tested = s[s["part"] == "test"].drop_duplicates(["fold", "patient_id"])["patient_id"]
    assert Counter(tested).most_common(1)[0][1] == 1 and tested.nunique() == 1007


def test_damaged_shipped_file_is_an_error(tmp_path, monkeypatch):
    bad = tmp_path / "panda.csv"
    bad.write_bytes(shipped_file("panda.csv").read_bytes().replace(b",test\n", b",train\n", 1))
    monkeypatch.setattr(paper, "shipped_file", lambda name: tmp_path / name)
    with pytest.raises(DataError, match="install is damaged"):
        read_paper_split("abmilx-panda")


def test_paper_protocol_writes_the_authors_split(tmp_path):
    cohort = paper_cohort(tmp_path / "TCGA-BRCA", "abmilx-tcga-brca-subtyping")
    spec = SplitSpec("paper", source="abmilx-tcga-brca-subtyping")
    splits = write_splits(cohort, tmp_path / "work", spec, seed=0, dataset="tcga-brca")
    assert splits.path.name == "paper-seed0.csv" and splits.protocol == "paper" and splits.folds == [0]
    assert len(splits.ids(0, "test")) == 234 and len(splits.ids(0, "val")) == 95 and len(splits.ids(0, "train")) == 656
    label = dict(zip(cohort.table["slide_id"], cohort.table["label_name"]))
    assert Counter(label[s] for s in splits.ids(0, "test")) == {"IDC": 194, "ILC": 40}
    recorded = (splits.path.parent / "paper-seed0.csv.sha256").read_text().split()[0]
    assert recorded == splits.sha256 == hashlib.sha256(splits.path.read_bytes()).hexdigest()
    # the seed does not move the authors' assignments; a rerun verifies and keeps the bytes
    other = write_splits(cohort, tmp_path / "work", spec, seed=1, dataset="tcga-brca")
    assert other.path.read_bytes() == splits.path.read_bytes()
    assert write_splits(cohort, tmp_path / "work", spec, seed=0, dataset="tcga-brca").sha256 == splits.sha256
    assert not (splits.path.parent / "paper-seed0.missing.csv").exists()


def test_survival_folds_follow_the_authors(tmp_path):
    cohort = paper_cohort(tmp_path / "TCGA-BRCA", "abmilx-tcga-brca-survival")
    splits = write_splits(cohort, tmp_path / "work", SplitSpec("paper", source="abmilx-tcga-brca-survival"), seed=0)
    assert splits.folds == [0, 1, 2]
    assert [len(splits.patients(f, "test")) for f in range(3)] == [336, 336, 335]
    assert [len(splits.patients(f, "train")) for f in range(3)] == [671, 671, 672]
    assert splits.ids(0, "val") == []
    assert SplitSpec("paper", source="abmilx-tcga-brca-survival").n_folds == 3


def test_missing_slides_are_listed_and_need_the_flag(tmp_path):
    cohort = paper_cohort(tmp_path / "TCGA-BRCA", "abmilx-tcga-brca-subtyping", drop=3)
    absent = paper_labels("abmilx-tcga-brca-subtyping")["slide_id"].iloc[:3].tolist()
    spec = SplitSpec("paper", source="abmilx-tcga-brca-subtyping")
    with pytest.raises(DataError, match=r"3 of the 985 slides .* absent") as err:
        write_splits(cohort, tmp_path / "work", spec, seed=0, dataset="tcga-brca")
    assert all(s in str(err.value) for s in absent) and "--allow-missing-slides" in str(err.value)
    report = tmp_path / "work" / "splits" / "tcga-brca" / "paper-seed0.missing.csv"
    assert sorted(pd.read_csv(report)["slide_id"]) == sorted(absent)
    assert not (tmp_path / "work" / "splits" / "tcga-brca" / "paper-seed0.csv").exists()
    allowed = SplitSpec("paper", source="abmilx-tcga-brca-subtyping", allow_missing=True)
    splits = write_splits(cohort, tmp_path / "work", allowed, seed=0, dataset="tcga-brca")
    assert len(splits.table) == 982 and not set(absent) & set(splits.table["slide_id"])


def test_wrong_folder_says_how_many_matched(tmp_path):
    cohort = paper_cohort(tmp_path / "PANDA", "abmilx-panda", drop=10000)  # 202 of 10,202 slides
    with pytest.raises(DataError, match=r"only 202 of the 10202 slides .* right dataset folder"):
        write_splits(cohort, tmp_path / "work", SplitSpec("paper", source="abmilx-panda"), seed=0)
    brca = paper_cohort(tmp_path / "BRCA", "abmilx-tcga-brca-subtyping")
    with pytest.raises(ConfigError, match="grading split"):
        write_splits(brca, tmp_path / "work", SplitSpec("paper", source="abmilx-panda"), seed=0)


def test_barcodes_without_uuid_match_and_labels_must_agree(tmp_path):
    cohort = paper_cohort(tmp_path / "a", "abmilx-tcga-brca-subtyping", rename=lambda s: s.split(".")[0])
    splits = write_splits(cohort, tmp_path / "work", SplitSpec("paper", source="abmilx-tcga-brca-subtyping"), seed=0)
    assert len(splits.ids(0, "test")) == 234 and all("." not in s for s in splits.table["slide_id"])
    first = paper_labels("abmilx-tcga-brca-subtyping")
    idc = first.loc[first["label"] == "IDC", "slide_id"].iloc[0]
    wrong = paper_cohort(tmp_path / "b", "abmilx-tcga-brca-subtyping", relabel={idc: "ILC"})
    with pytest.raises(DataError, match=re.escape(f"{idc} (ILC here, IDC in the paper)")):
        write_splits(wrong, tmp_path / "work2", SplitSpec("paper", source="abmilx-tcga-brca-subtyping"), seed=0)


def test_spec_validation():
    with pytest.raises(ConfigError, match="needs source"):
        SplitSpec("paper")
    with pytest.raises(ConfigError, match="needs source"):
        SplitSpec("paper", source="abmilx-nope")
    with pytest.raises(ConfigError, match="for protocol 'paper'"):
        SplitSpec("holdout", source="abmilx-panda")


def test_suites_use_the_authors_split_on_real_data_only():
    from bench.orchestration.suite import load_suite, thaw

    real = {d.name: thaw(d.split) for n in ("subtyping", "grading", "survival") for d in load_suite(n).datasets}
    assert real["tcga-brca"] == {"protocol": "paper", "source": "abmilx-tcga-brca-subtyping"}
    assert real["panda"] == {"protocol": "paper", "source": "abmilx-panda"}
    assert real["tcga-brca-surv"] == {"protocol": "paper", "source": "abmilx-tcga-brca-survival"}
    for name in ("tcga-nsclc", "tcga-luad-surv", "tcga-blca-surv"):  # the paper published none
        assert real[name]["protocol"] == "holdout"
    demo = {d.name: thaw(d.split) for n in ("subtyping", "grading", "survival") for d in load_suite(n, demo=True).datasets}
    # synthetic cohorts are not the authors' slides: the demo draws a seeded split (its own or the `synthetic` one)
    assert all(s["protocol"] != "paper" and "source" not in s and "synthetic" not in s for s in demo.values())
    allowed = load_suite("subtyping").allowing_missing_slides()
    assert allowed.dataset("tcga-brca").split_spec().allow_missing
    assert not allowed.dataset("tcga-nsclc").split.get("allow_missing")


def test_package_data_ships_the_files():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    globs = pyproject["tool"]["setuptools"]["package-data"]["bench.data"]
    folder = ROOT / "bench" / "data"
    covered = {p for g in globs for p in folder.glob(g)}
    assert covered == set((folder / "paper_splits").iterdir()) and len(covered) == 7


def test_leaderboard_footer_names_the_authors_split(tmp_path):
    import numpy as np

    from bench.data.layout import Layout
    from bench.evaluation.leaderboard import build_leaderboard
    from bench.evaluation.records import split_tag, write_run
    from bench.evaluation.tasks import make_task
    from bench.evaluation.training import TrainResult

    work = tmp_path / "work"
    task = make_task("classification", classes=("IDC", "ILC"))
    y = np.tile([0, 1], 20)
    p = np.clip(0.5 + 0.3 * (2 * y - 1) + np.random.default_rng(0).normal(0, 0.3, 40), 0.01, 0.99)
    frame = pd.DataFrame({"bag_id": [f"s{i}" for i in range(40)], "patient_id": [f"p{i}" for i in range(40)],
                          "label": y, "prob_0": 1 - p, "prob_1": p})
    costs = {"train_seconds": 1.0, "infer_seconds_per_slide": 0.1, "peak_memory_mb": 1.0, "params": 1, "flops": None,
             "device": "cpu", "trainable_params": 1, "peak_memory_kind": "peak_rss_since_reset"}
    for dataset, protocol in (("tcga-brca", "paper"), ("tcga-nsclc", "holdout")):
        split = {"path": str(Layout(work).split_file(dataset, protocol, 0)), "sha256": "ab" * 32,
                 "protocol": protocol, "seed": 0, "fold": 0}
        method = {"name": "two-stage/r18/abmil", "paradigm": "two-stage", "encoder": "r18", "aggregator": "abmil",
                  "params": {}, "aggregator_params": {}, "weights_id": "w", "random_init": False,
                  "params_source": "suite"}
        write_run(Layout(work).run_dir("subtyping", dataset, method["name"], split_tag(protocol, 0, 0)),
                  suite="subtyping", dataset=dataset, task=task, method=method, split=split, seed=0, config_hash="h",
                  result=TrainResult(predictions={"test": frame, "val": frame}, costs=costs), status="ok",
                  error=None, started="2025-01-01T00:00:00+00:00", ended="2025-01-01T00:01:00+00:00",
                  n_bootstrap=50, bootstrap_seed=0, synthetic=False, command="bench run --suite subtyping")
    text = build_leaderboard(work, "subtyping", tmp_path / "boards").read_text(encoding="utf-8")
    line = next(ln for ln in text.splitlines() if "authors' own" in ln)
    assert line.startswith("- Splits of tcga-brca:") and "tcga-nsclc" not in line
    assert paper.PROVENANCE["commit"][:7] in line and "bench/data/paper_splits/" in line


def test_bench_run_preparation_writes_the_authors_split(tmp_path):
    """`bench run --suite subtyping --data-root DIR`'s dataset stage: the paper split file, test 234 slides."""
    from bench.evaluation.costs import StageTimer
    from bench.orchestration.runner import RunOptions, prepare_dataset
    from bench.orchestration.suite import load_suite

    paper_cohort(tmp_path / "root" / "TCGA-BRCA", "abmilx-tcga-brca-subtyping", drop=2)
    suite = load_suite("subtyping").select(datasets=["tcga-brca"], methods=["two-stage/resnet50-trunc/abmil"])
    options = RunOptions(workdir=tmp_path / "work", data_root=tmp_path / "root", leaderboards=None)
    with pytest.raises(DataError, match="2 of the 985 slides"):  # placeholders: tiling skips them, the split refuses
        prepare_dataset(suite, suite.dataset("tcga-brca"), options, StageTimer())
    allowed = suite.allowing_missing_slides()
    prep = prepare_dataset(allowed, allowed.dataset("tcga-brca"), options, StageTimer())
    splits = prep.splits[0]
    assert splits.path == tmp_path / "work" / "splits" / "tcga-brca" / "paper-seed0.csv"
    shipped = read_paper_split("abmilx-tcga-brca-subtyping").set_index("slide_id")["part"]
    dropped = paper_labels("abmilx-tcga-brca-subtyping")["slide_id"].iloc[:2]
    assert len(splits.table) == 983
    assert len(splits.ids(0, "test")) == 234 - int((shipped[dropped] == "test").sum())
    assert (tmp_path / "work" / "splits" / "tcga-brca" / "paper-seed0.missing.csv").exists()
    assert splits.sha256 == hashlib.sha256(splits.path.read_bytes()).hexdigest()


def test_paper_split_in_a_suite_file(tmp_path):
    from bench.orchestration.suite import parse_suite, thaw

    def suite(split: dict, demo_split: dict | None = None) -> dict:
        ds = {"name": "brca", "task": "classification", "split": split}
        raw = {"name": "s", "datasets": [ds], "methods": [{"paradigm": "two-stage", "encoder": "e", "aggregator": "a"}],
               "demo": {"datasets": {"brca": {"synthetic": {"kind": "subtyping"}}}}}
        if demo_split is not None:
            raw["demo"]["datasets"]["brca"]["split"] = demo_split
        return raw

    paper_split = {"protocol": "paper", "source": "abmilx-tcga-brca-subtyping",
                   "synthetic": {"protocol": "kfold", "folds": 3}}
    assert thaw(parse_suite(suite(paper_split)).datasets[0].split) == {"protocol": "paper",
                                                                      "source": "abmilx-tcga-brca-subtyping"}
    assert thaw(parse_suite(suite(paper_split), demo=True).datasets[0].split) == {"protocol": "kfold", "folds": 3}
    mixed = parse_suite(suite(paper_split, {"protocol": "holdout", "ratios": [0.5, 0.5]}), demo=True)
    assert thaw(mixed.datasets[0].split) == {"protocol": "holdout", "ratios": [0.5, 0.5]}
    with pytest.raises(ConfigError, match=r"split\.source: expected one of the shipped splits"):
        parse_suite(suite({"protocol": "paper", "source": "abmilx-nope"}))
    with pytest.raises(ConfigError, match=r"split\.synthetic\.source: unknown key 'source'"):
        parse_suite(suite({**paper_split, "synthetic": {"source": "x"}}))
    with pytest.raises(ConfigError, match="belongs to a split with protocol"):
        parse_suite(suite({"protocol": "holdout", "synthetic": {}}))


def test_bench_split_writes_the_paper_split(tmp_path, capsys):
    from bench.cli.main import main

    name = "abmilx-tcga-brca-subtyping"
    paper_cohort(tmp_path / "BRCA", name, drop=5)
    args = ["split", "--cohort", str(tmp_path / "BRCA"), "--out", str(tmp_path / "work"), "--dataset", "tcga-brca",
            "--protocol", "paper", "--source", name]
    assert main(args) == 2 and "5 of the 985 slides" in capsys.readouterr().err
    assert main(args + ["--allow-missing-slides"]) == 0
    splits = load_splits(tmp_path / "work" / "splits" / "tcga-brca" / "paper-seed0.csv")
    parts = read_paper_split(name).set_index("slide_id")["part"]
    kept = parts.drop(paper_labels(name)["slide_id"].iloc[:5])
    assert len(splits.table) == 980
    assert {p: len(splits.ids(0, p)) for p in ("train", "val", "test")} == kept.value_counts().to_dict()


PAPER_SUITE = """
name = "paper-check"
[[datasets]]
name = "tcga-brca"
task = "classification"
classes = ["IDC", "ILC"]
data = "TCGA-BRCA"
split = { protocol = "paper", source = "abmilx-tcga-brca-subtyping" }
two_stage = { magnification = 10, patch_size = 64, input_size = 64 }
[[methods]]
paradigm = "two-stage"
encoder = "resnet18-trunc"
aggregator = "mean"
random_init = true
params = { epochs = 2 }
"""


@pytest.mark.slow
def test_bench_run_records_the_authors_split(synthetic_cohort, tmp_path):
    """`bench run --data-root` end to end on 12 synthetic slides named as slides of the authors' split."""
    import json
    import shutil

    from bench.cli.main import main

    src = synthetic_cohort("subtyping", n_slides=12)
    shipped = read_paper_split("abmilx-tcga-brca-subtyping")
    chosen = pd.concat([shipped[(shipped["part"] == p) & (shipped["label"] == c)].head(2)
                        for p in ("train", "val", "test") for c in ("IDC", "ILC")])
    folder = tmp_path / "root" / "TCGA-BRCA"
    (folder / "slides").mkdir(parents=True)
    for source, sid in zip(sorted((src / "slides").iterdir()), chosen["slide_id"]):
        shutil.copy(source, folder / "slides" / f"{sid}.tif")
    chosen[["slide_id", "patient_id", "label"]].to_csv(folder / "labels.csv", index=False)
    suite = tmp_path / "paper-check.toml"
    suite.write_text(PAPER_SUITE)
    args = ["run", "--suite", str(suite), "--data-root", str(tmp_path / "root"), "--workdir", str(tmp_path / "work"),
            "--leaderboards", str(tmp_path / "boards"), "--device", "cpu"]
    assert main(args) == 2  # 973 of the authors' slides are absent: refused without the flag
    assert main(args + ["--allow-missing-slides"]) == 0
    split_file = tmp_path / "work" / "splits" / "tcga-brca" / "paper-seed0.csv"
    (record,) = (tmp_path / "work" / "runs").rglob("run.json")
    data = json.loads(record.read_text())
    assert data["split"]["protocol"] == "paper" and data["split"]["tag"] == "paper-seed0-fold0"
    assert data["split"]["sha256"] == hashlib.sha256(split_file.read_bytes()).hexdigest()
    test = pd.read_csv(record.parent / "predictions.csv")
    assert sorted(test["bag_id"]) == sorted(chosen.loc[chosen["part"] == "test", "slide_id"])
    board = (tmp_path / "boards" / "paper-check.md").read_text()
    assert "- Splits of tcga-brca: the ABMILX authors' own" in board
