"""Cohorts: a labels table plus a slide folder, validated once at the edge.

A cohort folder holds:

    labels.csv     slide_id, patient_id, and `label` (classification, grading)
                   or `time`, `event` (survival); optional `mpp` (level-0
                   microns per pixel, overriding the file) and `filename`
                   (slide path relative to the slide folder)
    slides/        the slide files; without `filename` a slide is found as
                   `<slide_id><ext>` for ext in bench.data.slides.SLIDE_EXTENSIONS
    cohort.json    optional defaults (name, task, classes), as bench.data.synthetic writes
    masks/         optional ground-truth masks (synthetic cohorts)

Explicit arguments of `load_cohort` win over cohort.json. Everything a user can
get wrong is reported as a DataError / MissingFileError that names the file and
the bad values (all of them, not the first). Unreadable slides are not an error
at load time: `Cohort.check_slides()` returns them so batch stages can skip and
report them.

Example:
    >>> cohort = load_cohort("data/brca")                      # doctest: +SKIP
    >>> cohort.task, cohort.classes, len(cohort)               # doctest: +SKIP
    ('classification', ('IDC', 'ILC'), 40)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common.errors import BenchError, ConfigError, DataError, MissingFileError
from bench.data.layout import check_name
from bench.data.slides import SLIDE_EXTENSIONS

if TYPE_CHECKING:
    import pandas as pd

    from bench.data.tiling import SlideJob

# target columns of labels.csv per task kind; `bench.evaluation.tasks.TASKS` registers one task per kind
_TARGETS = {"classification": ("label",), "grading": ("label",), "survival": ("time", "event")}
TASK_KINDS = tuple(_TARGETS)
_SHOW = 20  # how many bad values a message lists before summarising (missing slides: all)


@dataclass(frozen=True, eq=False)
class Cohort:
    """A validated cohort: one row per slide in `table`.

    Attributes:
        name: dataset name (argument > cohort.json > folder name).
        root: the cohort folder.
        slide_dir: folder the slide paths are relative to.
        task: "classification", "grading" or "survival".
        classes: label names in index order (None for survival).
        table: columns slide_id, patient_id, then `label` (int index into
            `classes`) and `label_name` (the name in labels.csv), or `time`
            (float) and `event` (int 0/1); `mpp` (float, NaN = read from the
            file) and `path` (absolute slide path, str).
        labels_file: the labels table it was read from.
        mask_dir: `root/masks` when it exists (synthetic ground truth), else None.
        unreadable: (slide_id, reason) for every slide OpenSlide cannot use, when
            loaded with `check_readable=True`; None when not checked.
    """

    name: str
    root: Path
    slide_dir: Path
    task: str
    classes: tuple[str, ...] | None
    table: pd.DataFrame
    labels_file: Path
    mask_dir: Path | None = None
    unreadable: tuple[tuple[str, str], ...] | None = None

    def __len__(self) -> int:
        return len(self.table)

    @property
    def has_masks(self) -> bool:
        return self.mask_dir is not None

    @property
    def n_classes(self) -> int | None:
        return None if self.classes is None else len(self.classes)

    @property
    def slide_ids(self) -> list[str]:
        return self.table["slide_id"].tolist()

    def _row(self, slide_id: str) -> pd.Series:
        rows = self.table.index[self.table["slide_id"] == slide_id]
        if len(rows) == 0:
            raise DataError(f"slide {slide_id!r} is not in cohort {self.name!r} ({self.labels_file})")
        return self.table.loc[rows[0]]

    def slide_path(self, slide_id: str) -> Path:
        return Path(self._row(slide_id)["path"])

    def slide_mpp(self, slide_id: str) -> float | None:
        """The labels table's mpp override for the slide, or None (use the file's)."""
        mpp = float(self._row(slide_id)["mpp"])
        return None if math.isnan(mpp) else mpp

    def patients(self) -> dict[str, list[str]]:
        """patient_id -> its slide ids, in table order."""
        out: dict[str, list[str]] = {}
        for pid, sid in zip(self.table["patient_id"], self.table["slide_id"]):
            out.setdefault(pid, []).append(sid)
        return out

    def patient_table(self) -> pd.DataFrame:
        """One row per patient: patient_id, slide_ids (tuple), n_slides and the patient's target.

        Survival: time and event (the slides of a patient agree; checked at load).
        Classification: label and label_name (one label per patient; checked at load).
        Grading: the patient's highest grade, as ISUP grades a patient by the
        worst biopsy; stratified splits use it.
        """
        import pandas as pd

        rows = []
        for pid, g in self.table.groupby("patient_id", sort=False):
            row: dict[str, Any] = {"patient_id": pid, "slide_ids": tuple(g["slide_id"]), "n_slides": len(g)}
            if self.task == "survival":
                row.update(time=float(g["time"].iloc[0]), event=int(g["event"].iloc[0]))
            else:
                label = int(g["label"].max())
                row.update(label=label, label_name=self.classes[label])  # type: ignore[index]
            rows.append(row)
        extra = ["time", "event"] if self.task == "survival" else ["label", "label_name"]
        return pd.DataFrame(rows, columns=["patient_id", "slide_ids", "n_slides", *extra])

    def lesion_labels(self, slide_id: str, coords: Any, patch_size_level0: int,
                      min_fraction: float = 0.5) -> Any:
        """Instance ground truth of a slide's patches: 1 where the lesion mask covers at least
        `min_fraction` of the patch, else 0 ((N,) int64). None when the cohort has no lesion
        masks (real data); synthetic cohorts always have them. Used to score attention.
        """
        if self.mask_dir is None or not (self.mask_dir / f"{slide_id}.lesion.png").exists():
            return None
        import numpy as np

        from bench.data.synthetic import load_mask, mask_fraction

        mask, downsample = load_mask(self.root, slide_id, "lesion")
        frac = mask_fraction(mask, downsample, np.asarray(coords).reshape(-1, 2), int(patch_size_level0))
        return (frac >= min_fraction).astype(np.int64)

    def lesion_labeler(self, coords_dir: str | os.PathLike[str]) -> Callable[..., Any] | None:
        """The one lesion-label function of attention statistics (two-stage, E2E and GMA).

        Returns `labels(slide_id, coords=None) -> (N,) int64` for the slides tiled in
        `coords_dir`: `coords` are the (N, 2) level-0 patch corners a bag was built from
        (a features file's, a patch source's); without them the slide's coords file is read.
        The patch size at level 0 always comes from that coords file. Returns None when the
        cohort has no lesion masks (real data), so callers skip lesion statistics.
        """
        if not self.has_masks:
            return None
        from bench.data.tiling import read_coords

        folder = Path(coords_dir)
        sizes: dict[str, int] = {}  # slide id -> patch size at level 0 (from its coords file)
        cached: dict[str, Any] = {}  # slide id -> labels of its coords file's patches

        def labels(slide_id: str, coords: Any = None) -> Any:
            if coords is not None:
                if slide_id not in sizes:
                    sizes[slide_id] = read_coords(folder / f"{slide_id}.h5").patch_size_level0
                return self.lesion_labels(slide_id, coords, sizes[slide_id])
            if slide_id not in cached:
                c = read_coords(folder / f"{slide_id}.h5")
                cached[slide_id] = self.lesion_labels(slide_id, c.coords, c.patch_size_level0)
            return cached[slide_id]

        return labels

    def slide_jobs(self) -> list[SlideJob]:
        """One tiling job per slide (path and mpp override), in table order."""
        from bench.data.tiling import SlideJob

        return [SlideJob(sid, Path(p), None if math.isnan(m) else float(m))
                for sid, p, m in zip(self.table["slide_id"], self.table["path"], self.table["mpp"])]

    def subset(self, slide_ids: Iterable[str]) -> Cohort:
        """The cohort restricted to `slide_ids` (table order kept; unknown ids are an error)."""
        wanted = list(dict.fromkeys(slide_ids))
        unknown = sorted(set(wanted) - set(self.slide_ids))
        if unknown:
            raise DataError(f"{len(unknown)} slide id(s) are not in cohort {self.name!r}: {_listing(unknown)}")
        table = self.table[self.table["slide_id"].isin(wanted)].reset_index(drop=True)
        unreadable = None if self.unreadable is None else tuple(u for u in self.unreadable if u[0] in set(wanted))
        return replace(self, table=table, unreadable=unreadable)

    def check_slides(self) -> list[tuple[str, str]]:
        """(slide_id, reason) for every slide OpenSlide cannot open, read, or find a resolution for.

        Opening is not enough: a truncated TIFF often opens and fails on its first
        read, so the coarsest level is read too (small, and written last, so a cut
        file loses it first).
        """
        from bench.data.slides import Slide

        bad: list[tuple[str, str]] = []
        for job in self.slide_jobs():
            try:
                with Slide(job.path, mpp=job.mpp) as slide:
                    level = slide.level_count - 1
                    w, h = slide.level_dimensions[level]
                    slide.read_region(0, 0, level, min(w, 512), min(h, 512))
            except BenchError as exc:  # SlideError, MissingFileError, ConfigError: all reportable
                bad.append((job.slide_id, str(exc)))
        return bad


def load_cohort(
    root: str | os.PathLike[str],
    *,
    name: str | None = None,
    task: str | None = None,
    classes: Sequence[str] | None = None,
    labels: str | os.PathLike[str] = "labels.csv",
    slide_dir: str | os.PathLike[str] = "slides",
    check_readable: bool = False,
) -> Cohort:
    """Read and validate a cohort folder.

    Args:
        root: cohort folder.
        name: dataset name (default: cohort.json's name, else the folder name).
        task: classification, grading or survival (default: cohort.json's task,
            else survival when labels.csv has time/event, else classification).
        classes: label names in index order (default: cohort.json's classes;
            else classification sorts the names found, grading expects integers 0..K-1).
        labels: labels table, relative to `root` or absolute.
        slide_dir: slide folder, relative to `root` or absolute.
        check_readable: open every slide now and record the unreadable ones in
            `Cohort.unreadable` (a report, not an exception).

    Raises:
        MissingFileError: the folder, labels table or slide files are missing.
        DataError: the labels table has bad content (the message lists every bad value).
        ConfigError: an argument or cohort.json has a bad value.
    """
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"cohort folder {root} does not exist; give a folder with labels.csv and slides/")
    meta = _read_meta(root / "cohort.json")
    labels_file = root / labels
    slides = root / slide_dir
    if not labels_file.is_file():
        raise MissingFileError(
            f"labels table {labels_file} does not exist; a cohort needs a CSV with slide_id, patient_id "
            "and label (or time, event) columns"
        )
    if not slides.is_dir():
        raise MissingFileError(f"slide folder {slides} does not exist; put the slides there or pass slide_dir")
    df = _read_table(labels_file)
    task = task or meta.get("task") or ("survival" if {"time", "event"} <= set(df.columns) else "classification")
    if task not in TASK_KINDS:
        raise ConfigError(f"unknown task {task!r} for cohort {root}; known: {', '.join(TASK_KINDS)}")
    if classes is None:
        classes = meta.get("classes")
    if task == "survival" and classes:
        raise ConfigError(f"a survival cohort has no classes, got {list(classes)} for {root}")
    _require(df, ("slide_id", "patient_id", *_TARGETS[task]), labels_file, task)
    _check_ids(df, labels_file)
    if task == "survival":
        df = _survival_targets(df, labels_file)
        class_names = None
    else:
        df, class_names = _label_targets(df, labels_file, task, classes)
    df["mpp"] = _mpp_column(df, labels_file)
    df["path"] = _slide_paths(df, slides, labels_file)
    keep = ["slide_id", "patient_id", *(["time", "event"] if task == "survival" else ["label", "label_name"]),
            "mpp", "path"]
    table = df[keep].reset_index(drop=True)
    cohort = Cohort(
        name=str(name or meta.get("name") or root.resolve().name),
        root=root,
        slide_dir=slides,
        task=task,
        classes=class_names,
        table=table,
        labels_file=labels_file,
        mask_dir=root / "masks" if (root / "masks").is_dir() else None,
    )
    if check_readable:
        cohort = replace(cohort, unreadable=tuple(cohort.check_slides()))
    return cohort


# --- reading and validation -------------------------------------------------------------------


def _listing(values: Sequence[Any], limit: int | None = _SHOW) -> str:
    shown = [str(v) for v in (values if limit is None else values[:limit])]
    more = f" ... and {len(values) - len(shown)} more" if len(values) > len(shown) else ""
    return ", ".join(shown) + more


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); fix or delete it") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    return meta


def _read_table(path: Path) -> pd.DataFrame:
    import pandas as pd

    try:
        # every column as text: patient "007" stays "007" and a slide named "NA" stays "NA"
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read labels table {path}: {type(exc).__name__}: {exc}") from None
    df.columns = [str(c).strip() for c in df.columns]
    df = df.apply(lambda col: col.str.strip())
    if len(df) == 0:
        raise DataError(f"labels table {path} has no rows")
    return df


def _require(df: pd.DataFrame, columns: Sequence[str], path: Path, task: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(
            f"labels table {path} lacks column(s) {', '.join(missing)} needed for a {task} cohort; "
            f"columns found: {', '.join(df.columns)}"
        )


def _check_ids(df: pd.DataFrame, path: Path) -> None:
    for col in ("slide_id", "patient_id"):
        empty = [i + 2 for i in range(len(df)) if df[col].iat[i] == ""]  # +2: header, 1-based lines
        if empty:
            raise DataError(f"labels table {path} has an empty {col} on line(s) {_listing(empty)}")
    dup = sorted(df.loc[df["slide_id"].duplicated(), "slide_id"].unique())
    if dup:
        raise DataError(f"labels table {path} lists {len(dup)} slide id(s) more than once: {_listing(dup)}; "
                        "each slide needs exactly one row")
    unsafe = []
    for sid in df["slide_id"]:
        try:
            check_name("slide id", sid)  # slide ids name output files (tiles/<slide>.h5)
        except ConfigError:
            unsafe.append(sid)
    if unsafe:
        raise DataError(
            f"labels table {path} has slide id(s) that are not safe file names: {_listing([repr(s) for s in unsafe])}; "
            "use letters, digits, '.', '_', '+', '-' (no '/', no '..', not starting with '.'), "
            "and point at files elsewhere in the slide folder with a `filename` column"
        )


def _label_targets(
    df: pd.DataFrame, path: Path, task: str, classes: Sequence[str] | None
) -> tuple[pd.DataFrame, tuple[str, ...]]:
    names = df["label"]
    empty = [i + 2 for i in range(len(df)) if names.iat[i] == ""]
    if empty:
        raise DataError(f"labels table {path} has an empty label on line(s) {_listing(empty)}")
    if classes is not None:
        class_names = tuple(str(c) for c in classes)
        if len(set(class_names)) != len(class_names) or not class_names:
            raise ConfigError(f"classes must be distinct, non-empty names, got {list(class_names)}")
    elif task == "classification":
        class_names = tuple(sorted(names.unique()))
        by_case: dict[str, list[str]] = {}
        for c in class_names:
            by_case.setdefault(c.casefold(), []).append(c)
        clashes = [f"{'/'.join(v)} ({int(names.isin(v[1:]).sum())} vs {int((names == v[0]).sum())} slides)"
                   for v in by_case.values() if len(v) > 1]
        if clashes:  # `idc` beside `IDC` is a typo, not a third class
            raise DataError(f"labels table {path} has labels that differ only in case: {_listing(clashes)}; "
                            f"known labels: {', '.join(class_names)}. Fix the spelling (labels are case-sensitive) "
                            "or give the classes with `classes`")
    else:
        grades = {n: _as_grade(n) for n in names.unique()}
        bad = sorted(n for n, g in grades.items() if g is None)
        if bad:
            raise DataError(
                f"grading labels in {path} must be integers 0..K-1 when no classes are given; got {_listing(bad)}. "
                "Give the grade names in order with `classes` (or in cohort.json)"
            )
        class_names = tuple(str(g) for g in range(max(grades.values()) + 1))  # type: ignore[type-var]
        names = names.map(lambda n: str(grades[n]))  # "2.0" -> "2"
    index = {c: i for i, c in enumerate(class_names)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        folded = {c.casefold(): c for c in class_names}
        hints = [f"{u!r} -> {folded[u.casefold()]!r}" for u in unknown if u.casefold() in folded]
        hint = f" (labels are case-sensitive: {', '.join(hints)}?)" if hints else ""
        raise DataError(f"labels table {path} has label(s) not among the classes: {_listing(unknown)}; "
                        f"known classes: {', '.join(class_names)}{hint}")
    df = df.assign(label_name=names, label=names.map(index).astype(int))
    if task == "classification":
        # a grading patient may have biopsies of different grades; a subtype belongs to the patient
        per_patient = df.groupby("patient_id", sort=True)["label_name"].unique()
        conflicts = [f"{pid} ({'/'.join(sorted(v))})" for pid, v in per_patient.items() if len(v) > 1]
        if conflicts:
            raise DataError(f"labels table {path}: {len(conflicts)} patient(s) have slides with different labels: "
                            f"{_listing(conflicts)}; a patient's slides must share the class")
    return df, class_names


def _as_grade(value: str) -> int | None:
    try:
        f = float(value)
    except ValueError:
        return None
    return int(f) if math.isfinite(f) and f >= 0 and f.is_integer() else None


def _numbers(df: pd.DataFrame, col: str) -> list[float]:
    out = []
    for v in df[col]:
        try:
            out.append(float(v) if v != "" else math.nan)
        except ValueError:
            out.append(math.nan)
    return out


def _survival_targets(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    times, events = _numbers(df, "time"), _numbers(df, "event")
    bad_t = [f"{s}={v!r}" for s, v, t in zip(df["slide_id"], df["time"], times) if not (math.isfinite(t) and t >= 0)]
    if bad_t:
        raise DataError(f"labels table {path} has missing, non-numeric or negative time(s): {_listing(bad_t)}; "
                        "times must be numbers >= 0")
    bad_e = [f"{s}={v!r}" for s, v, e in zip(df["slide_id"], df["event"], events) if e not in (0.0, 1.0)]
    if bad_e:
        raise DataError(f"labels table {path} has event value(s) that are not 0 or 1: {_listing(bad_e)}; "
                        "use 1 = event observed, 0 = censored")
    df = df.assign(time=times, event=[int(e) for e in events])
    conflicts = []
    for pid, g in df.groupby("patient_id", sort=True):
        if g["time"].nunique() > 1 or g["event"].nunique() > 1:
            pairs = sorted({f"{t:g}/{e}" for t, e in zip(g["time"], g["event"])})
            conflicts.append(f"{pid} (time/event {', '.join(pairs)})")
    if conflicts:
        raise DataError(f"labels table {path}: {len(conflicts)} patient(s) have slides with different time or event: "
                        f"{_listing(conflicts)}; a survival bag is a patient, so its slides must agree")
    return df


def _mpp_column(df: pd.DataFrame, path: Path) -> list[float]:
    if "mpp" not in df.columns:
        return [math.nan] * len(df)
    values = _numbers(df, "mpp")
    bad = [f"{s}={raw!r}" for s, raw, v in zip(df["slide_id"], df["mpp"], values)
           if raw != "" and not (math.isfinite(v) and v > 0)]
    if bad:
        raise DataError(f"labels table {path} has mpp value(s) that are not positive numbers: {_listing(bad)}; "
                        "give level-0 microns per pixel (e.g. 0.25 for 40x) or leave the cell empty")
    return values


def _slide_paths(df: pd.DataFrame, slides: Path, path: Path) -> list[str]:
    """Absolute path of every slide; all missing files and all escapes are reported at once."""
    base = slides.resolve()
    present = {p.name: p for p in slides.iterdir()}  # one listing, not one stat per extension per slide
    if {"filename", "path"} <= set(df.columns):
        raise DataError(f"labels table {path} has both a `filename` and a `path` column; keep one (`filename`: the "
                        f"slide's file name inside {slides})")
    column = "filename" if "filename" in df.columns else "path" if "path" in df.columns else None
    # `path` is accepted as another name for `filename` (what a user may call it; never an absolute path)
    names = df[column].fillna("").astype(str) if column else [""] * len(df)
    out: list[str] = []
    missing: list[str] = []
    escaping: list[str] = []
    ambiguous: list[str] = []
    for sid, filename in zip(df["slide_id"], names):
        if filename:
            rel = Path(filename)
            if rel.is_absolute() or ".." in rel.parts:
                escaping.append(f"{sid}: {column} {filename!r}")
                out.append("")
                continue
            candidate = slides / rel
            if not candidate.exists():
                missing.append(f"{sid} ({filename})")
        else:
            found = [present[sid + ext] for ext in _extension_variants() if sid + ext in present]
            if not found:
                missing.append(f"{sid} (no {sid}.svs/.tif/... file)")
                out.append("")
                continue
            if len(found) > 1:
                ambiguous.append(f"{sid} ({', '.join(p.name for p in found)})")
            candidate = found[0]
        resolved = candidate.resolve()
        if candidate.exists() and not resolved.is_relative_to(base):
            escaping.append(f"{sid}: {candidate.name} -> {resolved}")
        out.append(str(resolved))
    if escaping:
        raise DataError(f"labels table {path} points at {len(escaping)} slide(s) outside the slide folder {slides}: "
                        f"{_listing(escaping)}; slides must live inside it (no '..', absolute paths or "
                        "symlinks leading out); move them in or use slide_dir")
    if missing:
        raise MissingFileError(f"{len(missing)} slide file(s) listed in {path} are missing from {slides}: "
                               f"{_listing(missing, limit=None)}. Copy them there, fix the `filename` column, "
                               "or remove their rows")
    if ambiguous:
        raise DataError(f"{len(ambiguous)} slide id(s) match several files in {slides}: {_listing(ambiguous)}; "
                        "add a `filename` column to say which one")
    return out


def _extension_variants() -> list[str]:
    return [v for ext in SLIDE_EXTENSIONS for v in (ext, ext.upper())]


__all__ = ["Cohort", "load_cohort"]
