"""The ABMILX authors' own label and split files, shipped as data, and the `paper` split protocol.

The files in `bench/data/paper_splits/` are copied unchanged from the authors'
public repository (DearCaat/E2E-WSI-ABMILX, commit `PROVENANCE["commit"]`,
folder `labels/`; its README there gives columns and counts). They are facts
(slide lists, labels, train/val/test assignments), not code. Each shipped split
is registered in `PAPER_SPLITS` with the sha256 of its files, checked whenever
they are read, so a damaged install is an error rather than another split.

What a shipped split means here:

- `abmilx-tcga-brca-subtyping`: the file the paper ran
  (`subtyping_tcga_brca_resample.csv`). It lists the 138 training ILC slides
  twice (the appendix's 2:1 oversampling); a repeated row is the same slide,
  read once, and the oversampling is the training sampler's job (the suite's
  `oversample = 2.0`). One fold: 656 / 95 / 234 slides (test 194 IDC, 40 ILC).
- `abmilx-panda`: PANDA ISUP grades, one fold: 7,143 / 1,019 / 2,040 slides.
- `abmilx-tcga-brca-survival`: 3 folds (the authors' 3 files), train/test only
  (no validation part): 671 / 336, 671 / 336 and 672 / 335 patients; 1,007
  patients, 1,073 slides (the `WSI` cell joins a patient's slides with ';': 57
  patients have 2, 3 have 3, 1 has 4); `Status` 1 = event observed, time = the
  `Event` column (months).

Matching a user's cohort: a cohort slide id matches a shipped slide id exactly,
or (TCGA) by its barcode, the part before the first '.', when the shipped list
holds that barcode once (so `TCGA-A1-A0SB-01Z-00-DX1` finds
`TCGA-A1-A0SB-01Z-00-DX1.<UUID>`). The split file lists the cohort's own ids and
patient ids. Shipped slides the cohort lacks are reported all at once, and the
split is written without them only when the user allows it; a cohort that
matches under half of the shipped slides is taken for the wrong dataset folder.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from bench.common.console import warn
from bench.common.errors import ConfigError, DataError

if TYPE_CHECKING:
    import pandas as pd

    from bench.data.cohort import Cohort

PROVENANCE = {
    "repository": "DearCaat/E2E-WSI-ABMILX",
    "commit": "4ce524e7e2cee7ce57bbb363e1083d76b4b595a0",
    "folder": "labels/",
    "shipped": "bench/data/paper_splits/",
}
_PARTS = {"train": "train", "val": "val", "test": "test"}
_SHOW = 20


@dataclass(frozen=True)
class PaperSplit:
    """One published split: which shipped files, how to read them.

    Attributes:
        name: registry key (`split = { protocol = "paper", source = NAME }`).
        task: classification, grading or survival.
        files: (file name, sha256) per fold, in fold order.
        description: one line for listings and the leaderboard.
    """

    name: str
    task: str
    files: tuple[tuple[str, str], ...]
    description: str

    @property
    def n_folds(self) -> int:
        return len(self.files)


PAPER_SPLITS: dict[str, PaperSplit] = {s.name: s for s in (
    PaperSplit("abmilx-tcga-brca-subtyping", "classification",
               (("subtyping_tcga_brca_resample.csv",
                 "4482838a316bcb46d9f83cfea9c51597dcb54647c2689bc152c11c7f5fcdf05f"),),
               "TCGA-BRCA IDC vs ILC, the file the ABMILX paper ran (985 slides; test 194 IDC / 40 ILC)"),
    PaperSplit("abmilx-panda", "grading",
               (("panda.csv", "3aafdb9367e434d3b83565086cbd881eb7efeb76c0f238d76ad92dd280b37321"),),
               "PANDA ISUP 0-5 (10,202 slides: 7,143 train / 1,019 val / 2,040 test)"),
    PaperSplit("abmilx-tcga-brca-survival", "survival",
               (("survival_tcga_brca_3fold_fold_0.csv",
                 "436525404e44eef4c2676bb3942fcdc6f532b3e926bc3536865ec8ec65c1d54d"),
                ("survival_tcga_brca_3fold_fold_1.csv",
                 "6bd1c8c541e1c3350e4b3b0025e81b07d03294d93d7898dd61742752df87ebe7"),
                ("survival_tcga_brca_3fold_fold_2.csv",
                 "00d67b133ea1354d2be18d14cbda2c4e6d6335641d6453abd37922131ffeb5a9")),
               "TCGA-BRCA survival, 3 folds of about 671 train / 336 test patients (1,007 patients, 1,073 slides)"),
)}


def paper_split(name: str) -> PaperSplit:
    """The registered split `name`, or a ConfigError naming the known ones."""
    if name not in PAPER_SPLITS:
        raise ConfigError(f"unknown paper split {name!r}; shipped: {', '.join(PAPER_SPLITS)}")
    return PAPER_SPLITS[name]


def shipped_file(name: str) -> Path:
    """Path of a shipped file inside the installed package."""
    return Path(str(resources.files("bench.data").joinpath("paper_splits", name)))


def _read_shipped(name: str, sha256: str) -> list[dict[str, str]]:
    path = shipped_file(name)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"shipped split file {path} cannot be read ({exc}); reinstall cpath-bench") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise DataError(f"shipped split file {path} has sha256 {actual[:16]}..., the package records "
                        f"{sha256[:16]}...: the install is damaged or the file was edited; reinstall cpath-bench")
    return list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))


def read_paper_split(name: str) -> pd.DataFrame:
    """The authors' assignments: one row per (fold, slide), duplicated rows read once.

    Columns: fold (int), slide_id, patient_id, part, then `label` (class name or
    grade, as text) or `time` (float) and `event` (int).
    """
    import pandas as pd

    spec = paper_split(name)
    frames = []
    for fold, (file, sha) in enumerate(spec.files):
        rows = _read_shipped(file, sha)
        if spec.task == "survival":  # one row per patient; `WSI` joins the patient's slides with ';'
            per_slide = [(w.strip().removesuffix(".pt"), r) for r in rows for w in r["WSI"].split(";") if w.strip()]
            df = pd.DataFrame({
                "slide_id": [w for w, _ in per_slide],
                "patient_id": [r["ID"] for _, r in per_slide],
                "part": [r["Split"] for _, r in per_slide],
                "time": [float(r["Event"]) for _, r in per_slide],
                "event": [int(float(r["Status"])) for _, r in per_slide],
            })
        else:
            df = pd.DataFrame({"slide_id": [r["slide"] for r in rows], "patient_id": [r["case"] for r in rows],
                               "part": [r["fold"] for r in rows], "label": [r["label"] for r in rows]})
        df = df.drop_duplicates().reset_index(drop=True)  # the oversampled ILC rows: one slide, listed twice
        twice = df["slide_id"][df["slide_id"].duplicated()]
        if len(twice):
            raise DataError(f"shipped split {name} ({file}) gives slide {twice.iloc[0]} two different rows")
        bad = sorted(set(df["part"]) - set(_PARTS))
        if bad:
            raise DataError(f"shipped split {name} ({file}) has unknown part(s) {bad}")
        frames.append(df.assign(fold=fold))
    table = pd.concat(frames, ignore_index=True)
    first = ["fold", "slide_id", "patient_id", "part"]
    return table[first + [c for c in table.columns if c not in first]]


def paper_labels(name: str) -> pd.DataFrame:
    """A labels table (slide_id, patient_id, label | time, event) from a shipped split (fold 0's rows)."""
    table = read_paper_split(name)
    table = table[table["fold"] == 0]
    extra = ["time", "event"] if paper_split(name).task == "survival" else ["label"]
    return table[["slide_id", "patient_id", *extra]].sort_values("slide_id").reset_index(drop=True)


def _barcode(slide_id: str) -> str:
    return slide_id.split(".", 1)[0]


def match_slides(shipped: Sequence[str], cohort_ids: Sequence[str]) -> dict[str, str]:
    """Shipped slide id -> cohort slide id: exact ids first, then unique TCGA barcodes (see module docstring)."""
    shipped_set = set(shipped)
    out = {s: s for s in cohort_ids if s in shipped_set}
    by_barcode: dict[str, list[str]] = {}
    for s in shipped_set - set(out):
        by_barcode.setdefault(_barcode(s), []).append(s)
    taken = set(out)
    for c in cohort_ids:
        if c in shipped_set:
            continue
        hits = by_barcode.get(_barcode(c), [])
        if len(hits) == 1 and hits[0] not in taken and "." not in c:
            out[hits[0]] = c
            taken.add(hits[0])
    return out


def _listing(values: Sequence[str], limit: int = _SHOW) -> str:
    shown = list(values[:limit])
    return ", ".join(shown) + (f" ... and {len(values) - len(shown)} more" if len(values) > len(shown) else "")


def paper_table(cohort: Cohort, name: str, *, allow_missing: bool = False,
                missing_report: Path | None = None) -> pd.DataFrame:
    """The split table (columns fold, slide_id, patient_id, part) of `cohort` under shipped split `name`.

    Raises:
        DataError: the cohort matches under half of the shipped slides (wrong
            folder), or some shipped slides are absent and `allow_missing` is
            False (every absent slide is listed in `missing_report`), or a
            matched slide's label differs from the authors'.
        ConfigError: the split is for another task than the cohort's.
    """
    import pandas as pd

    spec = paper_split(name)
    if spec.task != cohort.task:
        raise ConfigError(f"paper split {name} is a {spec.task} split; cohort {cohort.name!r} is {cohort.task}")
    shipped = read_paper_split(name)
    ids = sorted(shipped["slide_id"].unique())
    matched = match_slides(ids, cohort.slide_ids)
    where = f"cohort {cohort.name!r} ({cohort.labels_file})"
    if 2 * len(matched) < len(ids) and not (allow_missing and matched):
        sample = _listing(sorted(cohort.slide_ids), 5)
        raise DataError(
            f"only {len(matched)} of the {len(ids)} slides of the authors' split {name} are in {where}, which "
            f"has {len(cohort)} slides (e.g. {sample}); the split expects ids like {ids[0]}. Is --data-root "
            f"pointing at the right dataset folder? ({spec.description}). If this is the right folder and most "
            "slides are not downloaded yet, fetch them (`bench gdc`) or pass --allow-missing-slides"
        )
    missing = [s for s in ids if s not in matched]
    if missing_report is not None and not missing:
        missing_report.unlink(missing_ok=True)  # an old report whose slides have all arrived
    if missing:
        if missing_report is not None:
            _write_missing(missing_report, missing, shipped)
        test_ids = set(shipped.loc[shipped["part"] == "test", "slide_id"])
        lost_test = sum(s in test_ids for s in missing)
        what = (f"{len(missing)} of the {len(ids)} slides of the authors' split {name} are absent from {where} "
                f"({lost_test} of them test slides): {_listing(missing)}"
                + (f"; all listed in {missing_report}" if missing_report is not None else ""))
        if not allow_missing:
            raise DataError(
                f"{what}. A shrunken test set is not the paper's: download the missing slides (`bench gdc`) and "
                "rebuild labels, or pass --allow-missing-slides to run on the slides present "
                f"({len(matched)}; the split file then records the smaller split)"
            )
        warn(f"{what}. Running on the {len(matched)} present (--allow-missing-slides); the test set is not the "
             "paper's")
    extra = sorted(set(cohort.slide_ids) - set(matched.values()))
    if extra:
        warn(f"{len(extra)} slide(s) of {where} are not in the authors' split {name} and are left out of it: "
             f"{_listing(extra, 5)}")
    table = shipped[shipped["slide_id"].isin(matched)].copy()
    table["slide_id"] = table["slide_id"].map(matched)
    mine = cohort.table.set_index("slide_id")
    table["patient_id"] = table["slide_id"].map(mine["patient_id"])
    if cohort.task != "survival":
        _check_labels(table, mine, cohort, name)
    spread = table.groupby(["fold", "patient_id"])["part"].nunique()
    if (spread > 1).any():
        fold, pid = spread[spread > 1].index[0]
        raise DataError(f"patient {pid!r} of {where} has slides in two parts of fold {fold} of the authors' split "
                        f"{name}; the cohort's patient ids group slides differently from the authors' cases")
    return pd.DataFrame(table[["fold", "slide_id", "patient_id", "part"]]).reset_index(drop=True)


def _check_labels(table: pd.DataFrame, mine: pd.DataFrame, cohort: Cohort, name: str) -> None:
    def norm(v: str) -> str:
        try:
            return str(int(float(v))) if cohort.task == "grading" else str(v)
        except ValueError:
            return str(v)

    theirs = table.drop_duplicates("slide_id").set_index("slide_id")["label"].map(norm)
    ours = mine.loc[theirs.index, "label_name"].map(norm)
    differ = [f"{s} ({ours[s]} here, {theirs[s]} in the paper)" for s in theirs.index if ours[s] != theirs[s]]
    if differ:
        raise DataError(f"{len(differ)} slide(s) of cohort {cohort.name!r} ({cohort.labels_file}) have another label "
                        f"than in the authors' split {name}: {_listing(differ)}. Use the authors' labels "
                        "(`bench gdc` writes them) or another split protocol")


def _write_missing(path: Path, missing: Sequence[str], shipped: pd.DataFrame) -> None:
    from bench.common.files import write_text_atomic

    rows = shipped[shipped["slide_id"].isin(set(missing))].drop_duplicates(["slide_id", "part"])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["slide_id", "patient_id", "parts"])
    for sid, g in rows.groupby("slide_id", sort=True):
        w.writerow([sid, g["patient_id"].iloc[0], " ".join(sorted(set(g["part"])))])
    write_text_atomic(path, buf.getvalue())


__all__ = ["PROVENANCE", "PAPER_SPLITS", "PaperSplit", "paper_split", "read_paper_split", "paper_labels",
           "paper_table", "match_slides", "shipped_file"]
