"""Reading feature files: ours, CLAM's and TRIDENT's, as they are.

All three keep one HDF5 file per slide with a `features` dataset (N, D) and a
`coords` dataset (N, 2) of level-0 top-left corners; they differ in where the
metadata lives:

- **cpath-bench** (`baselines.extract`): attrs on the file (encoder, weights_id,
  magnification, seconds, config_hash, ...), coords attrs as in the coords file.
- **TRIDENT**: attrs on the `features` and `coords` datasets (patch_size,
  level0_magnification, target_magnification, name, ...).
- **CLAM**: `h5_files/<slide>.h5` with no attrs on `features` (coords attrs
  patch_size/patch_level); `pt_files/` holds the same features without coords.

So a user with months of CLAM or TRIDENT features points the harness at the
folder and trains aggregators on them directly:

    >>> feats, coords, attrs = read_features("h5_files/slide_1.h5")   # doctest: +SKIP
    >>> found = list_features("clam_out/")                             # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from bench.common.errors import DataError, MissingFileError
from bench.common.files import is_partial


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
        raise DataError(f"{path}: {bad} of {feats.shape[0]} feature rows hold NaN or inf; extract them again")
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
    config_hash: str | None = None,
) -> str | None:
    """Why an existing feature file cannot be reused, or None when it can.

    Cheap: reads shapes, attrs and the last feature row (which is enough to catch a
    truncated file) but not the whole array.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        return "missing"
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f or "coords" not in f:
                return "no features/coords datasets"
            shape, cshape = f["features"].shape, f["coords"].shape
            if len(shape) != 2 or shape[0] != cshape[0] or shape[0] == 0:
                return f"bad shapes: features {shape}, coords {cshape}"
            last = np.asarray(f["features"][shape[0] - 1])
            stored_hash = f.attrs.get("config_hash")
    except (OSError, ValueError, KeyError) as exc:
        return f"damaged ({type(exc).__name__}: {exc})"
    if not np.isfinite(last).all():
        return "non-finite values"
    if n_patches is not None and shape[0] != n_patches:
        return f"{shape[0]} rows but the coords file has {n_patches} patches"
    if embed_dim is not None and shape[1] != embed_dim:
        return f"dimension {shape[1]} but the encoder gives {embed_dim}"
    if config_hash is not None:
        stored = stored_hash.decode() if isinstance(stored_hash, bytes) else stored_hash
        if stored != config_hash:
            return f"made with other settings or weights (config hash {stored} != {config_hash})"
    return None


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
) -> FeaturesCheck:
    """Check a features folder before training: every wanted slide present, one dimension, files readable.

    Files are checked cheaply (`check_feature_file`); a dimension that differs from
    `embed_dim` (or from the most common one) marks the file bad.
    """
    listed = list_features(folder)
    wanted = list(slide_ids) if slide_ids is not None else sorted(listed)
    check = FeaturesCheck(missing=[s for s in wanted if s not in listed])
    dims: dict[str, int] = {}
    for slide in wanted:
        if slide not in listed:
            continue
        reason = check_feature_file(listed[slide])
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
    "validate_features_dir", "extraction_seconds",
]
