"""Patient-level, stratified splits, written once and read by every method of a suite.

Protocols (`SplitSpec.protocol`):

- `holdout`: one fold. `ratios=(train, test)` with a validation part carved
  from train by `val_fraction` (default 0.2), or `ratios=(train, val, test)`,
  which is the same as test = the last ratio and val_fraction = val / (train + val).
- `kfold`: `folds` folds whose test parts partition the patients; each fold's
  validation part is carved from the rest by `val_fraction`.
- `mccv`: `repeats` independent holdout splits (Monte Carlo cross-validation).
- `paper`: no drawing; the assignments a paper's authors published, shipped
  with the package (`source` names one of bench.data.paper.PAPER_SPLITS). The
  file is written from them, restricted to the cohort's slides, with the same
  sha256 rules; shipped slides the cohort lacks are an error listing them (all
  written to `<split>.missing.csv`) unless `allow_missing` (see bench.data.paper).

How patients are assigned (own numpy code rather than scikit-learn: its
StratifiedGroupKFold balances greedily and does not promise exact part sizes,
and StratifiedShuffleSplit knows no patient groups):

- Splits are made over patients, then every slide follows its patient, so no
  patient is ever in two parts of a fold. Strata: the patient's class
  (grading: the patient's highest grade), survival: event x time-quantile bin.
- Carving a part of fraction f from n patients takes exactly round(n f)
  patients (half rounds up); each stratum gives floor(n_s f) or that plus one
  (largest remainder first, ties broken by the seeded generator), so each
  class's count is within one patient of its share. One patient of every class
  always stays in train.
- k-fold deals the patients of each stratum, shuffled, round-robin over the
  folds (continuing from stratum to stratum): fold sizes and per-class counts
  differ by at most one between folds.
- Randomness: holdout and mccv fold f use `np.random.default_rng([seed, f])`
  (so holdout equals mccv repeat 0, and adding repeats keeps earlier ones);
  k-fold deals with `default_rng(seed)` and carves fold f's val with
  `default_rng([seed, f])`. Within a stratum patients are sorted by id before
  shuffling, so the row order of labels.csv does not matter.

File: `splits/<dataset>/<protocol>-seed<k>.csv` (Layout.split_file) with the
columns `fold, slide_id, patient_id, part`, rows sorted by fold, part
(train, val, test) and slide id, plus `<file>.sha256` (sha256sum format). The
split depends on the labels only (not on which slides are readable), so it is
stable while slides are re-tiled or skipped.

Example:
    >>> cohort = load_cohort("data/brca")                              # doctest: +SKIP
    >>> splits = write_splits(cohort, "work", SplitSpec("kfold", folds=5), seed=0)  # doctest: +SKIP
    >>> splits.ids(0, "test")[:3], splits.sha256[:12]                   # doctest: +SKIP
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bench.common.console import warn
from bench.common.errors import ConfigError, DataError, MissingFileError
from bench.common.files import sha256_file, write_text_atomic
from bench.data.layout import Layout

if TYPE_CHECKING:
    import pandas as pd

    from bench.data.cohort import Cohort

PROTOCOLS = ("holdout", "kfold", "mccv", "paper")
PARTS = ("train", "val", "test")
COLUMNS = ("fold", "slide_id", "patient_id", "part")
DEFAULT_VAL_FRACTION = 0.2
_EPS = 1e-9  # float slack: 10 * 0.7 is 7.000000000000001
_NAME = re.compile(r"^(?P<protocol>.+)-seed(?P<seed>\d+)\.csv$")


@dataclass(frozen=True)
class SplitSpec:
    """How to split a cohort (the seed is a separate argument: one file per seed).

    Attributes:
        protocol: holdout, kfold or mccv.
        ratios: (train, test) or (train, val, test); holdout and mccv only.
        val_fraction: share of the non-test patients that goes to val (0: no val
            part). Default 0.2; must be left unset with three ratios.
        folds: number of folds (kfold).
        repeats: number of random holdout splits (mccv).
        time_bins: survival: time-quantile bins crossed with the event for strata.
        source: paper: the shipped split (a key of bench.data.paper.PAPER_SPLITS).
        allow_missing: paper: write the split without the shipped slides the cohort
            lacks (warned) instead of refusing.
    """

    protocol: str = "holdout"
    ratios: tuple[float, ...] = (0.7, 0.3)
    val_fraction: float | None = None
    folds: int = 5
    repeats: int = 5
    time_bins: int = 4
    source: str | None = None
    allow_missing: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratios", tuple(float(r) for r in self.ratios))
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"unknown split protocol {self.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        if self.protocol == "paper":
            from bench.data.paper import PAPER_SPLITS

            if self.source not in PAPER_SPLITS:
                raise ConfigError(f"the paper protocol needs source = one of {', '.join(PAPER_SPLITS)}; "
                                  f"got {self.source!r}")
        elif self.source is not None:
            raise ConfigError(f"source names a shipped split for protocol 'paper'; protocol is {self.protocol!r}")
        if self.protocol not in ("kfold", "paper"):
            if len(self.ratios) not in (2, 3) or any(not (math.isfinite(r) and r > 0) for r in self.ratios):
                raise ConfigError(f"ratios must be 2 (train, test) or 3 (train, val, test) positive numbers, "
                                  f"got {list(self.ratios)}")
            if abs(sum(self.ratios) - 1) > 1e-6:
                raise ConfigError(f"ratios must sum to 1, got {list(self.ratios)} (sum {sum(self.ratios):g})")
            if len(self.ratios) == 3 and self.val_fraction is not None:
                raise ConfigError(f"give either three ratios (train, val, test) or val_fraction, not both "
                                  f"(got ratios {list(self.ratios)} and val_fraction {self.val_fraction})")
        if self.val_fraction is not None and not (0 <= self.val_fraction < 1):
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.protocol == "kfold" and (not isinstance(self.folds, int) or self.folds < 2):
            raise ConfigError(f"kfold needs folds >= 2, got {self.folds!r}")
        if self.protocol == "mccv" and (not isinstance(self.repeats, int) or self.repeats < 1):
            raise ConfigError(f"mccv needs repeats >= 1, got {self.repeats!r}")
        if not isinstance(self.time_bins, int) or self.time_bins < 1:
            raise ConfigError(f"time_bins must be an integer >= 1, got {self.time_bins!r}")

    @property
    def n_folds(self) -> int:
        if self.protocol == "paper":
            from bench.data.paper import paper_split

            return paper_split(str(self.source)).n_folds
        return {"holdout": 1, "kfold": self.folds, "mccv": self.repeats}[self.protocol]

    @property
    def test_fraction(self) -> float:
        return 1 / self.folds if self.protocol == "kfold" else self.ratios[-1]

    @property
    def val_share(self) -> float:
        """Fraction of the non-test patients carved into val."""
        if self.protocol != "kfold" and len(self.ratios) == 3:
            return self.ratios[1] / (self.ratios[0] + self.ratios[1])
        return DEFAULT_VAL_FRACTION if self.val_fraction is None else float(self.val_fraction)


@dataclass(frozen=True, eq=False)
class Splits:
    """A split file as read back: the table plus what identifies it in run records."""

    path: Path
    sha256: str
    protocol: str | None  # from the file name `<protocol>-seed<k>.csv`; None for other names
    seed: int | None
    table: pd.DataFrame  # columns fold (int), slide_id, patient_id, part

    @property
    def folds(self) -> list[int]:
        return sorted(int(f) for f in self.table["fold"].unique())

    @property
    def n_folds(self) -> int:
        return len(self.folds)

    def _rows(self, fold: int, part: str) -> pd.DataFrame:
        if part not in PARTS:
            raise ConfigError(f"unknown split part {part!r}; choose one of {', '.join(PARTS)}")
        if fold not in self.folds:
            raise ConfigError(f"split {self.path.name} has no fold {fold!r}; folds: {self.folds}")
        t = self.table
        return t[(t["fold"] == fold) & (t["part"] == part)]

    def ids(self, fold: int, part: str) -> list[str]:
        """Slide ids of one part of one fold, sorted (empty for a val part the split has none of)."""
        return sorted(self._rows(fold, part)["slide_id"])

    def patients(self, fold: int, part: str) -> list[str]:
        """Patient ids of one part of one fold, sorted (survival bags)."""
        return sorted(self._rows(fold, part)["patient_id"].unique())


# --- assignment ------------------------------------------------------------------------------


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + _EPS))


def _strata(patients: pd.DataFrame, task: str, time_bins: int) -> np.ndarray:
    """One integer stratum per patient."""
    if task != "survival":
        return patients["label"].to_numpy(dtype=np.int64)
    times = patients["time"].to_numpy(dtype=float)
    edges = np.quantile(times, np.linspace(0, 1, time_bins + 1)[1:-1])
    bins = np.searchsorted(edges, times, side="right")
    return patients["event"].to_numpy(dtype=np.int64) * time_bins + bins


def _shuffled_members(ids: np.ndarray, strata: np.ndarray, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Stratum -> indices of its patients (sorted by patient id, then shuffled), strata in key order."""
    out = {}
    for s in np.unique(strata):
        members = np.flatnonzero(strata == s)
        members = members[np.argsort(ids[members], kind="stable")]
        out[int(s)] = members[rng.permutation(len(members))]
    return out


def _carve(ids: np.ndarray, strata: np.ndarray, fraction: float, rng: np.random.Generator, keep_one: bool,
           what: str) -> np.ndarray:
    """Boolean mask of exactly round(n * fraction) patients, stratified (see module docstring)."""
    n = len(ids)
    total = _round_half_up(n * fraction)
    if total < 1 or total > n - 1:
        raise ConfigError(f"the {what} part would hold {total} of {n} patients (fraction {fraction:.3g}); "
                          "every part needs at least one patient: use a larger cohort or other fractions")
    members = _shuffled_members(ids, strata, rng)
    keys = list(members)
    counts = np.array([len(members[s]) for s in keys])
    target = counts * fraction
    cap = counts - 1 if keep_one else counts  # keep_one: a class never leaves train entirely
    take = np.minimum(np.floor(target + _EPS).astype(np.int64), cap)
    extra = total - int(take.sum())
    assert extra >= 0, (total, take)
    order = np.lexsort((rng.random(len(keys)), -(target - take)))  # largest remainder first, random ties
    for i in order:
        if extra == 0:
            break
        if take[i] < cap[i]:
            take[i] += 1
            extra -= 1
    if extra:
        raise ConfigError(f"cannot carve {total} of {n} patients into {what} while keeping every class in train; "
                          "use a smaller fraction or a larger cohort")
    chosen = np.zeros(n, dtype=bool)
    for s, k in zip(keys, take):
        chosen[members[s][:k]] = True
    return chosen


def _deal(ids: np.ndarray, strata: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Fold of every patient: strata in key order, each shuffled, dealt round-robin."""
    order = np.concatenate(list(_shuffled_members(ids, strata, rng).values()))
    fold = np.empty(len(ids), dtype=np.int64)
    fold[order] = np.arange(len(order)) % k
    return fold


def _check_rare(patients: pd.DataFrame, cohort: Cohort, spec: SplitSpec) -> None:
    """Refuse classes that cannot be in train of every fold; warn about classes some parts will miss."""
    if cohort.task == "survival":
        if int(patients["event"].sum()) < 2:
            warn(f"cohort {cohort.name!r} has {int(patients['event'].sum())} event(s): C-index needs events "
                 "in every test part")
        return
    counts = {cohort.classes[int(label)]: int(n)  # type: ignore[index]
              for label, n in sorted(patients["label"].value_counts().items())}
    if spec.protocol == "kfold":
        lone = [name for name, n in counts.items() if n < 2]
        if lone:
            raise ConfigError(
                f"class(es) {', '.join(map(repr, lone))} of cohort {cohort.name!r} have only 1 patient: k-fold "
                "would leave them out of train in the fold that tests them. Merge or drop them, or use holdout"
            )
    parts_needed = spec.folds if spec.protocol == "kfold" else (3 if spec.val_share > 0 else 2)
    rare = [f"{name!r} ({n})" for name, n in counts.items() if n < parts_needed]
    if rare:
        where = f"all {parts_needed} test folds" if spec.protocol == "kfold" else "train, val and test" \
            if parts_needed == 3 else "train and test"
        warn(f"class(es) {', '.join(rare)} of cohort {cohort.name!r} have too few patients to appear in {where}; "
             "each keeps at least one patient in train, some parts will have none of them")


def make_splits(cohort: Cohort, spec: SplitSpec, *, seed: int, missing_report: Path | None = None) -> pd.DataFrame:
    """The split table (columns `COLUMNS`, sorted) for a cohort; pure, nothing is written.

    Protocol `paper` ignores the seed (the authors' assignments are fixed); it
    lists absent shipped slides in `missing_report` when given (removed when none is).
    """
    import pandas as pd

    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"split seed must be an integer >= 0, got {seed!r}")
    if spec.protocol == "paper":
        from bench.data.paper import paper_table

        return _sorted(paper_table(cohort, str(spec.source), allow_missing=spec.allow_missing,
                                   missing_report=missing_report))
    patients = cohort.patient_table()
    ids = patients["patient_id"].to_numpy(dtype=object)
    strata = _strata(patients, cohort.task, spec.time_bins)
    keep_one = cohort.task != "survival"
    _check_rare(patients, cohort, spec)
    n = len(ids)
    if spec.protocol == "kfold" and n < spec.folds:
        raise ConfigError(f"kfold with {spec.folds} folds needs at least {spec.folds} patients; "
                          f"cohort {cohort.name!r} has {n}")
    dealt = _deal(ids, strata, spec.folds, np.random.default_rng(seed)) if spec.protocol == "kfold" else None
    frames = []
    for fold in range(spec.n_folds):
        rng = np.random.default_rng([int(seed), fold])
        part = np.full(n, "train", dtype=object)
        if dealt is not None:
            test = dealt == fold
        else:
            test = _carve(ids, strata, spec.test_fraction, rng, keep_one, "test")
        part[test] = "test"
        if spec.val_share > 0:
            pool = np.flatnonzero(~test)
            val = _carve(ids[pool], strata[pool], spec.val_share, rng, keep_one, f"val (fold {fold})")
            part[pool[val]] = "val"
        assert all((part == p).any() for p in (PARTS if spec.val_share > 0 else ("train", "test"))), fold
        if keep_one:
            assert set(strata) == set(strata[part == "train"]), f"a class is missing from train in fold {fold}"
        elif not patients["event"].to_numpy()[part == "test"].any():
            warn(f"fold {fold} of cohort {cohort.name!r}: the test part has no event; its C-index is undefined")
        frames.append(pd.DataFrame({"fold": fold, "patient_id": ids, "part": part}))
    assignment = pd.concat(frames, ignore_index=True)
    slides = cohort.table[["slide_id", "patient_id"]]
    table = slides.merge(assignment, on="patient_id", how="inner", validate="many_to_many")
    assert len(table) == len(slides) * spec.n_folds
    assert (table.groupby(["fold", "patient_id"])["part"].nunique() == 1).all(), "a patient is in two parts"
    return _sorted(table)


def _sorted(table: pd.DataFrame) -> pd.DataFrame:
    rank = table["part"].map({p: i for i, p in enumerate(PARTS)})
    order = np.lexsort((table["slide_id"].to_numpy(), rank.to_numpy(), table["fold"].to_numpy()))
    return table.iloc[order][list(COLUMNS)].reset_index(drop=True)


def to_csv_text(table: pd.DataFrame) -> str:
    """The exact bytes (as text) of a split file: same table, same bytes, on every machine."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(zip(table["fold"].astype(int), table["slide_id"], table["patient_id"], table["part"]))
    return buf.getvalue()


# --- files -----------------------------------------------------------------------------------


def sha256_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def write_splits(
    cohort: Cohort,
    workdir: str | os.PathLike[str],
    spec: SplitSpec = SplitSpec(),
    *,
    seed: int,
    dataset: str | None = None,
) -> Splits:
    """Write the split file of (dataset, protocol, seed) once; verify it when it exists.

    An existing file is never rewritten: its sha256 must match its `.sha256`
    record and regenerating from the same inputs must give the same bytes,
    otherwise a DataError says what differs. Concurrent writers are harmless:
    both write identical bytes through an atomic rename.

    Returns:
        The split as `load_splits` reads it back.
    """
    path = Layout(workdir).split_file(dataset or cohort.name, spec.protocol, seed)
    missing = path.with_name(path.stem + ".missing.csv") if spec.protocol == "paper" else None
    text = to_csv_text(make_splits(cohort, spec, seed=seed, missing_report=missing))
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if path.exists():
        _verify_existing(path, text, digest)
    else:
        write_text_atomic(path, text)
    if not sha256_path(path).exists():  # first write, or killed between the two files (content verified above)
        write_text_atomic(sha256_path(path), f"{digest}  {path.name}\n")
    return load_splits(path)


def _recorded_sha(path: Path) -> str | None:
    record = sha256_path(path)
    if not record.exists():
        return None
    fields = record.read_text(encoding="utf-8").split()
    if not fields or not re.fullmatch(r"[0-9a-f]{64}", fields[0]):
        raise DataError(f"{record} does not hold a sha256; delete it and rerun to verify {path.name} again")
    return fields[0]


def _tamper_check(path: Path) -> str:
    actual = sha256_file(path)
    recorded = _recorded_sha(path)
    if recorded is not None and recorded != actual:
        raise DataError(
            f"split file {path} was changed after it was written: its sha256 is {actual[:16]}..., "
            f"{sha256_path(path).name} records {recorded[:16]}.... Every method of a suite must read the same split: "
            f"restore the file, or delete {path.name} and {sha256_path(path).name} to regenerate it deliberately"
        )
    return actual


def _verify_existing(path: Path, text: str, digest: str) -> None:
    actual = _tamper_check(path)
    if actual == digest:
        return
    import pandas as pd

    old = _read_table(path)
    new = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False).astype({"fold": int})
    raise DataError(
        f"existing split {path} differs from the one these settings give ({_describe_diff(old, new)}). "
        "It was made with other split settings or another version of the cohort. Pass the settings it was "
        f"made with, or delete {path.name} and {sha256_path(path).name} to regenerate it deliberately "
        "(runs recorded with the old sha256 are then no longer comparable)"
    )


def _describe_diff(old: pd.DataFrame, new: pd.DataFrame) -> str:
    o = {(int(f), s): p for f, s, p in zip(old["fold"], old["slide_id"], old["part"])}
    n = {(int(f), s): p for f, s, p in zip(new["fold"], new["slide_id"], new["part"])}
    notes = []
    if old["fold"].nunique() != new["fold"].nunique():
        notes.append(f"{old['fold'].nunique()} fold(s) in the file, {new['fold'].nunique()} now")
    only_old = sorted({s for _, s in o} - {s for _, s in n})
    only_new = sorted({s for _, s in n} - {s for _, s in o})
    if only_old:
        notes.append(f"slides only in the file: {', '.join(only_old[:10])}{' ...' if len(only_old) > 10 else ''}")
    if only_new:
        notes.append(f"slides only in the cohort now: {', '.join(only_new[:10])}{' ...' if len(only_new) > 10 else ''}")
    moved = sorted(k for k in o.keys() & n.keys() if o[k] != n[k])
    if moved:
        examples = ", ".join(f"fold {f} {s}: {o[(f, s)]} -> {n[(f, s)]}" for f, s in moved[:5])
        notes.append(f"{len(moved)} slide assignment(s) differ, e.g. {examples}")
    return "; ".join(notes) or "same assignments, different bytes"


def _read_table(path: Path) -> pd.DataFrame:
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read split file {path}: {type(exc).__name__}: {exc}") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"split file {path} lacks column(s) {', '.join(missing)}; "
                        f"columns found: {', '.join(df.columns)}")
    if not df["fold"].str.fullmatch(r"\d+").all():
        bad = sorted(set(df.loc[~df["fold"].str.fullmatch(r"\d+"), "fold"]))
        raise DataError(f"split file {path} has fold values that are not integers >= 0: {bad[:10]}")
    return df[list(COLUMNS)].astype({"fold": int})


def load_splits(path: str | os.PathLike[str]) -> Splits:
    """Read a split file, checking its sha256 record (when present) and its invariants."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"split file {path} does not exist; write it with `bench split`")
    sha = _tamper_check(path)
    table = _read_table(path)
    bad_parts = sorted(set(table["part"]) - set(PARTS))
    if bad_parts:
        raise DataError(f"split file {path} has unknown part(s) {bad_parts}; parts are {', '.join(PARTS)}")
    dup = table.duplicated(["fold", "slide_id"])
    if dup.any():
        raise DataError(f"split file {path} lists slide {table.loc[dup, 'slide_id'].iloc[0]!r} twice in one fold")
    spread = table.groupby(["fold", "patient_id"])["part"].nunique()
    if (spread > 1).any():
        fold, pid = spread[spread > 1].index[0]
        raise DataError(f"split file {path}: patient {pid!r} is in two parts of fold {fold}; "
                        "a patient's slides must stay together")
    m = _NAME.match(path.name)
    return Splits(path=path, sha256=sha, protocol=m["protocol"] if m else None,
                  seed=int(m["seed"]) if m else None, table=table)


def summary(splits: Splits, cohort: Cohort) -> pd.DataFrame:
    """Per fold and part: patients, slides, and slides per class (or events / censored patients)."""
    import pandas as pd

    t = splits.table.merge(cohort.table.drop(columns=["patient_id"]), on="slide_id", how="left")
    rows = []
    for (fold, part), g in t.groupby(["fold", t["part"].map(PARTS.index)], sort=True):
        row = {"fold": fold, "part": PARTS[part], "patients": g["patient_id"].nunique(), "slides": len(g)}
        if cohort.task == "survival":
            per_patient = g.drop_duplicates("patient_id")
            row.update(events=int(per_patient["event"].sum()), censored=int((per_patient["event"] == 0).sum()))
        else:
            for i, name in enumerate(cohort.classes or ()):
                row[name] = int((g["label"] == i).sum())
        rows.append(row)
    return pd.DataFrame(rows)


__all__ = ["PROTOCOLS", "PARTS", "SplitSpec", "Splits", "make_splits", "write_splits", "load_splits", "summary",
           "to_csv_text"]
