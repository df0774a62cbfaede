"""Whole-slide images through OpenSlide (or tiffslide): resolution, level choice, RGB patches.

Reader backends (`READERS`): "openslide" (the default) and "tiffslide" (pure Python
on tifffile + imagecodecs; `pip install 'cpath-bench[tiffslide]'`), chosen per call
(`open_slide(..., reader=)`) or for the process and its workers with the environment
variable `BENCH_SLIDE_READER` (`bench extract --reader`). Both give the same pixels on
the formats both read (tested, synthetic TIFFs and an Aperio SVS; outside the scanned
area tiffslide pads with black, which is turned into OpenSlide's transparent-on-white),
wherever a read starts on a whole pixel of its level: always at level 0, and at coarser
levels when x and y are multiples of the level's downsample. Between level pixels
OpenSlide interpolates and tiffslide does not (a shift of up to one level pixel, as
with a scanner's 4.0003x downsamples); tiffslide then warns once per slide.

Resolution (microns per pixel at level 0) is read, in this order, from
`openslide.mpp-x/y`, the TIFF resolution tags, or the objective power (using
the common convention 10x <-> 1.0 um/px, so 20x = 0.5 and 40x = 0.25). A slide
with none of them is refused unless the caller passes an override, which a
cohort gives through its `mpp` column and a suite through its `mpp` key.

Magnification and mpp are two views of the same number: `magnification = 10 / mpp`.

Example:
    >>> with open_slide("slide.tif") as s:                       # doctest: +SKIP
    ...     choice = s.level_for(magnification=20, patch_size=256)
    ...     patch = s.read_patch(0, 0, choice)                   # (256, 256, 3) uint8
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
from PIL import Image

from bench.common.errors import ConfigError, MissingFileError, SlideError

MPP_PER_MAGNIFICATION = 10.0  # mpp = 10 / magnification (20x = 0.5 um/px)
# Levels whose downsample is within this relative tolerance of the target are
# used as is: scanners store 4.000x as 4.0003x, and resizing by 0.01% is noise.
_LEVEL_TOLERANCE = 0.01

READERS = ("openslide", "tiffslide")
READER_ENV = "BENCH_SLIDE_READER"
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm")


def magnification_to_mpp(magnification: float) -> float:
    if magnification <= 0:
        raise ConfigError(f"magnification must be positive, got {magnification}")
    return MPP_PER_MAGNIFICATION / magnification


def mpp_to_magnification(mpp: float) -> float:
    if mpp <= 0:
        raise ConfigError(f"mpp must be positive, got {mpp}")
    return MPP_PER_MAGNIFICATION / mpp


@dataclass(frozen=True)
class LevelChoice:
    """How to read patches of `patch_size` px at a target resolution.

    Attributes:
        level: pyramid level to read from (the coarsest one at least as fine as the target).
        level_downsample: downsample of that level relative to level 0.
        target_downsample: downsample of the target resolution relative to level 0.
        patch_size: output patch side in pixels.
        read_size: patch side to read at `level` before resizing to `patch_size`.
        patch_size_level0: the patch's side in level-0 pixels (grid step of the tiling).
        target_mpp: resolution of the output patches.
    """

    level: int
    level_downsample: float
    target_downsample: float
    patch_size: int
    read_size: int
    patch_size_level0: int
    target_mpp: float

    @property
    def target_magnification(self) -> float:
        return mpp_to_magnification(self.target_mpp)

    @property
    def needs_resize(self) -> bool:
        return self.read_size != self.patch_size


class Slide:
    """An open whole-slide image. Use as a context manager or call `close()`.

    Args:
        path: slide file in any format OpenSlide reads.
        mpp: level-0 microns per pixel, overriding what the file says (use when the
            file has no resolution, or a wrong one).
        reader: "openslide" or "tiffslide"; None: `default_reader()`.
    """

    def __init__(self, path: str | os.PathLike[str], mpp: float | None = None, reader: str | None = None) -> None:
        self.reader = check_reader(reader) if reader is not None else default_reader()
        self._warned_subpixel = False
        errors = _reader_errors(self.reader)  # imported here: nothing heavy at import time
        self.path = Path(path)
        self.name = self.path.stem
        if not self.path.exists():
            raise MissingFileError(f"slide {self.path} does not exist")
        try:
            self._osr = _open_handle(self.reader, self.path)
        except errors as exc:
            raise SlideError(
                f"cannot open slide {self.path}: {type(exc).__name__}: {exc}. "
                "Check that it is a complete whole-slide image in a format OpenSlide reads "
                "(re-copy it if the transfer was cut short).",
                slide=self.name,
            ) from None
        self.dimensions: tuple[int, int] = self._osr.dimensions
        self.level_count: int = self._osr.level_count
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(self._osr.level_dimensions)
        self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in self._osr.level_downsamples)
        self.properties: dict[str, str] = _openslide_keys(dict(self._osr.properties))
        if mpp is not None and not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
            self.close()
            raise ConfigError(f"mpp override for slide {self.name} must be a positive number, got {mpp!r}")
        self.mpp, self.mpp_source = (float(mpp), "override") if mpp is not None else self._read_mpp()

    # --- resolution -------------------------------------------------------------------
    def _read_mpp(self) -> tuple[float, str]:
        found = mpp_from_properties(self.properties)
        if found is None:
            self.close()
            raise SlideError(
                f"slide {self.path} records no resolution (no openslide.mpp-x, TIFF resolution or objective power). "
                "Give its level-0 microns per pixel with an `mpp` column in the cohort's labels.csv, "
                "or an `mpp = ...` key for the dataset in the suite file.",
                slide=self.name,
            )
        return found

    @property
    def magnification(self) -> float:
        """Level-0 magnification implied by the mpp (10 / mpp)."""
        return mpp_to_magnification(self.mpp)

    def level_for(
        self, *, magnification: float | None = None, mpp: float | None = None, patch_size: int = 256
    ) -> LevelChoice:
        """Choose the pyramid level and read size for patches at a target resolution.

        The level is the coarsest one whose downsample does not exceed the target
        downsample (reading finer and shrinking keeps detail; reading coarser and
        enlarging would invent it). Targets finer than level 0 are refused.
        """
        if (magnification is None) == (mpp is None):
            raise ConfigError("give exactly one of magnification or mpp")
        target_mpp = magnification_to_mpp(magnification) if magnification is not None else float(mpp)  # type: ignore[arg-type]
        if target_mpp <= 0:
            raise ConfigError(f"target mpp must be positive, got {target_mpp}")
        if patch_size <= 0:
            raise ConfigError(f"patch size must be positive, got {patch_size}")
        target_ds = target_mpp / self.mpp
        if target_ds < 1 - _LEVEL_TOLERANCE:
            raise ConfigError(
                f"slide {self.name} is scanned at {self.magnification:.3g}x ({self.mpp:.4g} um/px); "
                f"cannot tile it at {mpp_to_magnification(target_mpp):.3g}x ({target_mpp:.4g} um/px) "
                "without upsampling. Choose a lower magnification for this dataset."
            )
        target_ds = max(target_ds, 1.0)
        level = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= target_ds * (1 + _LEVEL_TOLERANCE):
                level = i  # downsamples increase with the level
        level_ds = self.level_downsamples[level]
        scale = target_ds / level_ds
        read_size = patch_size if abs(scale - 1) <= _LEVEL_TOLERANCE else int(round(patch_size * scale))
        return LevelChoice(
            level=level,
            level_downsample=level_ds,
            target_downsample=target_ds,
            patch_size=int(patch_size),
            read_size=read_size,
            patch_size_level0=int(round(patch_size * target_ds)),
            target_mpp=target_mpp,
        )

    # --- pixels -------------------------------------------------------------------------
    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 array (height, width, 3) at `level`, top-left (x, y) in level-0 pixels.

        Transparent pixels (outside the scanned area) come back white.
        """
        return rgba_to_rgb_array(self._read_rgba(x, y, level, width, height))  # writable for torch.from_numpy

    def read_patch(self, x: int, y: int, choice: LevelChoice, out: np.ndarray | None = None) -> np.ndarray:
        """One patch (patch_size, patch_size, 3) uint8 with its level-0 top-left at (x, y).

        Args:
            out: a C-contiguous (patch_size, patch_size, 3) uint8 array to fill (e.g. a row of a
                batch), saving one copy; it is returned.
        """
        rgba = self._read_rgba(x, y, choice.level, choice.read_size, choice.read_size)
        if choice.needs_resize:
            rgba = rgba_to_rgb_image(rgba).resize((choice.patch_size, choice.patch_size), Image.BILINEAR)
        return rgba_to_rgb_array(rgba, out=out)

    def _read_rgba(self, x: int, y: int, level: int, width: int, height: int) -> Image.Image:
        errors = _reader_errors(self.reader)
        try:
            if self.reader == "tiffslide":
                return self._tiffslide_region(int(x), int(y), int(level), int(width), int(height))
            return self._osr.read_region((int(x), int(y)), int(level), (int(width), int(height)))
        except errors as exc:
            raise SlideError(
                f"cannot read region ({x}, {y}) level {level} size {width}x{height} of slide {self.path}: "
                f"{type(exc).__name__}: {exc}. The file may be truncated or damaged.",
                slide=self.name,
            ) from None

    def _tiffslide_region(self, x: int, y: int, level: int, width: int, height: int) -> Image.Image:
        """RGB region through tiffslide, what lies outside the level white (as OpenSlide's
        transparent pixels composited on white; tiffslide pads with black)."""
        ds = self.level_downsamples[level]
        if level > 0 and not self._warned_subpixel and (abs(x / ds - round(x / ds)) > 1e-6
                                                         or abs(y / ds - round(y / ds)) > 1e-6):
            from bench.common.console import warn

            self._warned_subpixel = True
            warn(f"slide {self.name}: tiffslide reads level {level} (downsample {ds:.6g}) at whole level pixels, "
                 f"but ({x}, {y}) falls between them; OpenSlide interpolates there, so these patches are shifted by "
                 "up to one level pixel against OpenSlide's (use --reader openslide for its exact pixels)")
        with warnings.catch_warnings():  # a region wholly outside the level: tiffslide warns, OpenSlide does not
            warnings.simplefilter("ignore", UserWarning)
            arr = self._osr.read_region((x, y), level, (width, height), as_array=True)  # (h, w, 3), zero-padded
        lw, lh = self.level_dimensions[level]
        x0, y0 = int(x / ds), int(y / ds)  # tiffslide's own level coordinates
        if x0 < 0 or y0 < 0 or x0 + width > lw or y0 + height > lh:
            arr = np.array(arr)  # writable copy
            arr[:max(0, min(height, -y0))] = 255
            arr[max(0, lh - y0):] = 255
            arr[:, :max(0, min(width, -x0))] = 255
            arr[:, max(0, lw - x0):] = 255
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        return Image.fromarray(np.ascontiguousarray(arr[..., :3], dtype=np.uint8), "RGB")

    def _read_rgb_image(self, x: int, y: int, level: int, width: int, height: int) -> Image.Image:
        return rgba_to_rgb_image(self._read_rgba(x, y, level, width, height))

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """RGB thumbnail whose longer side is at most `max_side`; returns (image, downsample).

        Read from the coarsest level that is still at least `max_side` on its longer
        side, then shrunk, so the thumbnail never costs a full level-0 read.
        """
        w0, h0 = self.dimensions
        target_ds = max(w0, h0) / max_side if max(w0, h0) > max_side else 1.0
        level = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= target_ds * (1 + _LEVEL_TOLERANCE):
                level = i
        lw, lh = self.level_dimensions[level]
        image = self._read_rgb_image(0, 0, level, lw, lh)
        out_w, out_h = max(1, int(round(w0 / target_ds))), max(1, int(round(h0 / target_ds)))
        if (out_w, out_h) != (lw, lh):
            image = image.resize((out_w, out_h), Image.BILINEAR)  # in PIL: one numpy conversion, at the end
        return np.array(image), w0 / out_w

    def close(self) -> None:
        osr = getattr(self, "_osr", None)
        if osr is not None:
            osr.close()
            self._osr = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({str(self.path)!r}, {self.dimensions[0]}x{self.dimensions[1]}, mpp={self.mpp:.4g} [{self.mpp_source}], levels={self.level_count})"


def open_slide(path: str | os.PathLike[str], mpp: float | None = None, reader: str | None = None) -> Slide:
    """Open a slide; errors are SlideError / MissingFileError with the slide's name."""
    return Slide(path, mpp=mpp, reader=reader)


def check_reader(reader: object) -> str:
    """A reader backend name, refused with the choices when unknown."""
    if reader not in READERS:
        raise ConfigError(f"slide reader must be one of {', '.join(READERS)}, got {reader!r}")
    return str(reader)


def default_reader() -> str:
    """The process's reader backend: `$BENCH_SLIDE_READER`, else "openslide"."""
    value = os.environ.get(READER_ENV, "").strip().lower()
    if not value:
        return "openslide"
    if value not in READERS:
        raise ConfigError(f"{READER_ENV}={value!r} is not a slide reader; use one of {', '.join(READERS)} "
                          f"or unset it")
    return value


def reader_available(reader: str) -> bool:
    """Whether a reader backend's package can be imported here."""
    import importlib.util

    return importlib.util.find_spec(check_reader(reader)) is not None


def require_reader(reader: str) -> str:
    """A reader backend that is installed here (ConfigError with the pip install when it is not)."""
    _reader_errors(check_reader(reader))
    return reader


def _reader_errors(reader: str) -> tuple[type[BaseException], ...]:
    """The exceptions a backend raises for a file it cannot open or read (importing it)."""
    if reader == "tiffslide":
        try:
            import tifffile
            import tiffslide  # noqa: F401
        except ImportError:
            raise ConfigError("slide reader 'tiffslide' is not installed; run `pip install 'cpath-bench[tiffslide]'` "
                              "(or `pip install tiffslide`), or use the default reader, openslide") from None
        return (tifffile.TiffFileError, OSError, ValueError, KeyError, IndexError, NotImplementedError)
    import openslide

    return (openslide.OpenSlideError, OSError, ValueError)


def _open_handle(reader: str, path: Path):
    if reader == "tiffslide":
        import tiffslide

        return tiffslide.TiffSlide(str(path))
    import openslide

    return openslide.OpenSlide(str(path))


def _openslide_keys(props: dict) -> dict[str, str]:
    """Properties as strings, tiffslide's `tiffslide.*` keys also under OpenSlide's `openslide.*` names."""
    out = {str(k): str(v) for k, v in props.items() if v is not None}
    for key, value in list(out.items()):
        if key.startswith("tiffslide."):
            out.setdefault("openslide." + key[len("tiffslide."):], value)
    return out


def mpp_from_properties(props: dict[str, str]) -> tuple[float, str] | None:
    """(level-0 mpp, source) from OpenSlide properties, or None when they hold no resolution.

    Sources in order: `openslide.mpp-x/y` (mean of both), TIFF resolution tags in
    centimetre or inch units, objective power (10 / power).
    """
    mpp_x, mpp_y = (_positive_float(props.get(k)) for k in ("openslide.mpp-x", "openslide.mpp-y"))
    if mpp_x is not None:
        return (mpp_x + (mpp_y or mpp_x)) / 2, "openslide"
    res, unit = _positive_float(props.get("tiff.XResolution")), props.get("tiff.ResolutionUnit", "").lower()
    microns = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
    if res is not None and microns is not None:
        return microns / res, "tiff"
    power = _positive_float(props.get("openslide.objective-power"))
    if power is not None:
        return magnification_to_mpp(power), "objective-power"
    return None


def _is_opaque(image: Image.Image) -> bool:
    """True when every alpha value of an RGBA image is 255 (the alpha bytes alone: 20x
    cheaper than `getextrema()`, which scans all four bands)."""
    return int(np.frombuffer(image.tobytes("raw", "A"), dtype=np.uint8).min(initial=255)) == 255


def rgba_to_rgb_image(image: Image.Image) -> Image.Image:
    """RGB PIL image of an OpenSlide RGBA image, transparent pixels composited on white.

    The common, fully opaque case stays inside PIL (alpha check, then one RGB
    conversion): converting through numpy first costs a third of a patch read.
    """
    if image.mode != "RGBA":
        return image.convert("RGB")
    if _is_opaque(image):
        return image.convert("RGB")
    return Image.fromarray(rgba_to_rgb(np.asarray(image)))


def rgba_to_rgb_array(image: Image.Image, out: np.ndarray | None = None) -> np.ndarray:
    """(h, w, 3) uint8 array of an RGBA (or RGB) PIL image, transparent pixels on white.

    Opaque RGBA goes straight to RGB bytes with PIL's packer (one pass, no alpha
    arithmetic): with the alpha check this costs ~6% of a 256 px patch read, against
    ~35% for `np.array(image.convert("RGB"))` after a four-band `getextrema`.
    """
    w, h = image.size
    if image.mode == "RGBA" and not _is_opaque(image):
        rgb = rgba_to_rgb(np.asarray(image))
    else:
        data = image.tobytes("raw", "RGB") if image.mode in ("RGBA", "RGB") else image.convert("RGB").tobytes()
        if out is None:
            return np.frombuffer(bytearray(data), dtype=np.uint8).reshape(h, w, 3)  # bytearray: writable
        rgb = np.frombuffer(data, dtype=np.uint8).reshape(h, w, 3)
    if out is None:
        return rgb
    if out.shape != (h, w, 3) or out.dtype != np.uint8:
        raise ValueError(f"out must be ({h}, {w}, 3) uint8, got {out.shape} {out.dtype}")
    out[...] = rgb
    return out


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite an RGBA uint8 array on white (OpenSlide's RGBA is not premultiplied)."""
    if rgba.ndim != 3 or rgba.shape[2] != 4:
        return np.ascontiguousarray(rgba[..., :3])
    alpha = rgba[..., 3]
    if alpha.min() == 255:  # the common case: fully opaque, no arithmetic
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha[..., None].astype(np.uint16)
    rgb = (rgba[..., :3].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return rgb.astype(np.uint8)


def _positive_float(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        f = float(value)
    except ValueError:
        return None
    return f if math.isfinite(f) and f > 0 else None
