"""Patch sources for end-to-end training: live OpenSlide reads, or a packed JPEG store.

Both answer the same three questions about the patches of a slide at a
magnification (the coords written by `bench tile`): how many, where, and what
pixels. Indices are rows of the coords file, so a sampler can draw indices
without knowing where the pixels come from:

    >>> source = open_source("live", cohort, {10.0: tiles_dir})       # doctest: +SKIP
    >>> source.n_patches("slide-0", 10.0)                              # doctest: +SKIP
    412
    >>> source.read("slide-0", 10.0, [3, 17]).shape                    # doctest: +SKIP
    (2, 256, 256, 3)

- `LiveSource` reads every patch through OpenSlide (`bench.data.slides`), exactly as
  feature extraction does. Handles are opened lazily, per process, and never
  pickled, so a DataLoader worker opens its own (OpenSlide handles must not
  cross a fork).
- `PackedSource` reads `patches/<dataset>/<mag>x-<px>px/<slide>.h5`, one HDF5
  per slide and magnification holding every patch as JPEG bytes (`pack_cohort`,
  `bench pack`): one contiguous byte range and a JPEG decode per patch, instead
  of a pyramid lookup, several tile decodes and a resize. The ABMILX paper keeps
  its patches in LMDB for the same reason (appendix B.2); we keep the project's
  one-HDF5-per-slide layout (DESIGN.md) instead of one database per dataset.

Store layout (version 1): `jpeg` (total bytes,) uint8, all patches back to back;
`offsets` (N + 1,) int64, patch i is `jpeg[offsets[i]:offsets[i + 1]]`; `crc32`
(N,) uint32 of each patch's bytes, checked on every read so a damaged entry is a
clear error instead of silently wrong pixels; `coords` (N, 2) int64 with the
coords file's attrs. File attrs say what was packed (slide, magnification, patch
size, JPEG quality, chroma subsampling 4:4:4) and `config_hash` ties the store
to its coords, so a re-tiled slide is re-packed.

Errors: a slide or store entry that cannot be read raises `SlideError(message,
slide=slide_id)` (the trainer skips that slide for the step and counts it); a
missing coords file or store is a `MissingFileError`; bad indices a `DataError`.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import time
import zlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from bench.common.errors import BenchError, ConfigError, DataError, MissingFileError, SlideError

if TYPE_CHECKING:
    from bench.data.cohort import Cohort
    from bench.data.tiling import Coords

SOURCE_KINDS = ("live", "packed")
# "tiles" names the live source too (reads the slide at the tiles' coords); accepted so configs
# written before the packed store existed keep working.
_KIND_ALIASES = {"tiles": "live"}
STORE_FORMAT = "cpath-bench-patches"
STORE_VERSION = 1
SUBSAMPLING = "4:4:4"  # no chroma subsampling: at quality 95, mean abs error ~1 grey level
_MAX_OPEN = 32  # open slide/store handles kept per process (LRU); cohorts can hold thousands of slides


@runtime_checkable
class PatchSource(Protocol):
    """What the E2E and GMA trainers read patches through (indices are rows of the coords)."""

    def n_patches(self, slide_id: str, magnification: float) -> int: ...

    def coords(self, slide_id: str, magnification: float) -> np.ndarray: ...  # (N, 2) level-0 top-left

    def read(self, slide_id: str, magnification: float, indices: Sequence[int]) -> np.ndarray: ...  # (n, P, P, 3)

    def close(self) -> None: ...


def magnification_dir(dirs: Mapping[float, Path], magnification: float, what: str, fix: str,
                      error: type[BenchError] = ConfigError) -> Path:
    """The folder of `dirs` for `magnification` (float keys compared with a tolerance)."""
    for m, d in dirs.items():
        if math.isclose(float(m), float(magnification), rel_tol=1e-6):
            return Path(d)
    have = ", ".join(f"{float(m):g}x" for m in dirs) or "none"
    raise error(f"no {what} for {float(magnification):g}x (have {have}); {fix}")


def coords_dir(tiles_dirs: Mapping[float, Path], magnification: float) -> Path:
    """The coords folder a trainer reads at `magnification`; a scale nobody tiled is a missing file."""
    return magnification_dir(tiles_dirs, magnification, "coords folder",
                             f"run `bench tile --magnification {float(magnification):g}`", MissingFileError)


def _check_indices(indices: Sequence[int], n: int, slide_id: str, magnification: float) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        bad = int(idx[(idx < 0) | (idx >= n)][0])
        raise DataError(f"patch index {bad} is out of range for slide {slide_id!r} at {magnification:g}x, "
                        f"which has {n} patches (valid: 0..{n - 1})")
    return idx


class _Handles:
    """Per-process LRU of open handles; emptied (not pickled) when the object crosses a process."""

    def __init__(self, max_open: int = _MAX_OPEN) -> None:
        self.max_open = max_open
        self.pid = os.getpid()
        self.items: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any, opener: Any) -> Any:
        if self.pid != os.getpid():  # forked without pickling (fork start method): never reuse the parent's
            self.items = OrderedDict()
            self.pid = os.getpid()
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        handle = opener()
        self.items[key] = handle
        while len(self.items) > self.max_open:
            _, old = self.items.popitem(last=False)
            old.close()
        return handle

    def drop(self, key: Any) -> None:
        handle = self.items.pop(key, None)
        if handle is not None:
            handle.close()

    def close(self) -> None:
        if self.pid == os.getpid():
            for handle in self.items.values():
                handle.close()
        self.items = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {"max_open": self.max_open}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["max_open"])  # type: ignore[misc]


# ------------------------------------------------------------------------------ live reads


class LiveSource:
    """Patches read from the slide files through OpenSlide at the coords of `bench tile`.

    Args:
        cohort: the cohort (slide paths and mpp overrides).
        tiles_dirs: magnification -> coords folder (`Layout.tiles_dir(dataset, mag, patch_size)`).
    """

    def __init__(self, cohort: Cohort, tiles_dirs: Mapping[float, Path]) -> None:
        self.cohort = cohort
        self.tiles_dirs = {float(m): Path(d) for m, d in tiles_dirs.items()}
        self._coords: dict[tuple[str, float], Coords] = {}
        self._slides = _Handles()

    def _coords_of(self, slide_id: str, magnification: float) -> Coords:
        key = (slide_id, float(magnification))
        if key not in self._coords:
            from bench.data.tiling import read_coords

            folder = magnification_dir(self.tiles_dirs, magnification, "coords folder",
                             f"run `bench tile --magnification {float(magnification):g}`")
            self._coords[key] = read_coords(folder / f"{slide_id}.h5")
        return self._coords[key]

    def n_patches(self, slide_id: str, magnification: float) -> int:
        return len(self._coords_of(slide_id, magnification))

    def coords(self, slide_id: str, magnification: float) -> np.ndarray:
        return self._coords_of(slide_id, magnification).coords

    def patch_size_level0(self, slide_id: str, magnification: float) -> int:
        return int(self._coords_of(slide_id, magnification).patch_size_level0)

    def read(self, slide_id: str, magnification: float, indices: Sequence[int]) -> np.ndarray:
        """(n, P, P, 3) uint8 patches at rows `indices` of the slide's coords."""
        from bench.data.slides import open_slide

        coords = self._coords_of(slide_id, magnification)
        idx = _check_indices(indices, len(coords), slide_id, magnification)
        choice = coords.level_choice
        side = choice.patch_size
        out = np.empty((len(idx), side, side, 3), dtype=np.uint8)  # (n, P, P, 3)
        mpp = self.cohort.slide_mpp(slide_id) or coords.mpp or None
        try:
            slide = self._slides.get(slide_id, lambda: open_slide(self.cohort.slide_path(slide_id), mpp=mpp))
            for i, (x, y) in enumerate(coords.coords[idx]):
                slide.read_patch(int(x), int(y), choice, out=out[i])  # straight into the batch
        except (SlideError, MissingFileError) as exc:
            self._slides.drop(slide_id)  # a replaced or repaired file is reopened next time
            raise SlideError(str(exc), slide=slide_id) from None
        return out

    def close(self) -> None:
        self._slides.close()


# ------------------------------------------------------------------------------ the packed store


class _Store:
    """One open store file: the h5py handle and its offsets (read once)."""

    def __init__(self, path: Path, slide_id: str) -> None:
        import h5py

        self.path = path
        try:
            self.file = h5py.File(path, "r")
            self.offsets = np.asarray(self.file["offsets"][()], dtype=np.int64)  # (N + 1,)
            self.crc = np.asarray(self.file["crc32"][()], dtype=np.uint32)  # (N,)
            self.coords = np.asarray(self.file["coords"][()], dtype=np.int64).reshape(-1, 2)  # (N, 2)
            self.attrs = {k: _py(v) for k, v in self.file.attrs.items()}
            self.jpeg = self.file["jpeg"]
        except (OSError, KeyError, ValueError) as exc:
            self.close()
            raise SlideError(f"patch store {path} of slide {slide_id!r} cannot be read ({type(exc).__name__}: {exc}); "
                             "delete it and run `bench pack` again", slide=slide_id) from None
        n = len(self.crc)
        if self.offsets.shape != (n + 1,) or len(self.coords) != n or self.attrs.get("format") != STORE_FORMAT \
                or (n and (self.offsets[0] != 0 or np.any(np.diff(self.offsets) <= 0)
                           or self.offsets[-1] != self.jpeg.shape[0])):
            self.close()
            raise SlideError(f"patch store {path} of slide {slide_id!r} is inconsistent (offsets, crc32 and coords "
                             "disagree); delete it and run `bench pack` again", slide=slide_id)

    def close(self) -> None:
        f = getattr(self, "file", None)
        if f is not None:
            f.close()
            self.file = None


class PackedSource:
    """Patches decoded from the packed JPEG store (`pack_cohort`, `bench pack`).

    Args:
        packed_dirs: magnification -> store folder (`Layout.patches_dir(dataset, mag, patch_size)`).
    """

    def __init__(self, packed_dirs: Mapping[float, Path]) -> None:
        self.packed_dirs = {float(m): Path(d) for m, d in packed_dirs.items()}
        self._stores = _Handles()

    def store_path(self, slide_id: str, magnification: float) -> Path:
        folder = magnification_dir(self.packed_dirs, magnification, "packed patch store",
                         f"run `bench pack --magnification {float(magnification):g}`")
        return folder / f"{slide_id}.h5"

    def _store(self, slide_id: str, magnification: float) -> _Store:
        path = self.store_path(slide_id, magnification)

        def opener() -> _Store:
            if not path.exists():
                raise MissingFileError(f"no packed patches for slide {slide_id!r} at {float(magnification):g}x "
                                       f"({path}); run `bench pack` first, or use the live source")
            return _Store(path, slide_id)

        return self._stores.get((slide_id, float(magnification)), opener)

    def n_patches(self, slide_id: str, magnification: float) -> int:
        return len(self._store(slide_id, magnification).crc)

    def coords(self, slide_id: str, magnification: float) -> np.ndarray:
        return self._store(slide_id, magnification).coords

    def patch_size_level0(self, slide_id: str, magnification: float) -> int:
        return int(self._store(slide_id, magnification).attrs["patch_size_level0"])

    def read(self, slide_id: str, magnification: float, indices: Sequence[int]) -> np.ndarray:
        """(n, P, P, 3) uint8 patches at rows `indices`, decoded from JPEG (checksums verified)."""
        from PIL import Image

        store = self._store(slide_id, magnification)
        idx = _check_indices(indices, len(store.crc), slide_id, magnification)
        side = int(store.attrs["patch_size"])
        out = np.empty((len(idx), side, side, 3), dtype=np.uint8)  # (n, P, P, 3)
        for i, j in enumerate(idx):
            start, end = int(store.offsets[j]), int(store.offsets[j + 1])
            try:
                blob = store.jpeg[start:end].tobytes()
            except (OSError, ValueError) as exc:
                self._stores.drop((slide_id, float(magnification)))
                raise SlideError(f"patch {j} of slide {slide_id!r} cannot be read from {store.path} ({exc}); "
                                 "delete the store and run `bench pack` again", slide=slide_id) from None
            if zlib.crc32(blob) != int(store.crc[j]):
                raise SlideError(f"patch {j} of slide {slide_id!r} in {store.path} is corrupted (checksum mismatch); "
                                 "delete the store and run `bench pack` again", slide=slide_id)
            try:
                with Image.open(io.BytesIO(blob)) as img:
                    out[i] = np.asarray(img.convert("RGB"))
            except (OSError, ValueError, SyntaxError) as exc:
                raise SlideError(f"patch {j} of slide {slide_id!r} in {store.path} is not a {side}x{side} RGB JPEG "
                                 f"({exc}); delete the store and run `bench pack` again", slide=slide_id) from None
        return out

    def close(self) -> None:
        self._stores.close()


def packed_dirs_for(tiles_dirs: Mapping[float, Path]) -> dict[float, Path]:
    """The store folders next to coords folders of a work folder (`Layout`):
    `<work>/tiles/<dataset>/<tag>` -> `<work>/patches/<dataset>/<tag>`.

    Raises:
        ConfigError: a coords folder is not laid out as `Layout.tiles_dir` makes it.
    """
    out = {}
    for mag, d in tiles_dirs.items():
        d = Path(d)
        if len(d.parts) < 3 or d.parents[1].name != "tiles":
            raise ConfigError(f"cannot tell where the packed patches of {d} live (it is not a <workdir>/tiles/"
                              "<dataset>/<tag> folder); pass packed_dirs explicitly")
        out[float(mag)] = d.parents[2] / "patches" / d.parent.name / d.name
    return out


def open_source(kind: str, cohort: Cohort, tiles_dirs: Mapping[float, Path],
                packed_dirs: Mapping[float, Path] | None = None) -> PatchSource:
    """A patch source of `kind` "live" (OpenSlide) or "packed" (JPEG store).

    A packed source without `packed_dirs` looks next to the coords folders (`packed_dirs_for`).
    """
    key = _KIND_ALIASES.get(kind, kind)
    if key == "live":
        return LiveSource(cohort, tiles_dirs)
    if key == "packed":
        return PackedSource(packed_dirs if packed_dirs is not None else packed_dirs_for(tiles_dirs))
    raise ConfigError(f"unknown patch source {kind!r}; choose one of {', '.join(SOURCE_KINDS)}")


# ------------------------------------------------------------------------------ packing


@dataclass(frozen=True)
class PackResult:
    slide_id: str
    path: Path
    n_patches: int
    n_bytes: int
    seconds: float
    reused: bool  # True when an up-to-date store already existed


@dataclass
class PackReport:
    """What `pack_cohort` did: stores written or reused, slides skipped with the reason."""

    out_dir: Path
    done: list[PackResult] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def n_patches(self) -> int:
        return sum(r.n_patches for r in self.done)

    @property
    def n_new(self) -> int:
        return sum(not r.reused for r in self.done)


def _py(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def store_config(coords: Coords, quality: int) -> dict[str, Any]:
    """What a store's bytes depend on: its coords (digest), resolution, size and JPEG settings."""
    digest = hashlib.sha256(np.ascontiguousarray(coords.coords, dtype=np.int64).tobytes()).hexdigest()[:16]
    return {"format": STORE_FORMAT, "version": STORE_VERSION, "coords": digest, "n": len(coords),
            "patch_size": coords.patch_size, "patch_size_level0": coords.patch_size_level0, "level": coords.level,
            "read_size": coords.read_size, "quality": int(quality), "subsampling": SUBSAMPLING}


def store_is_current(path: Path, expect_hash: str) -> bool:
    """True when `path` is a complete store written for `expect_hash` (cheap: attrs and sizes only)."""
    import h5py

    if not path.exists():
        return False
    try:
        with h5py.File(path, "r") as f:
            n = int(f.attrs.get("n_patches", -1))
            return (_py(f.attrs.get("config_hash")) == expect_hash and f["crc32"].shape == (n,)
                    and f["offsets"].shape == (n + 1,) and int(f["offsets"][n]) == f["jpeg"].shape[0])
    except (OSError, KeyError, ValueError, TypeError):
        return False


def encode_jpeg(patch: np.ndarray, quality: int) -> bytes:
    """One (P, P, 3) uint8 patch as JPEG bytes (4:4:4, no chroma subsampling)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(patch).save(buf, format="JPEG", quality=int(quality), subsampling=0)
    return buf.getvalue()


def pack_slide(source: LiveSource, slide_id: str, magnification: float, coords_path: Path, out_path: Path, *,
               quality: int = 95, force: bool = False, batch: int = 64, bar: Any = None) -> PackResult:
    """Pack one slide's patches into `out_path` (atomically; reused when up to date)."""
    import h5py

    from bench import __version__
    from bench.common.files import atomic_path, config_hash, file_lock
    from bench.data.tiling import read_coords

    coords = read_coords(coords_path)
    expect = config_hash(store_config(coords, quality))
    if not force and store_is_current(out_path, expect):
        if bar is not None:
            bar.update(len(coords))
        return PackResult(slide_id, out_path, len(coords), out_path.stat().st_size, 0.0, reused=True)
    with file_lock(out_path):
        _remove_partials(out_path)
        start = time.perf_counter()
        n = len(coords)
        blobs: list[bytes] = []
        for lo in range(0, n, batch):
            patches = source.read(slide_id, magnification, range(lo, min(n, lo + batch)))  # (b, P, P, 3)
            blobs.extend(encode_jpeg(p, quality) for p in patches)
            if bar is not None:
                bar.update(len(patches))
        offsets = np.zeros(n + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(b) for b in blobs], dtype=np.int64)
        data = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        crc = np.asarray([zlib.crc32(b) for b in blobs], dtype=np.uint32)
        seconds = time.perf_counter() - start
        with atomic_path(out_path) as tmp:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("jpeg", data=data)  # contiguous: a patch is one byte range, read without chunks
                f.create_dataset("offsets", data=offsets)
                f.create_dataset("crc32", data=crc)
                ds = f.create_dataset("coords", data=np.asarray(coords.coords, dtype=np.int64).reshape(-1, 2))
                for k, v in {"patch_size": coords.patch_size, "patch_size_level0": coords.patch_size_level0,
                             "target_magnification": coords.target_magnification, "mpp": coords.mpp,
                             "level": coords.level, "read_size": coords.read_size}.items():
                    ds.attrs[k] = v
                f.attrs.update({
                    "format": STORE_FORMAT, "version": STORE_VERSION, "slide_id": slide_id,
                    "magnification": float(magnification), "patch_size": coords.patch_size,
                    "patch_size_level0": coords.patch_size_level0, "n_patches": n, "quality": int(quality),
                    "subsampling": SUBSAMPLING, "config_hash": expect, "coords_file": str(coords_path),
                    "seconds": seconds, "harness_version": __version__,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                })
            if not store_is_current(tmp, expect):  # checked before it gets its final name
                raise DataError(f"the patch store written for slide {slide_id!r} does not read back; not kept")
    return PackResult(slide_id, out_path, n, out_path.stat().st_size, seconds, reused=False)


def _remove_partials(out_path: Path) -> None:
    from bench.common.files import is_partial

    for p in out_path.parent.glob(f".{out_path.name}*"):
        if is_partial(p):
            p.unlink(missing_ok=True)


def pack_cohort(cohort: Cohort, tiles_dir: Path, out_dir: Path, *, quality: int = 95,
                force: bool = False) -> PackReport:
    """Pack every tiled slide of `cohort` (coords in `tiles_dir`) into JPEG stores in `out_dir`.

    Resumable: an up-to-date store is kept (same coords, quality and format); a
    slide is written to a temporary name and renamed when complete, so a killed run
    leaves whole stores only and a rerun does the rest. A slide that cannot be read,
    has no coords, or is locked by another process is skipped, listed in
    `out_dir/skipped.csv`, and the others go on.
    """
    from bench.common.console import progress
    from bench.common.files import LockHeld
    from bench.data.tiling import read_coords, write_skip_report

    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ConfigError(f"JPEG quality must be an integer in 1..100, got {quality!r}")
    tiles_dir, out_dir = Path(tiles_dir), Path(out_dir)
    if not tiles_dir.is_dir():
        raise MissingFileError(f"coords folder {tiles_dir} does not exist; run `bench tile` first")
    report = PackReport(out_dir)
    jobs: list[tuple[str, Path, int]] = []
    mags: set[float] = set()
    for slide_id in cohort.slide_ids:
        path = tiles_dir / f"{slide_id}.h5"
        if not path.exists():
            report.skipped.append((slide_id, f"no coords file in {tiles_dir} (run `bench tile`)"))
            continue
        try:
            coords = read_coords(path)
        except BenchError as exc:
            report.skipped.append((slide_id, str(exc)))
            continue
        mags.add(round(float(coords.target_magnification), 6))
        jobs.append((slide_id, path, len(coords)))
    if len(mags) > 1:
        raise DataError(f"coords files in {tiles_dir} were tiled at several magnifications {sorted(mags)}; "
                        "one folder holds one tiling")
    magnification = next(iter(mags), 0.0) or 1.0
    source = LiveSource(cohort, {magnification: tiles_dir})
    bar = progress(total=sum(n for *_, n in jobs), desc=f"pack {tiles_dir.name}", unit="patch")
    try:
        for slide_id, path, _ in jobs:
            try:
                report.done.append(pack_slide(source, slide_id, magnification, path, out_dir / f"{slide_id}.h5",
                                              quality=quality, force=force, bar=bar))
            except (SlideError, DataError, LockHeld) as exc:
                report.skipped.append((slide_id, str(exc)))
    finally:
        bar.close()
        source.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_skip_report(out_dir / "skipped.csv", report.skipped)
    return report


__all__ = [
    "PatchSource", "LiveSource", "PackedSource", "PackReport", "PackResult", "SOURCE_KINDS", "open_source",
    "pack_cohort", "pack_slide", "packed_dirs_for", "magnification_dir", "coords_dir", "store_config", "store_is_current", "encode_jpeg",
]
