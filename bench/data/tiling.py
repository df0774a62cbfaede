"""Tissue segmentation and patch grids: slide -> coords HDF5 (+ QC thumbnail).

The tissue mask is computed on a thumbnail: HSV saturation (stain is coloured,
glass and background are grey), median-filtered, thresholded with Otsu, cleaned
with a morphological closing and opening, components below a minimum area
dropped, and holes larger than a minimum area kept out of the tissue (lumens,
fat, tears) while pin-holes are filled. A regular grid at the target
magnification keeps every patch whose tissue fraction reaches a threshold.

The coords file follows the CLAM/TRIDENT convention so their tools read it:
dataset `coords` (N, 2) int64, level-0 top-left (x, y); attrs `patch_size`,
`patch_size_level0`, `target_magnification`, `level0_magnification`, plus `mpp`
(level 0), `mpp_source` (the reader's: openslide, tiff, objective-power,
override), `mpp_from` (override, vendor, tiff-tag, objective-power), `vendor`,
`objective_power` when recorded, `level`, `downsample` (of that level),
`target_downsample`, `read_size` and the tiling parameters. Implausible
resolutions are refused before tiling (`check_resolution`), and each tiling
folder gets `qc.csv`: per slide its mpp, where it came from, the level read and
the patch size in microns (the same for every slide, whatever its scanner). A `tissue` dataset (N,) holds each
patch's tissue fraction.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from bench import __version__
from bench.common.console import info, progress
from bench.common.errors import BenchError, ConfigError, DataError, MissingFileError, SlideError, WriteError
from bench.common.files import atomic_path, config_hash
from bench.data.slides import LevelChoice, Slide

COORDS_VERSION = 1


@dataclass(frozen=True)
class Tiling:
    """Magnification, patch size and network input size of one paradigm's patches."""

    magnification: float
    patch_size: int = 256
    input_size: int = 224
    scales: tuple[tuple[float, float], ...] = ()  # (magnification, ratio); E2E multi-scale sampling

    @property
    def magnifications(self) -> tuple[float, ...]:
        mags = [self.magnification] + [m for m, _ in self.scales]
        return tuple(dict.fromkeys(mags))


@dataclass(frozen=True)
class TissueParams:
    """Tissue segmentation settings (areas in level-0 square microns, so they mean the
    same thing on every scanner and thumbnail size)."""

    thumbnail_max_side: int = 1024
    median_size: int = 7
    min_saturation: int = 15  # Otsu threshold is never below this: a blank slide stays blank
    close_size: int = 5
    open_size: int = 3
    min_tissue_area_um2: float = 20_000.0
    min_hole_area_um2: float = 5_000.0

    def __post_init__(self) -> None:
        for name in ("thumbnail_max_side", "median_size", "close_size", "open_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"tissue parameter {name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.min_saturation <= 255:
            raise ConfigError(f"min_saturation must be within 0..255, got {self.min_saturation}")


@dataclass(frozen=True)
class TileParams:
    """Grid settings for one magnification."""

    magnification: float = 20.0
    patch_size: int = 256
    tissue_threshold: float = 0.25
    overlap: float = 0.0
    tissue: TissueParams = field(default_factory=TissueParams)

    def __post_init__(self) -> None:
        if not self.magnification > 0:
            raise ConfigError(f"magnification must be positive, got {self.magnification}")
        if not self.patch_size > 0:
            raise ConfigError(f"patch_size must be positive, got {self.patch_size}")
        if not 0.0 <= self.tissue_threshold <= 1.0:
            raise ConfigError(f"tissue_threshold must be within [0, 1], got {self.tissue_threshold}")
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"overlap must be within [0, 1), got {self.overlap}")

    def fingerprint(self) -> str:
        return config_hash({"coords_version": COORDS_VERSION, **asdict(self)})


@dataclass(frozen=True)
class TissueMask:
    mask: np.ndarray  # (h, w) bool at thumbnail scale
    downsample: float  # level-0 pixels per mask pixel
    threshold: float  # saturation threshold used

    @property
    def area_level0(self) -> float:
        """Tissue area in level-0 pixels."""
        return float(self.integral[-1, -1]) * self.downsample**2

    @functools.cached_property
    def integral(self) -> np.ndarray:
        """(h + 1, w + 1) summed-area table of the mask (computed once, shared by every grid)."""
        h, w = self.mask.shape
        dtype = np.int32 if h * w < 2**31 else np.int64
        table = np.zeros((h + 1, w + 1), dtype=dtype)
        np.cumsum(self.mask, axis=0, dtype=dtype, out=table[1:, 1:])
        np.cumsum(table[1:, 1:], axis=1, out=table[1:, 1:])
        return table


@dataclass(frozen=True)
class Coords:
    """A coords file in memory."""

    coords: np.ndarray  # (N, 2) int64, level-0 top-left
    patch_size: int
    patch_size_level0: int
    target_magnification: float
    level0_magnification: float
    mpp: float
    level: int
    downsample: float
    target_downsample: float
    read_size: int
    tissue: np.ndarray | None = None  # (N,) tissue fraction per patch
    attrs: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @property
    def level_choice(self) -> LevelChoice:
        return LevelChoice(
            level=self.level,
            level_downsample=self.downsample,
            target_downsample=self.target_downsample,
            patch_size=self.patch_size,
            read_size=self.read_size,
            patch_size_level0=self.patch_size_level0,
            target_mpp=self.mpp * self.target_downsample,
        )


# --- tissue -------------------------------------------------------------------------------


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values (maximises between-class variance)."""
    hist = np.bincount(values.ravel().astype(np.uint8), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * levels)
    mean_total = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean_total * w0 - total * m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1
    if between.max() <= 0:  # a single grey level: nothing to separate
        return float(np.flatnonzero(hist)[0])
    # every threshold inside an empty gap between the modes scores the same: take the middle
    # of that plateau, not its first value, so the cut sits away from both modes
    best = np.flatnonzero(between >= between.max() * (1 - 1e-12))
    run = best[: np.argmax(np.diff(np.append(best, best[-1] + 2)) > 1) + 1]
    return float((run[0] + run[-1]) // 2)


def tissue_mask(thumbnail: np.ndarray, downsample: float, mpp: float, params: TissueParams) -> TissueMask:
    """Tissue mask of an RGB thumbnail whose pixels are `downsample` level-0 pixels wide."""
    from scipy import ndimage

    sat = Image.fromarray(thumbnail).convert("HSV").getchannel("S")
    sat = np.asarray(sat.filter(ImageFilter.MedianFilter(params.median_size | 1)))  # PIL needs an odd size
    threshold = max(otsu_threshold(sat), float(params.min_saturation))
    mask = sat > threshold
    mask = binary_closing_square(mask, params.close_size)
    mask = binary_opening_square(mask, params.open_size)
    um2_per_px = (downsample * mpp) ** 2
    mask = _drop_small(mask, params.min_tissue_area_um2 / um2_per_px)
    # holes: background components (4-connected, as scipy's binary_fill_holes sees them) that
    # do not reach the border; the small ones are filled, the large ones stay out of the tissue
    background, n = ndimage.label(~mask)
    if n:
        sizes = np.bincount(background.ravel(), minlength=n + 1)
        fill = sizes < params.min_hole_area_um2 / um2_per_px
        fill[0] = False
        edge = np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])
        fill[edge] = False  # reaches the border: outside the tissue, not a hole
        mask = mask | fill[background]
    return TissueMask(mask=mask, downsample=downsample, threshold=threshold)


def binary_closing_square(mask: np.ndarray, size: int) -> np.ndarray:
    """`scipy.ndimage.binary_closing(mask, np.ones((size, size)), border_value=0)`, 20x faster.

    A square is separable, so dilation and erosion are runs of shifted ORs / ANDs along
    each axis (outside the image counts as background, as with border_value=0). Even
    sizes, whose off-centre origin scipy handles its own way, go through scipy.
    """
    from scipy import ndimage

    if size % 2 == 0:
        return ndimage.binary_closing(mask, structure=np.ones((size, size)), border_value=0)
    return _erode_square(_dilate_square(mask, size), size)


def binary_opening_square(mask: np.ndarray, size: int) -> np.ndarray:
    """`scipy.ndimage.binary_opening(mask, np.ones((size, size)))`, faster (see binary_closing_square)."""
    from scipy import ndimage

    if size % 2 == 0:
        return ndimage.binary_opening(mask, structure=np.ones((size, size)))
    return _dilate_square(_erode_square(mask, size), size)


def _dilate_square(mask: np.ndarray, size: int) -> np.ndarray:
    r = size // 2
    out = mask
    for axis in (0, 1):
        src, out = out, out.copy()
        a, b = np.moveaxis(out, axis, 0), np.moveaxis(src, axis, 0)
        for d in range(1, r + 1):
            a[d:] |= b[:-d]
            a[:-d] |= b[d:]
    return out


def _erode_square(mask: np.ndarray, size: int) -> np.ndarray:
    r = size // 2
    out = mask
    for axis in (0, 1):
        src, out = out, out.copy()
        a, b = np.moveaxis(out, axis, 0), np.moveaxis(src, axis, 0)
        for d in range(1, r + 1):
            a[d:] &= b[:-d]
            a[:-d] &= b[d:]
        a[:r] = False  # the window reaches outside the image, which is background
        a[a.shape[0] - r:] = False
    return out


def erode_cross(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """`scipy.ndimage.binary_erosion(mask, iterations=n)` (4-connected cross, outside = background)."""
    out = mask.copy()
    for _ in range(iterations):
        prev = out.copy()
        out[1:] &= prev[:-1]
        out[:-1] &= prev[1:]
        out[:, 1:] &= prev[:, :-1]
        out[:, :-1] &= prev[:, 1:]
        out[0] = out[-1] = False
        out[:, 0] = out[:, -1] = False
    return out


def _drop_small(mask: np.ndarray, min_px: float, keep_small: bool = False) -> np.ndarray:
    """Remove connected components smaller than `min_px` (or keep only them)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    small = sizes < min_px
    small[0] = False
    keep = small if keep_small else ~small
    keep[0] = False
    return keep[labels]


# --- grid ------------------------------------------------------------------------------------


def patch_grid(width: int, height: int, patch_size_level0: int, overlap: float = 0.0) -> np.ndarray:
    """Top-left corners (N, 2) of full patches inside a width x height slide."""
    step = max(1, int(round(patch_size_level0 * (1 - overlap))))
    xs = np.arange(0, width - patch_size_level0 + 1, step, dtype=np.int64)
    ys = np.arange(0, height - patch_size_level0 + 1, step, dtype=np.int64)
    if xs.size == 0 or ys.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    gx, gy = np.meshgrid(xs, ys)  # row-major: y outer, x inner
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def tissue_fractions(mask: TissueMask, coords: np.ndarray, patch_size_level0: int) -> np.ndarray:
    """Fraction of tissue pixels under each patch, from an integral image of the mask."""
    if len(coords) == 0:
        return np.zeros(0, dtype=np.float32)
    h, w = mask.mask.shape
    integral = mask.integral
    ds = mask.downsample
    x0 = np.clip(np.floor(coords[:, 0] / ds).astype(np.int64), 0, w)
    y0 = np.clip(np.floor(coords[:, 1] / ds).astype(np.int64), 0, h)
    x1 = np.clip(np.ceil((coords[:, 0] + patch_size_level0) / ds).astype(np.int64), 0, w)
    y1 = np.clip(np.ceil((coords[:, 1] + patch_size_level0) / ds).astype(np.int64), 0, h)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return (inside / area).astype(np.float32)


# --- files -----------------------------------------------------------------------------------


def write_coords(path: Path, coords: Coords) -> Path:
    """Write a coords HDF5 atomically."""
    import h5py

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            ds = f.create_dataset("coords", data=coords.coords.astype(np.int64))
            if coords.tissue is not None:
                f.create_dataset("tissue", data=coords.tissue.astype(np.float32))
            attrs = {
                "patch_size": coords.patch_size,
                "patch_size_level0": coords.patch_size_level0,
                "target_magnification": coords.target_magnification,
                "level0_magnification": coords.level0_magnification,
                "mpp": coords.mpp,
                "level": coords.level,
                "downsample": coords.downsample,
                "target_downsample": coords.target_downsample,
                "read_size": coords.read_size,
                **coords.attrs,
            }
            for key, value in attrs.items():
                ds.attrs[key] = value
                f.attrs[key] = value  # TRIDENT reads file attrs, CLAM dataset attrs
    return path


def read_coords(path: str | Path) -> Coords:
    """Read and check a coords HDF5 (ours, CLAM's or TRIDENT's)."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"coords file {path} does not exist; run `bench tile` for this slide first")
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise DataError(f"{path} has no 'coords' dataset; it is not a coords file")
            ds = f["coords"]
            arr = np.asarray(ds[()], dtype=np.int64)
            attrs = {**{k: _py(v) for k, v in f.attrs.items()}, **{k: _py(v) for k, v in ds.attrs.items()}}
            tissue = np.asarray(f["tissue"][()], dtype=np.float32) if "tissue" in f else None
    except OSError as exc:
        raise DataError(f"cannot read coords file {path} ({exc}); delete it and rerun `bench tile`") from None
    if arr.ndim != 2 or (arr.size and arr.shape[1] != 2):
        raise DataError(f"{path}: coords must have shape (N, 2), got {arr.shape}")
    arr = arr.reshape(-1, 2)
    missing = [k for k in ("patch_size", "patch_size_level0") if k not in attrs]
    if missing:
        raise DataError(f"{path}: coords attrs lack {missing}; re-tile the slide with `bench tile`")
    ps = int(attrs["patch_size"])
    ps0 = int(attrs["patch_size_level0"])
    target_ds = float(attrs.get("target_downsample", ps0 / ps))
    level0_mag = float(attrs.get("level0_magnification", 0) or 0)
    mpp = float(attrs.get("mpp", 10.0 / level0_mag if level0_mag else 0) or 0)
    known = {"patch_size", "patch_size_level0", "target_magnification", "level0_magnification", "mpp", "level",
             "downsample", "target_downsample", "read_size"}
    return Coords(
        coords=arr,
        patch_size=ps,
        patch_size_level0=ps0,
        target_magnification=float(attrs.get("target_magnification", 0) or 0),
        level0_magnification=level0_mag,
        mpp=mpp,
        level=int(attrs.get("level", attrs.get("patch_level", 0))),
        downsample=float(attrs.get("downsample", 1.0)) if np.ndim(attrs.get("downsample", 1.0)) == 0 else 1.0,
        target_downsample=target_ds,
        read_size=int(attrs.get("read_size", ps0 if int(attrs.get("level", attrs.get("patch_level", 0))) == 0 else ps)),
        tissue=tissue,
        attrs={k: v for k, v in attrs.items() if k not in known},
    )


def _py(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


# --- one slide ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileResult:
    slide_id: str
    coords_path: Path
    qc_path: Path | None
    n_patches: int
    tissue_area_mm2: float
    seconds: float
    skipped: bool  # True when an up-to-date file already existed


def tile_slide(
    slide_path: str | Path,
    out_dir: str | Path,
    params: TileParams = TileParams(),
    *,
    slide_id: str | None = None,
    mpp: float | None = None,
    qc: bool = True,
    force: bool = False,
) -> TileResult:
    """Segment tissue and write `<out_dir>/<slide_id>.h5` (+ `qc/<slide_id>.png`).

    An existing coords file made with the same parameters is kept as is (resume).

    Raises:
        SlideError: the slide cannot be opened or read, or has no resolution.
        DataError: no tissue patch passes the threshold.
    """
    (outcome,) = tile_slide_multi(slide_path, [(params, out_dir)], slide_id=slide_id, mpp=mpp, qc=qc, force=force)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def tile_slide_multi(
    slide_path: str | Path,
    targets: Sequence[tuple[TileParams, str | Path]],
    *,
    slide_id: str | None = None,
    mpp: float | None = None,
    qc: bool = True,
    force: bool = False,
) -> list[TileResult | BenchError]:
    """Tile one slide at several settings (e.g. 20x and 10x), each into its own folder.

    The slide is opened, thumbnailed and segmented once for all targets that share
    tissue settings (the mask does not depend on the magnification), which makes
    multi-scale tiling nearly as cheap as one scale. Returns, per target, its
    TileResult or the DataError/ConfigError that refused it (e.g. no tissue patch at a
    coarse scale), so one target's failure does not cost the others.

    Raises:
        SlideError / MissingFileError: the slide cannot be opened or read (all targets fail).
    """
    slide_path = Path(slide_path)
    slide_id = slide_id or slide_path.stem
    outcomes: list[TileResult | BenchError | None] = []
    for params, out_dir in targets:
        outcomes.append(None if force else _up_to_date(Path(out_dir), slide_id, params, qc, slide_path, mpp))
    pending = [i for i, o in enumerate(outcomes) if o is None]
    if pending:
        with Slide(slide_path, mpp=mpp) as slide:
            check_resolution(slide, slide_id)
            segmented: dict[TissueParams, tuple[np.ndarray, float, TissueMask]] = {}
            for i in pending:
                params, out_dir = targets[i]
                start = time.perf_counter()
                try:
                    choice = slide.level_for(magnification=params.magnification, patch_size=params.patch_size)
                    if params.tissue not in segmented:  # its time counts in the first target's seconds
                        thumb, thumb_ds = slide.thumbnail(params.tissue.thumbnail_max_side)
                        segmented[params.tissue] = (thumb, thumb_ds, tissue_mask(thumb, thumb_ds, slide.mpp, params.tissue))
                    outcomes[i] = _tile_with_mask(slide, slide_id, Path(out_dir), params, choice,
                                                  *segmented[params.tissue], qc=qc, start=start)
                except (DataError, ConfigError) as exc:
                    outcomes[i] = exc
    return outcomes  # type: ignore[return-value]


MPP_RANGE = (0.05, 10.0)  # plausible level-0 um/px: 0.05 (beyond any scanner) to 10 (a 1x overview)
SCREEN_DPI = (72.0, 96.0, 300.0)  # TIFF resolutions that image software writes by default, not a scanner's


def check_resolution(slide: Slide, slide_id: str) -> None:
    """Refuse a resolution that cannot be the scanner's, naming the `mpp` override that fixes it.

    A TIFF resolution tag in inches at 72, 96 or 300 dpi with no vendor mpp is a
    software default (72 dpi would read as 352.8 um/px), and any mpp outside
    `MPP_RANGE` is implausible; both are DataErrors (a skipped slide in a batch).
    """
    fix = ("give its level-0 microns per pixel with an `mpp` column in the cohort's labels.csv or an "
           "`mpp = ...` key for the dataset in the suite (0.25 for a 40x scan, 0.5 for 20x)")
    props = slide.properties
    if slide.mpp_source != "override" and props.get("tiff.ResolutionUnit", "").lower() == "inch":
        try:
            dpi = float(props.get("tiff.XResolution", "nan"))
        except ValueError:
            dpi = math.nan
        # OpenSlide's generic-tiff reader turns the tag into openslide.mpp-x: same number, no vendor's mpp
        from_tag = math.isclose(slide.mpp, 25400.0 / dpi, rel_tol=1e-3) if dpi > 0 else False
        if from_tag and any(math.isclose(dpi, d, rel_tol=1e-3) for d in SCREEN_DPI):
            raise DataError(f"slide {slide_id} records no scanner resolution: its only one is a TIFF tag of "
                            f"{dpi:g} dpi ({slide.mpp:.4g} um/px), a default of image software, not a "
                            f"microscope's; {fix}")
    low, high = MPP_RANGE
    if not (low <= slide.mpp <= high):
        source = "the `mpp` override" if slide.mpp_source == "override" else f"its {slide.mpp_source} properties"
        raise DataError(f"slide {slide_id}: {source} give {slide.mpp:.4g} um/px at level 0, outside the plausible "
                        f"{low:g}-{high:g} um/px; " + ("fix the override" if slide.mpp_source == "override" else fix))


def _up_to_date(out_dir: Path, slide_id: str, params: TileParams, qc: bool, slide_path: Path,
                mpp: float | None) -> TileResult | None:
    """The TileResult of an existing coords file made from this slide with these settings, else None.

    Besides the parameters, the file must come from a slide file of the same size and the
    same resolution source: changing a cohort's `mpp` override (or the slide) re-tiles.
    """
    coords_path = out_dir / f"{slide_id}.h5"
    qc_path = out_dir / "qc" / f"{slide_id}.png"
    if not coords_path.exists():
        return None
    try:
        existing = read_coords(coords_path)
    except BenchError:
        return None  # damaged: redo
    attrs = existing.attrs
    if attrs.get("params_hash") != params.fingerprint() or (qc and not qc_path.exists()):
        return None
    if (attrs.get("mpp_source") == "override") != (mpp is not None) or (
            mpp is not None and not math.isclose(existing.mpp, mpp, rel_tol=1e-9)):
        return None
    try:
        if "slide_bytes" in attrs and int(attrs["slide_bytes"]) != slide_path.stat().st_size:
            return None
    except OSError:
        return None  # the slide is gone: let opening it report why
    area = float(attrs.get("tissue_area_mm2", float("nan")))
    return TileResult(slide_id, coords_path, qc_path if qc else None, len(existing), area, 0.0, True)


def _tile_with_mask(slide: Slide, slide_id: str, out_dir: Path, params: TileParams, choice: LevelChoice,
                    thumb: np.ndarray, thumb_ds: float, mask: TissueMask, *, qc: bool, start: float) -> TileResult:
    """Grid, tissue fractions, QC thumbnail and coords file of one slide at one setting."""
    coords_path = out_dir / f"{slide_id}.h5"
    qc_path = out_dir / "qc" / f"{slide_id}.png"
    width, height = slide.dimensions
    if min(width, height) < choice.patch_size_level0:
        raise DataError(
            f"slide {slide_id} is smaller than one patch: {width} x {height} px at level 0, but a "
            f"{params.patch_size}px patch at {params.magnification:g}x spans {choice.patch_size_level0} px there. "
            "Choose a smaller patch_size or a lower magnification, or leave the slide out.")
    grid = patch_grid(*slide.dimensions, choice.patch_size_level0, params.overlap)
    fractions = tissue_fractions(mask, grid, choice.patch_size_level0)
    keep = fractions >= max(params.tissue_threshold, 1e-9)
    coords_arr, kept_fractions = grid[keep], fractions[keep]
    tissue_mm2 = mask.area_level0 * (slide.mpp / 1000.0) ** 2
    if len(coords_arr) == 0:
        raise DataError(
            f"slide {slide_id} has no tissue patch at {params.magnification:g}x/{params.patch_size}px "
            f"(tissue area {tissue_mm2:.3g} mm2, threshold {params.tissue_threshold}). Check the slide, "
            "or lower tissue_threshold / min_saturation if its stain is very faint."
        )
    coords = Coords(
        coords=coords_arr,
        patch_size=choice.patch_size,
        patch_size_level0=choice.patch_size_level0,
        target_magnification=float(params.magnification),
        level0_magnification=slide.magnification,
        mpp=slide.mpp,
        level=choice.level,
        downsample=choice.level_downsample,
        target_downsample=choice.target_downsample,
        read_size=choice.read_size,
        tissue=kept_fractions,
        attrs={
            "name": slide_id,
            "mpp_source": slide.mpp_source,
            "tissue_threshold": params.tissue_threshold,
            "overlap": params.overlap,
            "tissue_area_mm2": tissue_mm2,
            "params_hash": params.fingerprint(),
            "harness_version": __version__,
            "slide_bytes": int(slide.path.stat().st_size),
            "level_dimensions": np.asarray(slide.level_dimensions[choice.level], dtype=np.int64),
            "mpp_from": resolution_origin(slide),
            "vendor": str(slide.properties.get("openslide.vendor", "")),
            **({"objective_power": power} if math.isfinite(power := _objective_power(slide)) else {}),
        },
    )
    if qc:
        save_qc(qc_path, thumb, mask, coords_arr, choice.patch_size_level0, thumb_ds)
    write_coords(coords_path, coords)
    return TileResult(slide_id, coords_path, qc_path if qc else None, len(coords_arr), tissue_mm2,
                      time.perf_counter() - start, False)


def resolution_origin(slide: Slide) -> str:
    """Where a slide's mpp came from, in the user's terms: override, vendor (the scanner's own metadata),
    tiff-tag (only the TIFF resolution tags, which OpenSlide's generic-tiff reader also reports as
    openslide.mpp-x) or objective-power (10 / power, no mpp recorded)."""
    if slide.mpp_source == "override":
        return "override"
    if slide.mpp_source == "tiff" or (slide.mpp_source == "openslide"
                                      and slide.properties.get("openslide.vendor") == "generic-tiff"):
        return "tiff-tag"
    return "vendor" if slide.mpp_source == "openslide" else str(slide.mpp_source)


def _objective_power(slide: Slide) -> float:
    """The vendor's objective power (openslide.objective-power), NaN when the file records none."""
    try:
        value = float(slide.properties.get("openslide.objective-power", "nan"))
    except ValueError:
        return math.nan
    return value if math.isfinite(value) and value > 0 else math.nan


def save_qc(path: Path, thumb: np.ndarray, mask: TissueMask, coords: np.ndarray, ps0: int, thumb_ds: float) -> None:
    """QC thumbnail: tissue contour in green, kept patches outlined in blue.

    Encoded with zlib level 1 and one fixed PNG filter (imagecodecs): noisy thumbnails
    compress barely better with PIL's defaults (level 6, adaptive filters), which take
    six times as long, a quarter of a slide's tiling time.
    """
    import imagecodecs

    img = Image.fromarray(thumb).convert("RGB")
    draw = ImageDraw.Draw(img)
    side = ps0 / thumb_ds
    for x, y in coords:
        x0, y0 = x / thumb_ds, y / thumb_ds
        draw.rectangle([x0, y0, x0 + side - 1, y0 + side - 1], outline=(40, 90, 220))
    arr = np.array(img)
    edge = mask.mask & ~erode_cross(mask.mask, max(1, round(min(arr.shape[:2]) / 500)))
    if edge.shape == arr.shape[:2]:
        arr[edge] = (20, 200, 60)
    png_filter = getattr(getattr(imagecodecs.PNG, "FILTER", None), "PAETH", None)
    data = imagecodecs.png_encode(arr, level=1, **({"filter": png_filter} if png_filter is not None else {}))
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


# --- many slides ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SlideJob:
    slide_id: str
    path: Path
    mpp: float | None = None


@dataclass
class BatchReport:
    done: list[TileResult] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (slide_id, reason)

    @property
    def n_patches(self) -> int:
        return sum(r.n_patches for r in self.done)


def tile_slides(
    jobs: Sequence[SlideJob] | Iterable[SlideJob],
    out_dir: str | Path,
    params: TileParams = TileParams(),
    *,
    qc: bool = True,
    force: bool = False,
) -> BatchReport:
    """Tile many slides; a slide that fails is skipped, listed in `skipped.csv`, and the rest go on."""
    return tile_slides_multi(jobs, [(params, out_dir)], qc=qc, force=force)[0]


def tile_slides_multi(
    jobs: Sequence[SlideJob] | Iterable[SlideJob],
    targets: Sequence[tuple[TileParams, str | Path]],
    *,
    qc: bool = True,
    force: bool = False,
    workers: int = 1,
) -> list[BatchReport]:
    """Tile many slides at several settings at once; one BatchReport per target, in order.

    Same files as calling `tile_slides` once per target, but every slide is opened and
    segmented once (see `tile_slide_multi`): use it for multi-scale tilings. Each target
    folder gets its own `skipped.csv`.

    Args:
        workers: slides tiled at once in threads (each opens its own slide handle). OpenSlide,
            PIL and numpy release the GIL in the heavy parts, so 2 threads on 2 free cores
            tile about 1.5x faster; the files are the same.
    """
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"tiling workers must be a positive integer, got {workers!r}")
    targets = [(params, Path(out_dir)) for params, out_dir in targets]
    jobs = list(jobs)

    def one(job: SlideJob) -> list[TileResult | BenchError]:
        try:
            return tile_slide_multi(job.path, targets, slide_id=job.slide_id, mpp=job.mpp, qc=qc, force=force)
        except (SlideError, DataError, MissingFileError, ConfigError) as exc:
            return [exc] * len(targets)

    mags = "/".join(f"{p.magnification:g}x" for p, _ in targets)
    bar = progress(total=len(jobs), desc=f"tile {mags}", unit="slide")
    reports = [BatchReport() for _ in targets]
    try:
        if workers == 1 or len(jobs) < 2:
            results: Iterable[list[TileResult | BenchError]] = map(one, jobs)
            executor = None
        else:
            from concurrent.futures import ThreadPoolExecutor

            executor = ThreadPoolExecutor(min(workers, len(jobs)), thread_name_prefix="tile")
            results = executor.map(one, jobs)  # in job order
        for job, outcomes in zip(jobs, results):
            for report, outcome in zip(reports, outcomes):
                if isinstance(outcome, TileResult):
                    report.done.append(outcome)
                else:
                    report.skipped.append((job.slide_id, str(outcome)))
            bar.update(1)
    finally:
        bar.close()
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    for report, (_, out_dir) in zip(reports, targets):
        write_skip_report(out_dir / "skipped.csv", report.skipped)
        write_qc_table(out_dir / "qc.csv", report)
    return reports


QC_COLUMNS = ("slide_id", "status", "mpp", "mpp_from", "vendor", "mpp_source", "objective_power", "level0_magnification", "level",
              "level_downsample", "patch_size_level0", "patch_um", "n_patches", "tissue_mm2", "reason")


def qc_rows(report: BatchReport) -> list[dict[str, object]]:
    """One row per slide of a tiling: its resolution (mpp, where it came from, level read) or why it was skipped."""
    import h5py

    rows: list[dict[str, object]] = []
    for r in report.done:
        with h5py.File(r.coords_path, "r") as f:
            a = dict(f.attrs)
        mpp = float(a.get("mpp", math.nan))
        ps0 = int(a.get("patch_size_level0", 0))
        rows.append({"slide_id": r.slide_id, "status": "ok", "mpp": f"{mpp:.4g}",
                     "mpp_from": str(a.get("mpp_from", "")), "vendor": str(a.get("vendor", "")),
                     "mpp_source": str(a.get("mpp_source", "")),
                     "objective_power": "" if not math.isfinite(float(a.get("objective_power", math.nan)))
                     else f"{float(a['objective_power']):g}",
                     "level0_magnification": f"{float(a.get('level0_magnification', math.nan)):.3g}",
                     "level": int(a.get("level", 0)), "level_downsample": f"{float(a.get('downsample', 1)):.4g}",
                     "patch_size_level0": ps0, "patch_um": f"{ps0 * mpp:.1f}", "n_patches": r.n_patches,
                     "tissue_mm2": f"{r.tissue_area_mm2:.3g}", "reason": ""})
    rows += [{"slide_id": sid, "status": "skipped", "reason": why} for sid, why in report.skipped]
    return sorted(rows, key=lambda row: str(row["slide_id"]))


def write_qc_table(path: Path, report: BatchReport) -> None:
    """`qc.csv` of a tiling folder (QC_COLUMNS); says once on stderr when its slides mix resolutions.

    Every patch spans the same physical size (`patch_um`) whatever the slide's mpp: the level and
    read size follow each slide's resolution. Unchanged content is not rewritten.
    """
    rows = qc_rows(report)
    if not rows:
        path.unlink(missing_ok=True)
        return
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=QC_COLUMNS, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    text = buffer.getvalue()
    mpps = sorted({str(r["mpp"]) for r in rows if r["status"] == "ok"}, key=float)
    if len(mpps) > 1:
        sizes = sorted({str(r["patch_um"]) for r in rows if r["status"] == "ok"}, key=float)
        info(f"{path.parent}: slides at {len(mpps)} resolutions ({', '.join(mpps[:6])}{' ...' if len(mpps) > 6 else ''}"
             f" um/px); every patch spans {' / '.join(sizes[:3])} um (see {path.name})")
    try:
        same = path.read_text(encoding="utf-8") == text
    except (OSError, UnicodeDecodeError):
        same = False
    if not same:
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8", newline="")
    write_qc_overview(path.parent / "qc_overview.png", rows, path.parent / "qc")


OVERVIEW_PER_GROUP = 8  # thumbnails per resolution row of qc_overview.png
OVERVIEW_GROUPS = 6
_CELL = 160


def write_qc_overview(path: Path, rows: Sequence[dict[str, object]], qc_dir: Path) -> Path | None:
    """One page of QC thumbnails (tissue contour + patches), one row per resolution (mpp and where it came from).

    Each row shows up to OVERVIEW_PER_GROUP slides of that resolution and how many it has, so a
    cohort's scanners are visible at a glance; skipped slides are counted in the title. Nothing
    is written without QC thumbnails; an unchanged page is not rewritten.
    """
    groups: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if r["status"] == "ok":
            groups.setdefault((str(r["mpp"]), str(r["mpp_from"])), []).append(str(r["slide_id"]))
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), float(kv[0][0])))[:OVERVIEW_GROUPS]
    if not ordered or not any((qc_dir / f"{sid}.png").exists() for _, ids in ordered for sid in ids):
        return None
    label_w, title_h, cap_h = 170, 24, 14
    width = label_w + OVERVIEW_PER_GROUP * _CELL
    page = Image.new("RGB", (width, title_h + len(ordered) * (_CELL + cap_h)), "white")
    draw = ImageDraw.Draw(page)
    skipped = sum(r["status"] != "ok" for r in rows)
    more = len(groups) - len(ordered)
    draw.text((6, 6), f"{sum(len(v) for v in groups.values())} slides tiled at {len(groups)} resolution(s)"
              + (f" ({more} not shown)" if more else "") + (f"; {skipped} skipped (see qc.csv)" if skipped else ""),
              fill="black")
    for g, ((mpp, origin), ids) in enumerate(ordered):
        top = title_h + g * (_CELL + cap_h)
        draw.text((6, top + 4), f"{mpp} um/px\n{origin}\n{len(ids)} slide(s)", fill="black")
        for k, sid in enumerate(sorted(ids)[:OVERVIEW_PER_GROUP]):
            left = label_w + k * _CELL
            try:
                with Image.open(qc_dir / f"{sid}.png") as im:
                    thumb = im.convert("RGB")
                    thumb.thumbnail((_CELL - 6, _CELL - 6))
            except (OSError, ValueError):
                continue  # a slide without a QC thumbnail: its cell stays blank
            page.paste(thumb, (left + 3, top + 3))
            draw.text((left + 3, top + _CELL), sid[:24], fill="black")
    buffer = io.BytesIO()
    page.save(buffer, format="PNG", optimize=False)
    data = buffer.getvalue()
    try:
        if path.read_bytes() == data:
            return path
    except OSError:
        pass
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def write_skip_report(path: Path, skipped: Sequence[tuple[str, str]]) -> None:
    """Write (or remove, when nothing was skipped) a `slide_id,reason` report.

    A report that already says the same is left untouched, so a rerun over a cohort
    with a bad slide changes no file.
    """
    if not skipped:
        path.unlink(missing_ok=True)
        return
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["slide_id", "reason"])
    writer.writerows(skipped)
    text = buffer.getvalue()
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if f.read() == text:
                return
    except (OSError, UnicodeDecodeError):
        pass  # missing or unreadable: write it
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8", newline="")
    except WriteError:
        from bench.common.console import warn

        for slide_id, reason in skipped:  # the reasons are not lost with the file
            warn(f"skipped {slide_id}: {reason}")
        raise


def read_skip_report(path: str | Path) -> list[tuple[str, str]]:
    """(slide_id, reason) rows of a `skipped.csv` (empty when there is none)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [(row["slide_id"], row["reason"]) for row in csv.DictReader(f)]


def summarize(report: BatchReport, out_dir: Path) -> None:
    new = [r for r in report.done if not r.skipped]
    info(
        f"tiled {len(report.done)} slides into {out_dir} ({len(new)} new, {len(report.done) - len(new)} up to date), "
        f"{report.n_patches} patches"
        + (f"; skipped {len(report.skipped)} (see {out_dir / 'skipped.csv'})" if report.skipped else "")
    )
    for slide_id, reason in report.skipped:
        info(f"  skipped {slide_id}: {reason}")


__all__ = [
    "Coords", "TileParams", "TissueParams", "TissueMask", "TileResult", "SlideJob", "BatchReport",
    "otsu_threshold", "tissue_mask", "patch_grid", "tissue_fractions", "read_coords", "write_coords",
    "write_skip_report", "read_skip_report", "check_resolution", "qc_rows", "write_qc_table", "write_qc_overview",
    "MPP_RANGE",
    "tile_slide", "tile_slide_multi", "tile_slides", "tile_slides_multi", "save_qc", "binary_closing_square",
    "binary_opening_square", "erode_cross",
]
