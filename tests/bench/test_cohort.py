"""Cohort loading: labels + slide folder -> validated Cohort, every bad input named."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest

from bench.data.cohort import load_cohort
from bench.common.errors import ConfigError, DataError, MissingFileError


def make_folder(root: Path, header: str, rows: list[str], files: list[str] | None = None,
                meta: dict | None = None) -> Path:
    """A cohort folder whose slide files are empty placeholders (loading only checks they exist)."""
    (root / "slides").mkdir(parents=True)
    (root / "labels.csv").write_text("\n".join([header, *rows]) + "\n")
    names = files if files is not None else [r.split(",")[0] + ".svs" for r in rows]
    for name in names:
        (root / "slides" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "slides" / name).write_bytes(b"")
    if meta is not None:
        (root / "cohort.json").write_text(json.dumps(meta))
    return root


# --- good cohorts ----------------------------------------------------------------------------------


def test_synthetic_cohort_matches_its_labels_file(synthetic_cohort):
    root = synthetic_cohort("subtyping", n_slides=6)
    cohort = load_cohort(root)
    with open(root / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert cohort.name == root.name and cohort.task == "classification" and cohort.classes == ("IDC", "ILC")
    assert cohort.slide_ids == [r["slide_id"] for r in rows]
    assert cohort.table["label_name"].tolist() == [r["label"] for r in rows]
    assert cohort.table["label"].tolist() == [("IDC", "ILC").index(r["label"]) for r in rows]
    expected: dict[str, list[str]] = {}
    for r in rows:
        expected.setdefault(r["patient_id"], []).append(r["slide_id"])
    assert cohort.patients() == expected
    assert cohort.has_masks and cohort.mask_dir == root / "masks"
    jobs = cohort.slide_jobs()
    assert [j.slide_id for j in jobs] == cohort.slide_ids
    assert all(j.path == (root / "slides" / f"{j.slide_id}.tif").resolve() and j.mpp is None for j in jobs)
    assert cohort.slide_path("S0003") == (root / "slides" / "S0003.tif").resolve()


def test_classification_sorts_names_unless_classes_are_given(tmp_path):
    root = make_folder(tmp_path / "c", "slide_id,patient_id,label", ["a1,p1,lung", "a2,p2,breast", "a3,p3,colon"])
    cohort = load_cohort(root)
    assert cohort.classes == ("breast", "colon", "lung") and cohort.table["label"].tolist() == [2, 0, 1]
    ordered = load_cohort(root, classes=["lung", "colon", "breast"])
    assert ordered.table["label"].tolist() == [0, 2, 1]
    (root / "cohort.json").write_text(json.dumps({"name": "demo", "task": "classification",
                                                  "classes": ["colon", "lung", "breast"]}))
    from_meta = load_cohort(root)
    assert from_meta.name == "demo" and from_meta.table["label"].tolist() == [1, 2, 0]
    explicit = load_cohort(root, name="other", classes=["breast", "lung", "colon"])  # arguments win
    assert explicit.name == "other" and explicit.table["label"].tolist() == [1, 0, 2]


def test_grading_takes_integer_grades_and_patients_keep_their_highest(tmp_path):
    root = make_folder(tmp_path / "g", "slide_id,patient_id,label",
                       ["s1,p1,0", "s2,p1,2.0", "s3,p2,1", "s4,p3,3"])
    cohort = load_cohort(root, task="grading")
    assert cohort.classes == ("0", "1", "2", "3") and cohort.table["label"].tolist() == [0, 2, 1, 3]
    pt = cohort.patient_table().set_index("patient_id")
    assert pt.loc["p1", "label"] == 2 and pt.loc["p1", "slide_ids"] == ("s1", "s2")
    bad = make_folder(tmp_path / "b", "slide_id,patient_id,label", ["s1,p1,G1", "s2,p2,G2"])
    with pytest.raises(DataError, match=r"integers 0..K-1.*G1, G2"):
        load_cohort(bad, task="grading")
    assert load_cohort(bad, task="grading", classes=["G1", "G2"]).table["label"].tolist() == [0, 1]


def test_survival_patient_table(tmp_path):
    root = make_folder(tmp_path / "s", "slide_id,patient_id,time,event",
                       ["s1,p1,12.5,1", "s2,p1,12.5,1", "s3,p2,30,0", "s4,p3,0,1", "s5,p2,30.0,0.0"])
    cohort = load_cohort(root)  # task inferred from the columns
    assert cohort.task == "survival" and cohort.classes is None
    pt = cohort.patient_table()
    assert pt["patient_id"].tolist() == ["p1", "p2", "p3"]
    assert pt["slide_ids"].tolist() == [("s1", "s2"), ("s3", "s5"), ("s4",)]
    assert pt["time"].tolist() == [12.5, 30.0, 0.0] and pt["event"].tolist() == [1, 0, 1]
    assert pt["n_slides"].tolist() == [2, 2, 1]


def test_synthetic_survival_cohort_bags_are_patients(synthetic_cohort):
    root = synthetic_cohort("survival", n_slides=6)
    cohort = load_cohort(root)
    pt = cohort.patient_table()
    assert sum(pt["n_slides"]) == len(cohort)
    assert sorted(s for ids in pt["slide_ids"] for s in ids) == sorted(cohort.slide_ids)
    for pid, ids in cohort.patients().items():
        rows = cohort.table[cohort.table["slide_id"].isin(ids)]
        assert rows["time"].nunique() == 1 and (rows["patient_id"] == pid).all()


def test_spreadsheet_quirks_are_tolerated(tmp_path):
    # Excel writes a byte-order mark and people pad cells; ids that look numeric stay text
    root = make_folder(tmp_path / "q", "slide_id, patient_id, label", ["007, 0042, a", "NA, 0043, b"])
    (root / "labels.csv").write_bytes(b"\xef\xbb\xbf" + (root / "labels.csv").read_bytes())
    cohort = load_cohort(root)
    assert cohort.slide_ids == ["007", "NA"] and list(cohort.patients()) == ["0042", "0043"]
    assert cohort.table["label_name"].tolist() == ["a", "b"]


def test_mpp_column_and_filename_column(tmp_path):
    root = make_folder(tmp_path / "m", "slide_id,patient_id,label,mpp,filename",
                       ["s1,p1,a,0.25,batch1/one.ndpi", "s2,p2,b,,"], files=["batch1/one.ndpi", "s2.tif"])
    cohort = load_cohort(root)
    assert cohort.slide_mpp("s1") == 0.25 and cohort.slide_mpp("s2") is None
    assert cohort.slide_path("s1") == (root / "slides" / "batch1" / "one.ndpi").resolve()
    assert [j.mpp for j in cohort.slide_jobs()] == [0.25, None]
    assert math.isnan(cohort.table["mpp"].iloc[1])


def test_extensions_are_found_in_any_case_and_ambiguity_is_refused(tmp_path):
    root = make_folder(tmp_path / "e", "slide_id,patient_id,label", ["s1,p1,a", "s2,p2,b"], files=["s1.SVS", "s2.mrxs"])
    assert [p.name for p in map(load_cohort(root).slide_path, ["s1", "s2"])] == ["s1.SVS", "s2.mrxs"]
    (root / "slides" / "s2.tif").write_bytes(b"")
    with pytest.raises(DataError, match=r"s2 \(s2.tif, s2.mrxs\).*filename"):
        load_cohort(root)


def test_subset_keeps_table_order_and_refuses_unknown_ids(tmp_path):
    root = make_folder(tmp_path / "x", "slide_id,patient_id,label", ["s1,p1,a", "s2,p2,b", "s3,p3,a"])
    cohort = load_cohort(root)
    sub = cohort.subset(["s3", "s1"])
    assert sub.slide_ids == ["s1", "s3"] and sub.classes == cohort.classes and len(cohort) == 3
    with pytest.raises(DataError, match="nope"):
        cohort.subset(["s1", "nope"])


# --- bad input -------------------------------------------------------------------------------------


def test_missing_labels_file_and_folders(tmp_path):
    with pytest.raises(MissingFileError, match="does not exist"):
        load_cohort(tmp_path / "nowhere")
    (tmp_path / "c" / "slides").mkdir(parents=True)
    with pytest.raises(MissingFileError, match=r"labels\.csv does not exist"):
        load_cohort(tmp_path / "c")
    (tmp_path / "c" / "labels.csv").write_text("slide_id,patient_id,label\ns1,p1,a\n")
    with pytest.raises(MissingFileError, match="slide folder"):
        load_cohort(tmp_path / "c", slide_dir="wsi")


BAD_TABLES = [
    ("slide_id,patient,label", ["s1,p1,a"], {}, DataError,
     r"lacks column\(s\) patient_id.*columns found: slide_id, patient, label"),
    ("slide_id,patient_id,time", ["s1,p1,3"], {"task": "survival"}, DataError, r"lacks column\(s\) event"),
    ("slide_id,patient_id,label", ["s1,p1,a", "s2,p2,a", "s1,p3,b", "s2,p4,b", "s3,p5,a"], {}, DataError,
     r"2 slide id\(s\) more than once: s1, s2"),
    ("slide_id,patient_id,label", ["s1,p1,a", "s2,p1,b"], {}, DataError, r"p1 \(a/b\)"),
    ("slide_id,patient_id,label", ["s1,p1,a", "s2,p2,c", "s3,p3,d"], {"classes": ["a", "b"]}, DataError,
     r"not among the classes: c, d; known classes: a, b"),
    ("slide_id,patient_id,time,event", ["s1,p1,,1"], {}, DataError, r"s1=''.*>= 0"),
    ("slide_id,patient_id,time,event", ["s1,p1,nan,1"], {}, DataError, r"s1='nan'"),
    ("slide_id,patient_id,time,event", ["s1,p1,-2,1", "s2,p2,4,1"], {}, DataError, r"negative time.*s1='-2'"),
    ("slide_id,patient_id,time,event", ["s1,p1,5,2", "s2,p2,4,yes"], {}, DataError,
     r"not 0 or 1: s1='2', s2='yes'"),
    ("slide_id,patient_id,time,event", ["s1,p1,5,1", "s2,p1,6,1"], {}, DataError, r"p1 \(time/event 5/1, 6/1\)"),
    ("slide_id,patient_id,label,mpp", ["s1,p1,a,abc", "s2,p2,a,0", "s3,p3,a,-1", "s4,p4,a,0.5"], {}, DataError,
     r"not positive numbers: s1='abc', s2='0', s3='-1'"),
    ("slide_id,patient_id,label", ["s1,,a"], {}, DataError, r"empty patient_id on line\(s\) 2"),
    ("slide_id,patient_id,label", ["s1,p1,a"], {"task": "regression"}, ConfigError, r"unknown task 'regression'"),
]


@pytest.mark.parametrize("header,rows,kwargs,error,match", BAD_TABLES)
def test_bad_labels_tables_are_named(tmp_path, header, rows, kwargs, error, match):
    root = make_folder(tmp_path / "c", header, rows)
    with pytest.raises(error, match=match) as info:
        load_cohort(root, **kwargs)
    assert str(root / "labels.csv") in str(info.value) or error is ConfigError


def test_all_missing_slides_are_listed_with_a_count(tmp_path):
    rows = [f"s{i},p{i},a" for i in range(30)]
    root = make_folder(tmp_path / "c", "slide_id,patient_id,label", rows, files=["s0.svs", "s5.tif"])
    with pytest.raises(MissingFileError) as info:
        load_cohort(root)
    msg = str(info.value)
    assert msg.startswith("28 slide file(s)")
    missing = [f"s{i}" for i in range(30) if i not in (0, 5)]
    assert all(f" {s} (" in msg for s in missing)  # every one, not the first 20
    assert " s0 (" not in msg and " s5 (" not in msg


@pytest.mark.parametrize("row,match", [
    ("..,p1,a", r"not safe file names: '\.\.'"),
    ("../s1,p1,a", r"not safe file names: '\.\./s1'"),
    ("/etc/passwd,p1,a", r"not safe file names: '/etc/passwd'"),
])
def test_slide_ids_that_escape_the_folder_are_refused(tmp_path, row, match):
    root = make_folder(tmp_path / "c", "slide_id,patient_id,label", [row], files=[])
    with pytest.raises(DataError, match=match):
        load_cohort(root)


def test_filenames_and_symlinks_that_escape_the_folder_are_refused(tmp_path):
    outside = tmp_path / "outside.svs"
    outside.write_bytes(b"")
    for filename in ("../outside.svs", str(outside)):
        root = make_folder(tmp_path / f"c{len(filename)}", "slide_id,patient_id,label,filename",
                           [f"s1,p1,a,{filename}"], files=[])
        with pytest.raises(DataError, match=rf"outside the slide folder.*s1: filename '{filename}'"):
            load_cohort(root)
    root = make_folder(tmp_path / "link", "slide_id,patient_id,label", ["s1,p1,a", "s2,p2,a"], files=["s2.svs"])
    (root / "slides" / "s1.svs").symlink_to(outside)
    with pytest.raises(DataError, match=rf"s1: s1.svs -> {outside}"):
        load_cohort(root)
    # a slide folder that is itself a link elsewhere is fine: its files stay inside it
    real = make_folder(tmp_path / "real", "slide_id,patient_id,label", ["s1,p1,a"])
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "labels.csv").write_text((real / "labels.csv").read_text())
    (linked / "slides").symlink_to(real / "slides")
    assert load_cohort(linked).slide_path("s1") == (real / "slides" / "s1.svs").resolve()


def test_unreadable_slides_are_reported_not_raised(synthetic_cohort, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(synthetic_cohort("subtyping", n_slides=6), root)
    cut = root / "slides" / "S0001.tif"
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    (root / "slides" / "S0002.tif").unlink()
    (root / "slides" / "S0002.svs").write_text("slide_id,patient_id\nthis is a text file\n")
    cohort = load_cohort(root)  # loading does not open slides
    assert cohort.unreadable is None and len(cohort) == 6
    report = dict(cohort.check_slides())
    assert sorted(report) == ["S0001", "S0002"]
    assert "S0001.tif" in report["S0001"] and "S0002.svs" in report["S0002"] and "cannot open" in report["S0002"]
    checked = load_cohort(root, check_readable=True)
    assert dict(checked.unreadable) == report
    assert checked.subset(["S0000", "S0001"]).unreadable == (("S0001", report["S0001"]),)


# --- labels columns and spelling (issue: README said `path`, labels differing only in case) --------


@pytest.mark.parametrize("column", ["filename", "path"])
def test_a_filename_or_path_column_names_the_slide_file(tmp_path, column):
    root = make_folder(tmp_path / "c", f"slide_id,patient_id,label,{column}",
                       ["s1,p1,IDC,scans/a.svs", "s2,p2,ILC,scans/b.svs"], files=["scans/a.svs", "scans/b.svs"])
    cohort = load_cohort(root)
    assert [Path(p).name for p in cohort.table["path"]] == ["a.svs", "b.svs"]


def test_both_filename_and_path_columns_are_an_error(tmp_path):
    root = make_folder(tmp_path / "c", "slide_id,patient_id,label,filename,path", ["s1,p1,IDC,s1.svs,s1.svs"])
    with pytest.raises(DataError, match="both a `filename` and a `path` column"):
        load_cohort(root)


def test_labels_that_differ_only_in_case_are_an_error_listing_the_known_ones(tmp_path):
    root = make_folder(tmp_path / "c", "slide_id,patient_id,label",
                       ["s1,p1,IDC", "s2,p2,ILC", "s3,p3,idc", "s4,p4,IDC"])
    with pytest.raises(DataError) as err:
        load_cohort(root)
    message = str(err.value)
    assert "differ only in case" in message and "IDC/idc" in message and "IDC, ILC, idc" in message


def test_a_case_typo_against_given_classes_suggests_the_class(tmp_path):
    root = make_folder(tmp_path / "c", "slide_id,patient_id,label", ["s1,p1,IDC", "s2,p2,ilc"])
    with pytest.raises(DataError, match=r"known classes: IDC, ILC \(labels are case-sensitive: 'ilc' -> 'ILC'\?\)"):
        load_cohort(root, classes=("IDC", "ILC"))
