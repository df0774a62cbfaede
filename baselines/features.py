"""Reading feature files: ours, CLAM's and TRIDENT's, as they are.

All three keep one HDF5 file per slide with a `features` dataset (N, D) and a
`coords` dataset (N, 2) of level-0 top-left corners; they differ in where the
metadata lives:

- **cpath-bench** (`baselines.extract`): attrs on the file (created_by = "cpath-bench",
  encoder, weights_id, magnification, seconds, config_hash, ...), coords attrs as in
  the coords file. Only files with that marker are ever replaced by an extraction
  (`harness_made`); anyone else's file in the harness's folder stops it with
  `ForeignFeaturesError`.
- **TRIDENT**: attrs on the `features` and `coords` datasets (patch_size,
  level0_magnification, target_magnification, name, ...).
- **CLAM**: `h5_files/<slide>.h5` with no attrs on `features` (coords attrs
  patch_size/patch_level); `pt_files/` holds the same features without coords.

So a user with months of CLAM or TRIDENT features points the harness at the
folder and trains aggregators on them directly (`bench train --features DIR`, which
only reads the folder):

    >>> feats, coords, attrs = read_features("h5_files/slide_1.h5")   # doctest: +SKIP
    >>> found = list_features("clam_out/")                             # doctest: +SKIP
    >>> given = external_features("clam_out/", cohort.slide_ids)       # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from bench.common.errors import BenchError, DataError, MissingFileError
from bench.common.files import is_partial

MARKER_ATTR, MARKER = "created_by", "cpath-bench"
# The mtime an extraction gave the file once it had checked every row; while the file still
# has it, nothing changed the file since and a reuse check need not read all rows again.
CHECKED_MTIME_ATTR = "checked_mtime_ns"
# File attrs every feature file of the harness has (what its reuse and costs read).
HARNESS_ATTRS = ("config_hash", "encoder", "weights_id", "n_patches", "seconds")
# Files written before the marker existed carry these harness-only attrs (no CLAM/TRIDENT tool writes them).
_LEGACY_SIGNATURE = ("config_hash", "harness_version", "weights_id", "encoder")


class ForeignFeaturesError(BenchError):
    """Feature files another tool made sit where an extraction would write; they are never replaced."""


class SlideFeatures(NamedTuple):
    """One slide's bag: `features` (N, D), `coords` (N, 2) int64, merged `attrs`."""

    features: np.ndarray
    coords: np.ndarray
    attrs: dict[str, Any]


def read_features(path: str | os.PathLike[str], dtype: Any = np.float32) -> SlideFeatures:
    """Read one feature file (ours, CLAM's or TRIDENT's).

    Leading singleton axes ((1, N, D) as some tools write) are dropped. `attrs`
    merges coords-dataset, features-dataset and file attributes (file wins) and
    adds `layout`: "cpath-bench", "trident" or "clam".

    Args:
        dtype: dtype of the returned features (None keeps the stored one, e.g. float16).

    Raises:
        MissingFileError: no such file.
        DataError: not a feature file, damaged, shapes disagree, or non-finite values.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"feature file {path} does not exist")
    if path.suffix.lower() in (".pt", ".pth"):
        raise DataError(
            f"{path} is a CLAM pt file (features without coords); point at the matching "
            f"h5_files/{path.stem}.h5 instead, which holds features and coords"
        )
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise DataError(f"{path} has no 'features' dataset (datasets: {sorted(f.keys())}); "
                                "it is not a feature file")
            if "coords" not in f:
                raise DataError(f"{path} has no 'coords' dataset; extract it again or add the coords "
                                "(N, 2) of its patches")
            feats = np.asarray(f["features"][()])
            coords = np.asarray(f["coords"][()])
            layout = _layout(f)
            attrs = {**_attrs(f["coords"].attrs), **_attrs(f["features"].attrs), **_attrs(f.attrs), "layout": layout}
    except OSError as exc:
        raise DataError(f"cannot read feature file {path} ({exc}); it is damaged: delete it and extract "
                        "again") from None
    feats = _squeeze_leading(feats, 2, path, "features")
    coords = _squeeze_leading(coords, 2, path, "coords")
    if coords.shape[1:] != (2,):
        raise DataError(f"{path}: coords must have shape (N, 2), got {coords.shape}")
    if feats.shape[0] != coords.shape[0]:
        raise DataError(f"{path}: {feats.shape[0]} feature rows but {coords.shape[0]} coords; the file is inconsistent")
    if feats.shape[0] == 0:
        raise DataError(f"{path} holds no patches (0 features)")
    if not np.issubdtype(feats.dtype, np.floating):
        raise DataError(f"{path}: features must be floating point, got {feats.dtype}")
    if not np.isfinite(feats).all():
        bad = int((~np.isfinite(feats)).any(axis=1).sum())
        advice = ("extract them again (`bench extract` redoes the file)" if layout == "cpath-bench" else
                  f"the file was made by another tool ({layout} layout): re-create it there, or leave the slide out")
        raise DataError(f"{path}: {bad} of {feats.shape[0]} feature rows hold NaN or inf; {advice}")
    if dtype is not None:
        feats = feats.astype(dtype, copy=False)
    return SlideFeatures(feats, coords.astype(np.int64, copy=False), attrs)


def _layout(f: Any) -> str:
    if "encoder" in f.attrs and "config_hash" in f.attrs:
        return "cpath-bench"
    if len(f["features"].attrs) or "level0_magnification" in f["coords"].attrs:
        return "trident"
    return "clam"


def _attrs(attrs: Any) -> dict[str, Any]:
    out = {}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        elif isinstance(value, np.generic):
            value = value.item()
        out[str(key)] = value
    return out


def _squeeze_leading(arr: np.ndarray, ndim: int, path: Path, what: str) -> np.ndarray:
    while arr.ndim > ndim and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != ndim:
        raise DataError(f"{path}: {what} must be a 2-D array, got shape {arr.shape}")
    return arr


# ------------------------------------------------------------------------------ checks without reading


def check_feature_file(
    path: str | os.PathLike[str], *, n_patches: int | None = None, embed_dim: int | None = None,
    config_hash: str | None = None, attrs: Iterable[str] = (), scan: str = "last",
) -> str | None:
    """Why an existing feature file cannot be reused, or None when it can.

    Args:
        attrs: file attributes the file must have (e.g. `HARNESS_ATTRS`).
        scan: which feature rows are checked for NaN/inf: "last" (cheap, enough to catch a
            truncated file), "all" (read in blocks), or "auto": all unless the file still has
            the mtime the extraction recorded after checking every row (`CHECKED_MTIME_ATTR`).
    """
    import h5py

    if scan not in ("last", "all", "auto"):
        raise ValueError(f"scan must be 'last', 'all' or 'auto', got {scan!r}")
    path = Path(path)
    if not path.is_file():
        return "missing"
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f or "coords" not in f:
                return "no features/coords datasets"
            shape, cshape = f["features"].shape, f["coords"].shape
            if len(shape) != 2 or len(cshape) != 2 or cshape[1] != 2 or shape[0] != cshape[0] or shape[0] == 0:
                return f"bad shapes: features {shape}, coords {cshape}"
            lacking = [a for a in attrs if a not in f.attrs]
            stored_hash = f.attrs.get("config_hash")
            if scan == "auto":
                stamp = f.attrs.get(CHECKED_MTIME_ATTR)
                scan = "last" if stamp is not None and int(stamp) == path.stat().st_mtime_ns else "all"
            bad = _non_finite_rows(f["features"], everything=scan == "all")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"damaged ({type(exc).__name__}: {exc})"
    if bad:
        return f"{bad} of {shape[0]} feature rows hold NaN or inf" if scan == "all" else "non-finite values"
    if lacking:
        return f"missing attrs: {', '.join(lacking)}"
    if n_patches is not None and shape[0] != n_patches:
        return f"{shape[0]} rows but the coords file has {n_patches} patches"
    if embed_dim is not None and shape[1] != embed_dim:
        return f"dimension {shape[1]} but the encoder gives {embed_dim}"
    if config_hash is not None:
        stored = stored_hash.decode() if isinstance(stored_hash, bytes) else stored_hash
        if stored != config_hash:
            return f"made with other settings or weights (config hash {stored} != {config_hash})"
    return None


def _non_finite_rows(ds: Any, *, everything: bool, block_bytes: int = 64 << 20) -> int:
    """Rows of an (N, D) dataset holding NaN or inf: all rows, read ~64 MiB at a time, or only the last."""
    n = ds.shape[0]
    if not everything:
        return int(not np.isfinite(np.asarray(ds[n - 1])).all())
    step = max(1, block_bytes // max(1, ds.shape[1] * ds.dtype.itemsize))
    bad = 0
    for start in range(0, n, step):
        block = np.asarray(ds[start:start + step])
        if np.issubdtype(block.dtype, np.floating):
            bad += int((~np.isfinite(block)).any(axis=1).sum())
    return bad


def harness_made(path: str | os.PathLike[str]) -> bool | None:
    """Whether the harness wrote this feature file: True (marker attr, or a file of a harness version
    before the marker), False (another tool's file, e.g. CLAM's or TRIDENT's, or no feature file at
    all), None when the file cannot be opened (then no one can tell)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            marker = f.attrs.get(MARKER_ATTR)
            if marker is not None:
                return (marker.decode(errors="replace") if isinstance(marker, bytes) else str(marker)) == MARKER
            return all(a in f.attrs for a in _LEGACY_SIGNATURE)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def describe_layout(path: str | os.PathLike[str]) -> str:
    """"CLAM layout", "TRIDENT layout" or "not a feature file" (for messages about someone's file)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "features" not in f or "coords" not in f:
                return f"not a feature file: datasets {sorted(f.keys())}"
            return {"trident": "TRIDENT layout", "clam": "CLAM layout"}.get(_layout(f), "cpath-bench layout")
    except (OSError, ValueError, KeyError, TypeError):
        return "unreadable"


def refuse_foreign(paths: Iterable[str | os.PathLike[str]]) -> None:
    """Stop before an extraction that would replace feature files the harness did not make.

    Raises:
        ForeignFeaturesError: naming the first such file, what it is, and the two ways on.
    """
    foreign = [Path(p) for p in paths if Path(p).is_file() and harness_made(p) is False]
    if not foreign:
        return
    folder, many = foreign[0].parent, len(foreign) > 1
    what = f"{foreign[0]}{f' and {len(foreign) - 1} more' if many else ''} ({describe_layout(foreign[0])})"
    raise ForeignFeaturesError(
        f"{what} {'were' if many else 'was'} not made by cpath-bench (no {MARKER_ATTR}={MARKER!r} attr), so "
        f"extraction stops rather than overwrite {'them' if many else 'it'}. To train on these features as they "
        f"are, run `bench train --features {folder}` (it only reads the folder); to extract features here "
        f"instead, move {'them' if many else 'the file'} out of {folder} first.")


# ------------------------------------------------------------------------------ folders


def list_features(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """slide id -> feature file of a folder: ours, TRIDENT's `features_<enc>/`, or a CLAM root.

    A CLAM output root (with `h5_files/`) is looked into; temporary files of an
    interrupted write and lock files are never listed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"features folder {folder} does not exist; run `bench extract` first")
    if (folder / "h5_files").is_dir():
        folder = folder / "h5_files"
    found = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in (".h5", ".hdf5") and not is_partial(p) and not p.name.startswith("."):
            found[p.stem] = p
    return found


@dataclass
class FeaturesCheck:
    """What `validate_features_dir` found.

    Attributes:
        files: slide id -> usable feature file.
        missing: wanted slide ids without a file.
        bad: (slide id, reason) of files that cannot be used.
        embed_dim: the common feature dimension (None when no file is usable).
    """

    files: dict[str, Path] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)
    embed_dim: int | None = None

    @property
    def ok(self) -> bool:
        return not self.missing and not self.bad and bool(self.files)


def validate_features_dir(
    folder: str | os.PathLike[str], slide_ids: Iterable[str] | None = None, *, embed_dim: int | None = None,
    scan: str = "last",
) -> FeaturesCheck:
    """Check a features folder before training: every wanted slide present, one dimension, files readable.

    Files are checked with `check_feature_file` (cheaply unless `scan="all"`); a dimension
    that differs from `embed_dim` (or from the most common one) marks the file bad.
    """
    listed = list_features(folder)
    wanted = list(slide_ids) if slide_ids is not None else sorted(listed)
    check = FeaturesCheck(missing=[s for s in wanted if s not in listed])
    dims: dict[str, int] = {}
    for slide in wanted:
        if slide not in listed:
            continue
        reason = check_feature_file(listed[slide], scan=scan)
        if reason is not None:
            check.bad.append((slide, reason))
            continue
        dims[slide] = _feature_dim(listed[slide])
    if dims:
        values = list(dims.values())
        target = embed_dim if embed_dim is not None else max(set(values), key=values.count)
        for slide, d in dims.items():
            if d != target:
                check.bad.append((slide, f"feature dimension {d}, expected {target}"))
            else:
                check.files[slide] = listed[slide]
        check.embed_dim = target if check.files else None
    return check


def _feature_dim(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return int(f["features"].shape[-1])


# ------------------------------------------------------------------------------ someone's features folder

_EXPECTED = ("<slide_id>.h5 files with a `features` (N, D) and a `coords` (N, 2) dataset, as CLAM "
             "(<root>/h5_files/), TRIDENT (<job>/<mag>x_<px>px_<overlap>px_overlap/features_<encoder>/) or "
             "`bench extract` (<workdir>/features/<dataset>/<encoder>/<mag>x-<px>px/) write them")


def features_folder(folder: str | os.PathLike[str]) -> Path:
    """The folder holding the `<slide>.h5` files of `folder`: itself, a CLAM root's `h5_files/`, or
    the one `features_<encoder>/` of a TRIDENT job (or of one of its `<mag>x_<px>px...` folders).

    Raises:
        MissingFileError: no such folder.
        DataError: no feature files there, or features of several encoders (with the folders to choose from).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise MissingFileError(f"features folder {folder} does not exist; expected a folder of {_EXPECTED}")
    if (folder / "h5_files").is_dir():
        return folder / "h5_files"
    if _h5_files(folder):
        return folder
    found = [p for p in sorted(folder.glob("features_*")) + sorted(folder.glob("*/features_*"))
             if p.is_dir() and _h5_files(p)]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise DataError(f"{folder} holds the features of {len(found)} encoders or tilings "
                        f"({', '.join(str(p.relative_to(folder)) for p in found[:6])}); point at one of them, "
                        f"e.g. {found[0]}")
    raise DataError(f"{folder} holds no feature files; expected {_EXPECTED}")


def _h5_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".h5", ".hdf5")
            and not is_partial(p) and not p.name.startswith(".")]


@dataclass(frozen=True)
class ExternalFeatures:
    """A features folder a run only reads (`bench train --features`).

    Attributes:
        folder: where the `<slide>.h5` files are (a CLAM root's h5_files/, ...).
        weights_id: what the run records as its features: folder and a digest of the files'
            names, sizes and mtimes, so changed files make runs stale.
        slides: the wanted slides with a usable file.
        missing: the wanted slides without a file (left out of the runs).
        embed_dim: the feature dimension.
        layout: "cpath-bench", "trident" or "clam" (of the first file).
    """

    folder: Path
    weights_id: str
    slides: frozenset[str]
    missing: tuple[str, ...]
    embed_dim: int
    layout: str


def external_features(folder: str | os.PathLike[str], slide_ids: Iterable[str], *, scan: str = "all"
                      ) -> ExternalFeatures:
    """Check a features folder of any layout for training on it as it is; nothing is written there.

    Args:
        slide_ids: the cohort's slides; slides without a file are listed in `missing`.
        scan: rows checked for NaN/inf (`check_feature_file`); "all" by default, as nothing re-extracts them.

    Raises:
        MissingFileError / DataError: naming the folder and what was expected: no such folder, no
            feature files, none for the cohort's slides, files that cannot be used (with the reasons).
    """
    import h5py

    root = features_folder(folder)
    wanted = list(dict.fromkeys(slide_ids))
    listed = list_features(root)
    odd = sorted(p.name for p in listed.values() if p.suffix != ".h5")
    if odd:
        raise DataError(f"{root}: feature files must be named <slide_id>.h5, got {', '.join(odd[:3])}; "
                        "link them under .h5 names in another folder")
    check = validate_features_dir(root, [s for s in wanted if s in listed], scan=scan)
    check.missing = [s for s in wanted if s not in listed]
    if not check.files and not check.bad:
        raise DataError(
            f"{root} has no feature file for any of the {len(wanted)} slides of the cohort: expected "
            f"<slide_id>.h5 such as {wanted[0] if wanted else 'SLIDE'}.h5, found "
            f"{', '.join(sorted(listed)[:3]) or 'no .h5 files'}{' ...' if len(listed) > 3 else ''} "
            "(do the slide ids of labels.csv match the file names?)")
    if check.bad:
        shown = "; ".join(f"{s}.h5: {why}" for s, why in check.bad[:3])
        more = f" (and {len(check.bad) - 3} more)" if len(check.bad) > 3 else ""
        raise DataError(f"{len(check.bad)} feature file{'s' if len(check.bad) > 1 else ''} in {root} cannot be "
                        f"used: {shown}{more}. Fix or "
                        "re-create them with the tool that made them, or leave those slides out of the cohort")
    digest = hashlib.sha256()
    for slide in sorted(check.files):
        st = check.files[slide].stat()
        digest.update(f"{slide}:{st.st_size}:{st.st_mtime_ns};".encode())
    first = check.files[min(check.files)]
    with h5py.File(first, "r") as f:
        layout = _layout(f)
    resolved = root.resolve()
    return ExternalFeatures(resolved, f"external:{resolved}#{digest.hexdigest()[:12]}", frozenset(check.files),
                            tuple(check.missing), int(check.embed_dim or 0), layout)


def folder_tag(folder: str | os.PathLike[str]) -> str:
    """A name part for runs on a given features folder: the folder's name (a CLAM root's for h5_files/)."""
    path = Path(folder).expanduser().resolve()
    name = path.parent.name if path.name == "h5_files" else path.name
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", name).strip(".-") or "features"


def extraction_seconds(files: dict[str, Path] | Iterable[Path]) -> dict[str, float]:
    """slide id -> feature extraction seconds (the `seconds` attr our files keep), for the costs of a run.

    Files without the attr (CLAM, TRIDENT) are left out; `Costs.with_feature_extraction`
    then names the slides it lacks.
    """
    import h5py

    items = files.items() if isinstance(files, dict) else ((Path(p).stem, Path(p)) for p in files)
    out = {}
    for slide, path in items:
        with h5py.File(path, "r") as f:
            if "seconds" in f.attrs:
                out[slide] = float(f.attrs["seconds"])
    return out


__all__ = [
    "SlideFeatures", "read_features", "check_feature_file", "list_features", "FeaturesCheck",
    "validate_features_dir", "extraction_seconds", "MARKER_ATTR", "MARKER", "HARNESS_ATTRS", "CHECKED_MTIME_ATTR",
    "ForeignFeaturesError", "harness_made", "describe_layout", "refuse_foreign", "features_folder",
    "ExternalFeatures", "external_features", "folder_tag",
]
