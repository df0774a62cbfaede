"""Patient-level stratified splits: invariants, exact sizes, determinism, write-once files."""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

import pytest

from bench.cli.main import main
from bench.data.cohort import Cohort, load_cohort
from bench.common.errors import ConfigError, DataError, MissingFileError
from bench.data.splits import SplitSpec, load_splits, make_splits, to_csv_text, write_splits

B_PATIENTS = {0, 5, 10, 15, 17, 19}  # 6 of 20 patients are class B
TWO_SLIDES = {3, 8, 12, 17}  # patients with two slides: they must never be split


def fixed_cohort(root: Path) -> Cohort:
    """20 patients (14 A, 6 B), 24 slides; slide files are empty placeholders (splits never open them)."""
    rows, n = [], 0
    for p in range(20):
        for _ in range(2 if p in TWO_SLIDES else 1):
            rows.append(f"S{n:02d},P{p:02d},{'B' if p in B_PATIENTS else 'A'}")
            n += 1
    (root / "slides").mkdir(parents=True)
    (root / "labels.csv").write_text("slide_id,patient_id,label\n" + "\n".join(rows) + "\n")
    for r in rows:
        (root / "slides" / f"{r.split(',')[0]}.tif").write_bytes(b"")
    return load_cohort(root, name="fixed")


@pytest.fixture
def cohort(tmp_path) -> Cohort:
    return fixed_cohort(tmp_path / "fixed")


def patient_parts(table, fold: int) -> dict[str, str]:
    rows = table[table["fold"] == fold]
    out: dict[str, str] = {}
    for pid, part in zip(rows["patient_id"], rows["part"]):
        assert out.setdefault(pid, part) == part, f"patient {pid} in two parts of fold {fold}"
    return out


def class_of(cohort: Cohort) -> dict[str, str]:
    return dict(zip(cohort.table["patient_id"], cohort.table["label_name"]))


SPECS = [
    SplitSpec("holdout", (0.7, 0.3)),
    SplitSpec("holdout", (0.6, 0.2, 0.2)),
    SplitSpec("holdout", (0.75, 0.25), val_fraction=0.0),
    SplitSpec("kfold", folds=4),
    SplitSpec("mccv", (0.8, 0.2), repeats=3),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.protocol}-{len(s.ratios)}-{s.val_fraction}")
def test_no_patient_in_two_parts_and_every_slide_in_every_fold(cohort, spec):
    table = make_splits(cohort, spec, seed=3)
    assert sorted(table["fold"].unique()) == list(range(spec.n_folds))
    for fold in range(spec.n_folds):
        parts = patient_parts(table, fold)
        assert sorted(parts) == sorted(cohort.patients())
        assert sorted(table.loc[table["fold"] == fold, "slide_id"]) == sorted(cohort.slide_ids)
        expected_parts = {"train", "val", "test"} if spec.val_share > 0 else {"train", "test"}
        assert set(parts.values()) == expected_parts
        # every class is trained on in every fold
        assert {class_of(cohort)[p] for p, part in parts.items() if part == "train"} == {"A", "B"}


@pytest.mark.parametrize("seed", range(6))
def test_holdout_sizes_are_exact_and_classes_within_one_patient(cohort, seed):
    table = make_splits(cohort, SplitSpec("holdout", (0.7, 0.3), val_fraction=0.2), seed=seed)
    parts = patient_parts(table, 0)
    per = Counter((part, class_of(cohort)[p]) for p, part in parts.items())
    n = Counter(parts.values())
    assert n["test"] == 6 and n["val"] == round(14 * 0.2) == 3 and n["train"] == 11  # 20 x 0.3; 14 x 0.2 (2.8)
    for cls, count in (("A", 14), ("B", 6)):
        assert abs(per[("test", cls)] - count * 0.3) < 1
        pool = count - per[("test", cls)]
        assert abs(per[("val", cls)] - pool * 0.2) < 1  # val is carved from what test left of the class


@pytest.mark.parametrize("seed", range(4))
def test_kfold_test_parts_partition_the_patients(cohort, seed):
    k = 3
    table = make_splits(cohort, SplitSpec("kfold", folds=k, val_fraction=0.25), seed=seed)
    tests = [{p for p, part in patient_parts(table, f).items() if part == "test"} for f in range(k)]
    assert set().union(*tests) == set(cohort.patients()) and sum(map(len, tests)) == 20  # disjoint cover
    assert max(map(len, tests)) - min(map(len, tests)) <= 1
    for cls, count in (("A", 14), ("B", 6)):
        per_fold = [sum(class_of(cohort)[p] == cls for p in t) for t in tests]
        assert all(math.floor(count / k) <= c <= math.ceil(count / k) for c in per_fold), (cls, per_fold)
    for f in range(k):
        val = [p for p, part in patient_parts(table, f).items() if part == "val"]
        assert len(val) == round((20 - len(tests[f])) * 0.25 + 1e-9)


def test_three_ratios_equal_two_ratios_with_val_fraction_and_holdout_is_mccv_repeat_zero(cohort):
    a = make_splits(cohort, SplitSpec("holdout", (0.7, 0.1, 0.2)), seed=5)
    b = make_splits(cohort, SplitSpec("holdout", (0.8, 0.2), val_fraction=0.125), seed=5)
    assert to_csv_text(a) == to_csv_text(b)
    mccv = make_splits(cohort, SplitSpec("mccv", (0.8, 0.2), val_fraction=0.125, repeats=3), seed=5)
    assert to_csv_text(mccv[mccv["fold"] == 0].reset_index(drop=True)) == to_csv_text(b)
    fold_tests = [frozenset(mccv[(mccv["fold"] == f) & (mccv["part"] == "test")]["patient_id"]) for f in range(3)]
    assert len(set(fold_tests)) == 3  # repeats are different draws


def test_label_row_order_does_not_matter(cohort, tmp_path):
    lines = (cohort.labels_file).read_text().splitlines()
    shuffled_root = tmp_path / "shuffled"
    (shuffled_root / "slides").mkdir(parents=True)
    (shuffled_root / "labels.csv").write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    for sid in cohort.slide_ids:
        (shuffled_root / "slides" / f"{sid}.tif").write_bytes(b"")
    other = load_cohort(shuffled_root, name="fixed")
    spec = SplitSpec("kfold", folds=4)
    assert to_csv_text(make_splits(other, spec, seed=1)) == to_csv_text(make_splits(cohort, spec, seed=1))


def test_pinned_test_ids_for_seed_zero(cohort):
    # computed once with seed 0 and checked by hand: holdout test = 6 of 20 patients, 4 A (0.3 x 14 = 4.2:
    # P01 P03 P04 P07) + 2 B (0.3 x 6 = 1.8: P17 P19), the two-slide patients P03 and P17 whole;
    # 5-fold fold 0 = 4 patients, 3 A (14 / 5 = 2.8: P04 P09 P12) + 1 B (6 / 5 = 1.2: P17)
    holdout = make_splits(cohort, SplitSpec("holdout", (0.7, 0.3)), seed=0)
    test = holdout[(holdout["fold"] == 0) & (holdout["part"] == "test")]
    assert test["slide_id"].tolist() == PINNED_HOLDOUT_TEST
    kfold = make_splits(cohort, SplitSpec("kfold", folds=5), seed=0)
    test = kfold[(kfold["fold"] == 0) & (kfold["part"] == "test")]
    assert test["slide_id"].tolist() == PINNED_KFOLD_TEST


PINNED_HOLDOUT_TEST = ["S01", "S03", "S04", "S05", "S08", "S20", "S21", "S23"]
PINNED_KFOLD_TEST = ["S05", "S11", "S14", "S15", "S20", "S21"]


def test_same_seed_same_bytes_other_seed_other_file(cohort, tmp_path):
    spec = SplitSpec("kfold", folds=4)
    a = write_splits(cohort, tmp_path / "w1", spec, seed=7)
    b = write_splits(cohort, tmp_path / "w2", spec, seed=7)
    c = write_splits(cohort, tmp_path / "w1", spec, seed=8)
    assert a.path == tmp_path / "w1" / "splits" / "fixed" / "kfold-seed7.csv"
    assert a.path.read_bytes() == b.path.read_bytes() and a.sha256 == b.sha256
    assert c.path.name == "kfold-seed8.csv" and c.path.read_bytes() != a.path.read_bytes()
    assert (a.protocol, a.seed, a.n_folds) == ("kfold", 7, 4)
    assert a.path.with_name("kfold-seed7.csv.sha256").read_text() == f"{a.sha256}  kfold-seed7.csv\n"


def test_splits_accessors_against_the_table(cohort, tmp_path):
    splits = write_splits(cohort, tmp_path, SplitSpec("holdout", (0.7, 0.3)), seed=2)
    rows = splits.path.read_text().splitlines()
    assert rows[0] == "fold,slide_id,patient_id,part"
    test_rows = [r.split(",") for r in rows[1:] if r.endswith(",test")]
    assert splits.ids(0, "test") == sorted(r[1] for r in test_rows)
    assert splits.patients(0, "test") == sorted({r[2] for r in test_rows})
    assert sorted(splits.ids(0, "train") + splits.ids(0, "val") + splits.ids(0, "test")) == sorted(cohort.slide_ids)
    with pytest.raises(ConfigError, match="no fold 1"):
        splits.ids(1, "test")
    with pytest.raises(ConfigError, match="unknown split part 'dev'"):
        splits.ids(0, "dev")


def test_existing_file_is_verified_not_rewritten(cohort, tmp_path):
    spec = SplitSpec("holdout", (0.7, 0.3))
    first = write_splits(cohort, tmp_path, spec, seed=0)
    stamp, content = os.stat(first.path).st_mtime_ns, first.path.read_bytes()
    again = write_splits(cohort, tmp_path, spec, seed=0)
    assert again.sha256 == first.sha256 and os.stat(first.path).st_mtime_ns == stamp
    with pytest.raises(DataError, match=r"differs from the one these settings give.*assignment.*delete holdout-seed0"):
        write_splits(cohort, tmp_path, SplitSpec("holdout", (0.5, 0.5)), seed=0)
    assert os.stat(first.path).st_mtime_ns == stamp and first.path.read_bytes() == content
    # killed between the two files: the record is restored once the content is verified
    first.path.with_name("holdout-seed0.csv.sha256").unlink()
    assert write_splits(cohort, tmp_path, spec, seed=0).sha256 == first.sha256
    assert first.path.with_name("holdout-seed0.csv.sha256").exists()


def test_tampered_file_is_refused(cohort, tmp_path):
    splits = write_splits(cohort, tmp_path, SplitSpec("holdout", (0.7, 0.3)), seed=0)
    text = splits.path.read_text()
    moved = next(line for line in text.splitlines() if line.endswith(",test"))
    splits.path.write_text(text.replace(moved, moved.replace(",test", ",train")))
    for action in (lambda: load_splits(splits.path), lambda: write_splits(cohort, tmp_path, SplitSpec(), seed=0)):
        with pytest.raises(DataError, match="changed after it was written"):
            action()
    assert splits.path.read_text() != text  # refused, not silently repaired


def test_cohort_change_is_described(cohort, tmp_path):
    write_splits(cohort, tmp_path, SplitSpec("holdout", (0.7, 0.3)), seed=0)
    smaller = cohort.subset(cohort.slide_ids[:-1])
    with pytest.raises(DataError, match=r"slides only in the file: S23"):
        write_splits(smaller, tmp_path, SplitSpec("holdout", (0.7, 0.3)), seed=0)


def test_load_splits_checks_invariants(tmp_path):
    with pytest.raises(MissingFileError):
        load_splits(tmp_path / "none.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("fold,slide_id,patient_id,part\n0,S1,P1,train\n0,S2,P1,test\n0,S3,P2,test\n")
    with pytest.raises(DataError, match="patient 'P1' is in two parts of fold 0"):
        load_splits(bad)
    bad.write_text("fold,slide_id,patient_id,part\n0,S1,P1,dev\n")
    with pytest.raises(DataError, match=r"unknown part\(s\) \['dev'\]"):
        load_splits(bad)
    bad.write_text("fold,slide,patient_id,part\n0,S1,P1,train\n")
    with pytest.raises(DataError, match=r"lacks column\(s\) slide_id"):
        load_splits(bad)


@pytest.mark.parametrize("kwargs,match", [
    ({"ratios": (0.7, 0.2)}, "sum to 1"),
    ({"ratios": (0.7, 0.1, 0.2), "val_fraction": 0.1}, "not both"),
    ({"ratios": (1.0,)}, "2 \\(train, test\\) or 3"),
    ({"protocol": "loo"}, "unknown split protocol 'loo'"),
    ({"protocol": "kfold", "folds": 1}, "folds >= 2"),
    ({"val_fraction": 1.0}, r"\[0, 1\)"),
])
def test_bad_specs_name_the_value(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SplitSpec(**kwargs)


def test_empty_parts_and_rare_classes(cohort, capsys):
    with pytest.raises(ConfigError, match="test part would hold 0 of 20"):
        make_splits(cohort, SplitSpec("holdout", (0.98, 0.02)), seed=0)
    with pytest.raises(ConfigError, match="seed"):
        make_splits(cohort, SplitSpec(), seed=-1)
    with pytest.raises(ConfigError, match="at least 25 patients"):
        make_splits(cohort, SplitSpec("kfold", folds=25), seed=0)
    dropped = {s for p in ("P05", "P10", "P15", "P17", "P19") for s in cohort.patients()[p]}
    lone = cohort.subset([s for s in cohort.slide_ids if s not in dropped])  # one B patient left: P00
    assert Counter(lone.patient_table()["label_name"]) == {"A": 14, "B": 1}
    with pytest.raises(ConfigError, match=r"class\(es\) 'B' of cohort 'fixed' have only 1 patient"):
        make_splits(lone, SplitSpec("kfold", folds=3), seed=0)
    capsys.readouterr()
    table = make_splits(lone, SplitSpec("holdout", (0.7, 0.3)), seed=0)
    assert "class(es) 'B' (1) of cohort 'fixed' have too few patients" in capsys.readouterr().err
    assert patient_parts(table, 0)["P00"] == "train"  # the lone B patient stays in train


def test_survival_strata_spread_events(tmp_path):
    root = tmp_path / "surv"
    (root / "slides").mkdir(parents=True)
    rows = [f"S{p:02d},P{p:02d},{10 + 3 * p},{int(p % 5 < 2)}" for p in range(30)]  # 12 events
    (root / "labels.csv").write_text("slide_id,patient_id,time,event\n" + "\n".join(rows) + "\n")
    for p in range(30):
        (root / "slides" / f"S{p:02d}.tif").write_bytes(b"")
    cohort = load_cohort(root)
    for seed in range(4):
        table = make_splits(cohort, SplitSpec("kfold", folds=3, val_fraction=0.0, time_bins=2), seed=seed)
        for f in range(3):
            test = [int(p[1:]) for p, part in patient_parts(table, f).items() if part == "test"]
            assert len(test) == 10 and sum(p % 5 < 2 for p in test) == 4  # 12 events / 3 folds
            early = sum(p < 15 for p in test)  # two time bins split the cohort at the median time
            assert early == 5  # 9 censored + 6 events before the median: 3 + 2 per fold


def test_cli_writes_then_verifies(cohort, tmp_path, capsys):
    args = ["split", "--cohort", str(cohort.root), "--out", str(tmp_path / "w"), "--dataset", "fixed",
            "--protocol", "kfold", "--folds", "4", "--seed", "1"]
    assert main(args) == 0
    out = capsys.readouterr()
    path = tmp_path / "w" / "splits" / "fixed" / "kfold-seed1.csv"
    assert "wrote split" in out.err and path.exists()
    table_lines = [line for line in out.out.splitlines()
                   if line.startswith("|") and "fold" not in line and "---" not in line]
    assert len(table_lines) == 4 * 3  # train, val, test per fold
    splits = load_splits(path)
    first = table_lines[0].split("|")
    assert [c.strip() for c in first[1:3]] == ["0", "train"] and int(first[4]) == len(splits.ids(0, "train"))
    stamp = os.stat(path).st_mtime_ns
    assert main(args) == 0
    assert "verified existing split" in capsys.readouterr().err and os.stat(path).st_mtime_ns == stamp
    assert main([*args[:-1], "2"]) == 0 and path.with_name("kfold-seed2.csv").exists()
    assert main([*args, "--folds", "3"]) == 2  # other settings for the same file: refused with a message
    assert "differs" in capsys.readouterr().err
