"""Attention heatmaps: the per-patch attention of the test slides, saved by the trainers and drawn on the slide.

Every trainer (two-stage, E2E, GMA) writes, when it predicts the test split with an aggregator that has
attention (every one but mean/max pooling), one HDF5 file beside the run record:

    <run_dir>/attention.h5
        attrs:  format = "cpath-bench-attention", version = 1, split = "test", n_slides,
                aggregator, paradigm, and cohort_root (the cohort folder) when the trainer knew the cohort
        /<slide_id>/                   one group per test slide, in test-bag order
            attention   (N,) float32   the aggregator's attention (MILOutput.attention: the mean over heads
                                       for multi-head models)
            heads       (H, N) float32 per-head attention, only for models with several heads (ABMILX, TransMIL;
                                       DSMIL's per-class rows)
            coords      (N, 2) int64   level-0 top-left (x, y) of each patch: the coords the bag was built from,
                                       row for row
            attrs: patch_size_level0, magnification (of the patches), bag_id, and slide_path / mpp when known

A patient bag (survival: several slides per bag) is split back per slide in bag order, so each slide's
`attention` is its slice of the bag's distribution (it sums to that slide's share, not to 1).

`render_heatmap` draws one slide: the attention painted cell by cell (each patch a cell of the grid at its
magnification, at thumbnail resolution with numpy, then shown at 1:1), a colour bar in attention units (linear
from the slide's minimum to its maximum), the lesion truth outlined in magenta when the cohort has masks
(synthetic cohorts), and for multi-head models one small panel per head, each scaled to its own range.
`heatmaps_for_run` renders the slides of a run folder; `bench heatmap RUN_DIR` calls it.

Where the slides are found (`heatmaps_for_run`): a slide group's `slide_path` when that file exists; else the
cohort folder: the `cohort_root` argument, the file's `cohort_root` attr, then `<workdir>/data/<dataset>`
(where `bench run` writes synthetic cohorts; the work folder is the one holding the run's split file,
`<workdir>/splits/<dataset>/...`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common.errors import DataError, MissingFileError

ATTENTION_FILE = "attention.h5"
FORMAT = "cpath-bench-attention"
FORMAT_VERSION = 1
HEATMAP_DIR = "heatmaps"
LESION_RGB = (255, 0, 255)  # magenta: not a colour of the "jet" map, whatever the tissue under it
_LIST = 20  # how many slide ids an error lists


# ----------------------------------------------------------------------------- what is saved


@dataclass(frozen=True)
class SlideGeometry:
    """Where a slide's patches are: what a trainer knows about a slide besides its attention."""

    coords: np.ndarray  # (N, 2) int64 level-0 top-left, the rows of the bag
    patch_size_level0: int
    magnification: float
    slide_path: str | None = None
    mpp: float | None = None


@dataclass(frozen=True)
class SlideAttention:
    """One slide of attention.h5."""

    slide_id: str
    bag_id: str
    attention: np.ndarray  # (N,) float32
    coords: np.ndarray  # (N, 2) int64
    patch_size_level0: int
    magnification: float
    heads: np.ndarray | None = None  # (H, N) float32, H > 1
    slide_path: str | None = None
    mpp: float | None = None

    def __len__(self) -> int:
        return int(self.attention.shape[0])


@dataclass(frozen=True)
class AttentionFile:
    """attention.h5 as read back: its attrs and its slides (in file order)."""

    path: Path
    attrs: Mapping[str, Any]
    slides: Mapping[str, SlideAttention]


def head_rows(head_attention: Any) -> np.ndarray | None:
    """(H, N) float32 of a one-bag `MILOutput.head_attention` ((1, H, N) tensor or array), None unless H > 1."""
    if head_attention is None:
        return None
    if hasattr(head_attention, "detach"):
        head_attention = head_attention.detach().float().cpu().numpy()
    arr = np.asarray(head_attention, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[0]
    if arr.ndim != 2 or arr.shape[0] < 2:
        return None
    return arr


def bag_attention(bag_id: str, slide_ids: Sequence[str], attention: Any, heads: Any,
                  geometry: Callable[[str], SlideGeometry]) -> list[SlideAttention]:
    """Split one bag's attention (N,) and heads (H, N) back into its slides, in bag order.

    `geometry(slide_id)` gives each slide's coords; their lengths must add up to N (the bag was their
    concatenation), else a DataError names the bag.
    """
    a = np.asarray(attention, dtype=np.float32).reshape(-1)
    h = None if heads is None else np.asarray(heads, dtype=np.float32)
    if h is not None and (h.ndim != 2 or h.shape[1] != a.shape[0]):
        raise DataError(f"bag {bag_id!r}: heads of shape {h.shape} for {a.shape[0]} attention values")
    geos = [geometry(s) for s in slide_ids]
    sizes = [int(np.asarray(g.coords).reshape(-1, 2).shape[0]) for g in geos]
    if sum(sizes) != a.shape[0]:
        raise DataError(f"bag {bag_id!r}: {a.shape[0]} attention values but its slides have "
                        f"{' + '.join(map(str, sizes))} = {sum(sizes)} patches")
    out, lo = [], 0
    for sid, g, n in zip(slide_ids, geos, sizes):
        out.append(SlideAttention(
            slide_id=str(sid), bag_id=str(bag_id), attention=a[lo:lo + n].copy(),
            coords=np.asarray(g.coords, dtype=np.int64).reshape(-1, 2), patch_size_level0=int(g.patch_size_level0),
            magnification=float(g.magnification), heads=None if h is None else h[:, lo:lo + n].copy(),
            slide_path=None if g.slide_path is None else str(g.slide_path), mpp=g.mpp))
        lo += n
    return out


def write_attention(path: str | os.PathLike[str], slides: Sequence[SlideAttention], **attrs: Any) -> Path:
    """Write attention.h5 atomically (format in the module docstring); None-valued attrs are left out."""
    import h5py

    from bench.common.files import atomic_path

    path = Path(path)
    seen: set[str] = set()
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            meta = {"format": FORMAT, "version": FORMAT_VERSION, "split": "test", "n_slides": len(slides), **attrs}
            for key, value in meta.items():
                if value is not None:
                    f.attrs[key] = str(value) if isinstance(value, Path) else value
            for s in slides:
                if s.slide_id in seen:
                    raise DataError(f"slide {s.slide_id!r} appears in two test bags; attention.h5 holds one "
                                    "entry per slide")
                seen.add(s.slide_id)
                if s.coords.shape != (len(s), 2):
                    raise DataError(f"slide {s.slide_id!r}: coords {s.coords.shape} for {len(s)} attention values")
                g = f.create_group(s.slide_id)
                g.create_dataset("attention", data=np.asarray(s.attention, dtype=np.float32))
                g.create_dataset("coords", data=np.asarray(s.coords, dtype=np.int64))
                if s.heads is not None:
                    g.create_dataset("heads", data=np.asarray(s.heads, dtype=np.float32))
                g.attrs["patch_size_level0"] = int(s.patch_size_level0)
                g.attrs["magnification"] = float(s.magnification)
                g.attrs["bag_id"] = str(s.bag_id)
                if s.slide_path is not None:
                    g.attrs["slide_path"] = str(s.slide_path)
                if s.mpp is not None:
                    g.attrs["mpp"] = float(s.mpp)
    return path


def _py(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_attention(path: str | os.PathLike[str]) -> AttentionFile:
    """Read attention.h5; a missing or foreign file is an error naming it."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no attention file {path}")
    slides: dict[str, SlideAttention] = {}
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _py(v) for k, v in f.attrs.items()}
            if attrs.get("format") != FORMAT:
                raise DataError(f"{path} is not an attention file of the harness (format {attrs.get('format')!r})")
            for sid, g in f.items():
                ga = {k: _py(v) for k, v in g.attrs.items()}
                slides[sid] = SlideAttention(
                    slide_id=sid, bag_id=str(ga.get("bag_id", sid)),
                    attention=np.asarray(g["attention"][()], dtype=np.float32),
                    coords=np.asarray(g["coords"][()], dtype=np.int64).reshape(-1, 2),
                    patch_size_level0=int(ga["patch_size_level0"]), magnification=float(ga["magnification"]),
                    heads=np.asarray(g["heads"][()], dtype=np.float32) if "heads" in g else None,
                    slide_path=ga.get("slide_path"), mpp=ga.get("mpp"))
    except (OSError, KeyError) as exc:
        raise DataError(f"attention file {path} cannot be read ({exc}); rerun the run with --force") from None
    order = sorted(slides, key=list(slides).index)
    return AttentionFile(path, attrs, {s: slides[s] for s in order})


def patch_geometry(attrs: Mapping[str, Any], coords: np.ndarray) -> tuple[int, float]:
    """(patch size at level 0, magnification) of a feature or coords file's patches, from its attrs.

    Ours and TRIDENT's record `patch_size_level0` / `target_magnification`; CLAM's only `patch_size` (at its
    `patch_level`), so there the grid step of the coords stands in for the level-0 size. 0.0 = magnification
    unknown.
    """
    mag = float(attrs.get("target_magnification") or attrs.get("magnification") or 0.0)
    ps0 = attrs.get("patch_size_level0")
    if ps0 is None and attrs.get("patch_size") and attrs.get("level0_magnification") and mag:
        ps0 = round(float(attrs["patch_size"]) * float(attrs["level0_magnification"]) / mag)
    if ps0 is None:
        steps = [np.diff(np.unique(np.asarray(coords)[:, k])) for k in (0, 1)] if len(coords) else []
        steps = [s[s > 0].min() for s in steps if (s > 0).any()]
        ps0 = int(min(steps)) if steps else int(attrs.get("patch_size") or 256)
    return int(ps0), mag


# ----------------------------------------------------------------------------- drawing


@dataclass(frozen=True)
class Panel:
    """Where a panel's image lies in the PNG (pixels, origin top-left, right/bottom exclusive)."""

    left: int
    top: int
    width: int
    height: int


@dataclass(frozen=True)
class HeatmapImage:
    """A rendered heatmap: the PNG and how its pixels map to the slide.

    The main panel is the thumbnail at 1:1: a level-0 point (x, y) of the slide lies at PNG pixel
    (panel.left + x / downsample, panel.top + y / downsample). Head panels are the thumbnail scaled to their size.
    """

    path: Path
    panel: Panel
    downsample: float  # level-0 pixels per thumbnail pixel
    thumb_shape: tuple[int, int]  # (h, w)
    head_panels: tuple[Panel, ...] = ()
    seconds: float = 0.0


def _cells(coords: np.ndarray, ps0: int, ds: float, shape: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """Thumbnail pixel bounds (x0, x1, y0, y1) of each patch: neighbours share edges, every cell >= 1 px."""
    h, w = shape
    c = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    x0 = np.clip(np.rint(c[:, 0] / ds), 0, w - 1).astype(np.int64)
    y0 = np.clip(np.rint(c[:, 1] / ds), 0, h - 1).astype(np.int64)
    x1 = np.clip(np.rint((c[:, 0] + ps0) / ds), 0, w).astype(np.int64)
    y1 = np.clip(np.rint((c[:, 1] + ps0) / ds), 0, h).astype(np.int64)
    return x0, np.maximum(x1, x0 + 1), y0, np.maximum(y1, y0 + 1)


def _axis_map(origin: int, ps0: int, ds: float, n_cells: int, length: int) -> np.ndarray:
    """(length,) grid index of each thumbnail pixel along one axis of a regular grid, -1 outside it."""
    out = np.full(length, -1, dtype=np.int64)
    edges = np.clip(np.rint((origin + np.arange(n_cells + 1) * ps0) / ds), 0, length).astype(np.int64)
    for g in range(n_cells):  # one per grid column or row: a few hundred at most
        out[edges[g]:max(edges[g + 1], edges[g] + 1)] = g
    return out


def paint_cells(coords: np.ndarray, order_by: np.ndarray, ps0: int, ds: float, shape: tuple[int, int]) -> np.ndarray:
    """(h, w) int32 canvas: the row of the patch covering each thumbnail pixel, -1 outside every patch.

    On a regular grid of step `ps0` (the tiler's default, no overlap) every pixel looks its cell up in one
    fancy-index gather; otherwise (overlapping or irregular coords) each patch is one slice assignment, the one
    with the larger `order_by` value on top where patches overlap. Either way no rectangle is drawn.
    """
    h, w = shape
    canvas = np.full((h, w), -1, dtype=np.int32)
    c = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    n = len(c)
    if n == 0:
        return canvas
    origin = c.min(axis=0)
    rel = c - origin
    if not (rel % ps0).any():
        gx, gy = rel[:, 0] // ps0, rel[:, 1] // ps0
        if len(np.unique(gy * (int(gx.max()) + 1) + gx)) == n:  # no duplicate coords
            grid = np.full((int(gy.max()) + 1, int(gx.max()) + 1), -1, dtype=np.int32)
            grid[gy, gx] = np.arange(n, dtype=np.int32)
            cols = _axis_map(int(origin[0]), ps0, ds, grid.shape[1], w)
            rows = _axis_map(int(origin[1]), ps0, ds, grid.shape[0], h)
            vr, vc = np.flatnonzero(rows >= 0), np.flatnonzero(cols >= 0)
            canvas[np.ix_(vr, vc)] = grid[np.ix_(rows[vr], cols[vc])]
            return canvas
    x0, x1, y0, y1 = _cells(c, ps0, ds, shape)
    for i in np.argsort(np.asarray(order_by), kind="stable"):
        canvas[y0[i]:y1[i], x0[i]:x1[i]] = i
    return canvas


def _normalised(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    v = np.asarray(values, dtype=np.float64)
    lo, hi = float(v.min()), float(v.max())
    return ((v - lo) / (hi - lo) if hi > lo else np.full_like(v, 0.5)), lo, hi


class _Layer:
    """A thumbnail and its patch canvas, blended with one map of colours per call in 8.8 fixed point."""

    def __init__(self, thumb: np.ndarray, canvas: np.ndarray, alpha: float, edges: np.ndarray | None) -> None:
        self.canvas1 = canvas.astype(np.int64) + 1  # 0 = outside every patch
        keep = np.where(canvas >= 0, round((1 - alpha) * 256), 256).astype(np.uint16)  # (h, w)
        self.base = thumb.astype(np.uint16) * keep[..., None]  # (h, w, 3), <= 255 * 256
        self.alpha = alpha
        self.edges = edges

    def blend(self, values: np.ndarray, lut: np.ndarray) -> np.ndarray:
        norm, _, _ = _normalised(values)
        colours = np.zeros((len(values) + 1, 3), dtype=np.uint16)  # row 0: outside, adds nothing
        colours[1:] = np.rint(lut[np.rint(norm * 255).astype(np.int64)] * (self.alpha * 256)).astype(np.uint16)
        out = ((self.base + colours[self.canvas1]) >> 8).astype(np.uint8)  # (h, w, 3)
        if self.edges is not None:
            out[self.edges] = LESION_RGB
        return out


def lesion_edges(mask: np.ndarray, mask_downsample: float, ds: float, shape: tuple[int, int],
                 width: int | None = None) -> np.ndarray:
    """(h, w) bool outline of a lesion mask (level-0 downsample `mask_downsample`) at thumbnail scale."""
    from bench.data.tiling import erode_cross

    h, w = shape
    mh, mw = mask.shape
    rows = np.clip(((np.arange(h) + 0.5) * ds / mask_downsample).astype(np.int64), 0, mh - 1)
    cols = np.clip(((np.arange(w) + 0.5) * ds / mask_downsample).astype(np.int64), 0, mw - 1)
    m = np.asarray(mask, dtype=bool)[np.ix_(rows, cols)]
    width = width or max(1, round(min(h, w) / 400))
    return m & ~erode_cross(m, width)


def render_heatmap(slide_path: str | os.PathLike[str], coords: Any, attention: Any, patch_size_level0: int,
                   out_png: str | os.PathLike[str], *, lesion_mask: tuple[np.ndarray, float] | None = None,
                   heads: Any = None, title: str | None = None, mpp: float | None = None, max_side: int = 1024,
                   cmap: str = "jet", alpha: float = 0.5) -> HeatmapImage:
    """Draw one slide's per-patch attention over its thumbnail into `out_png` (written atomically).

    Args:
        coords: (N, 2) level-0 top-left corners of the patches (the rows of `attention`).
        attention: (N,) non-negative scores; colours run linearly from their minimum to their maximum.
        patch_size_level0: side of a patch at level 0 (a cell of the grid at the patches' magnification).
        lesion_mask: (bool mask, its level-0 downsample), e.g. `bench.data.synthetic.load_mask`; outlined in magenta.
        heads: (H, N) per-head attention: one small panel per head (each scaled to its own range).
        mpp: level-0 microns per pixel for a slide that records none.
        max_side: longer side of the thumbnail (= the main panel, shown at 1:1).

    Raises:
        DataError: coords and attention disagree, or attention holds NaN/inf.
        SlideError / MissingFileError: the slide cannot be read.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    from bench.common.files import atomic_path
    from bench.data.slides import open_slide

    t0 = time.perf_counter()
    c = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    a = np.asarray(attention, dtype=np.float64).reshape(-1)
    if len(a) == 0 or len(a) != len(c):
        raise DataError(f"render_heatmap: {len(a)} attention values for {len(c)} coords; they must match, N >= 1")
    if not np.isfinite(a).all():
        raise DataError(f"render_heatmap: attention of {slide_path} holds NaN or inf")
    h_rows = None if heads is None else np.asarray(heads, dtype=np.float64)
    if h_rows is not None and (h_rows.ndim != 2 or h_rows.shape[1] != len(a)):
        raise DataError(f"render_heatmap: heads of shape {h_rows.shape} for {len(a)} patches; expected (H, {len(a)})")
    if h_rows is not None and h_rows.shape[0] < 2:
        h_rows = None
    ps0 = int(patch_size_level0)
    if ps0 <= 0:
        raise DataError(f"render_heatmap: patch_size_level0 must be positive, got {patch_size_level0}")

    with open_slide(slide_path, mpp=mpp) as slide:
        thumb, ds = slide.thumbnail(max_side)
    thumb = np.ascontiguousarray(thumb[..., :3])
    th, tw = thumb.shape[:2]
    lut = np.asarray(colormaps[cmap](np.linspace(0.0, 1.0, 256)))[:, :3] * 255.0  # (256, 3)

    def layer(image: np.ndarray, scale: float) -> _Layer:
        shape = image.shape[:2]
        edges = None if lesion_mask is None else lesion_edges(np.asarray(lesion_mask[0]), float(lesion_mask[1]),
                                                               scale, shape)
        return _Layer(image, paint_cells(c, a, ps0, scale, shape), alpha, edges)

    main = layer(thumb, ds).blend(a, lut)

    # --- layout in pixels (dpi 100): title, main panel at 1:1 + colour bar, then the heads' small multiple
    dpi = 100
    pad, cbar_w, cbar_gap, right = 10, 16, 10, 78
    top = 34 + (16 if lesion_mask is not None else 0)
    n_heads = 0 if h_rows is None else h_rows.shape[0]
    per_row = min(4, n_heads)
    head_w = (tw - (per_row - 1) * pad) // per_row if per_row else 0
    head_h = max(1, round(head_w * th / tw)) if per_row else 0
    n_head_rows = math.ceil(n_heads / per_row) if per_row else 0
    head_title = 16
    cell_h = head_title + head_h + pad
    heads_top = top + th + pad + 8
    fig_w = pad + tw + cbar_gap + cbar_w + right
    fig_h = heads_top + n_head_rows * cell_h if per_row else top + th + pad
    fig = Figure(figsize=((fig_w + 0.25) / dpi, (fig_h + 0.25) / dpi), dpi=dpi)  # Agg truncates to whole pixels
    FigureCanvasAgg(fig)

    def show(left: int, top_px: int, image: np.ndarray) -> None:
        # figimage puts the array's pixels 1:1 at a pixel offset of the figure: no resampling, exact cells
        fig.figimage(image, xo=left, yo=fig_h - top_px - image.shape[0], origin="upper")

    name = title if title is not None else f"{Path(slide_path).stem}: attention of {len(a):,} patches"
    fig.text(pad / fig_w, 1 - 8 / fig_h, name, ha="left", va="top", fontsize=11)
    if lesion_mask is not None:
        fig.text(pad / fig_w, 1 - 28 / fig_h, "magenta outline: lesion (ground truth)", ha="left", va="top",
                 fontsize=8, color="#b000b0")
    show(pad, top, main)
    _, lo, hi = _normalised(a)
    cax = fig.add_axes(((pad + tw + cbar_gap) / fig_w, 1 - (top + th) / fig_h, cbar_w / fig_w, th / fig_h))
    bar = fig.colorbar(ScalarMappable(norm=Normalize(lo, hi if hi > lo else lo + 1e-12), cmap=colormaps[cmap]),
                       cax=cax)
    bar.set_label("attention", fontsize=9)
    bar.ax.tick_params(labelsize=8)
    head_panels: list[Panel] = []
    if h_rows is not None:
        # every head painted at panel size into one mosaic (one image, one axes: cheap to draw)
        from PIL import Image

        small = np.asarray(Image.fromarray(thumb).resize((head_w, head_h), Image.BILINEAR))
        base = layer(small, ds * tw / head_w)
        mosaic_w = per_row * head_w + (per_row - 1) * pad
        mosaic_h = n_head_rows * cell_h
        mosaic = np.full((mosaic_h, mosaic_w, 3), 255, dtype=np.uint8)
        for j in range(n_heads):
            r, k = divmod(j, per_row)
            x, y = k * (head_w + pad), r * cell_h + head_title
            mosaic[y:y + head_h, x:x + head_w] = base.blend(h_rows[j], lut)
            fig.text((pad + x + 2) / fig_w, 1 - (heads_top + r * cell_h + 2) / fig_h,
                     f"head {j}: max {h_rows[j].max():.3g}", ha="left", va="top", fontsize=8)
            head_panels.append(Panel(pad + x, heads_top + y, head_w, head_h))
        show(pad, heads_top, mosaic)
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        # zlib level 1, as the QC thumbnails: a noisy slide thumbnail compresses barely better at PIL's
        # default level 6, which takes longer than everything else here together
        fig.savefig(tmp, format="png", dpi=dpi, pil_kwargs={"compress_level": 1})
    return HeatmapImage(out_png, Panel(pad, top, tw, th), float(ds), (th, tw), tuple(head_panels),
                        time.perf_counter() - t0)


# ----------------------------------------------------------------------------- one run


@dataclass
class _Cohort:
    """The slides and masks a run's heatmaps need, found once per run."""

    root: Path | None
    tried: list[str] = field(default_factory=list)
    table: Any = None
    error: str | None = None

    def slide(self, s: SlideAttention) -> tuple[Path, float | None]:
        if s.slide_path and Path(s.slide_path).is_file():
            return Path(s.slide_path), s.mpp
        if self.table is None:
            where = "; ".join(self.tried) or "no cohort folder known"
            raise MissingFileError(
                f"slide {s.slide_id!r}: its slide file is not known ({s.slide_path or 'no slide_path recorded'}) "
                f"and no cohort folder was found ({where}{'; ' + self.error if self.error else ''}); pass the "
                "cohort folder (bench heatmap --cohort DIR)")
        try:
            return Path(self.table.slide_path(s.slide_id)), self.table.slide_mpp(s.slide_id) or s.mpp
        except DataError as exc:
            raise MissingFileError(f"slide {s.slide_id!r}: {exc}") from None

    def mask(self, slide_id: str) -> tuple[np.ndarray, float] | None:
        if self.root is None or not (self.root / "masks" / f"{slide_id}.lesion.png").is_file():
            return None
        from bench.data.synthetic import load_mask

        mask, downsample = load_mask(self.root, slide_id, "lesion")
        return mask, float(downsample)


def _find_cohort(record: Any, file: AttentionFile, cohort_root: Path | None) -> _Cohort:
    from bench.common.errors import BenchError
    from bench.data.cohort import load_cohort

    candidates: list[tuple[str, Path]] = []
    if cohort_root is not None:
        candidates.append(("given", Path(cohort_root)))
    if file.attrs.get("cohort_root"):
        candidates.append(("attention.h5 cohort_root", Path(str(file.attrs["cohort_root"]))))
    split_path = Path(str((record.data.get("split") or {}).get("path") or ""))
    if split_path.parts and split_path.parent.parent.name == "splits":
        candidates.append(("work folder of the split file", split_path.parents[2] / "data" / record.dataset))
    out = _Cohort(root=None)
    for why, root in candidates:
        if not (root / "labels.csv").is_file() and not (root / "cohort.json").is_file():
            if why == "given":
                raise MissingFileError(f"cohort folder {root} is not a cohort folder: it has no labels.csv or "
                                       "cohort.json")
            out.tried.append(f"{root} ({why}): not a cohort folder")
            continue
        out.root = root
        try:
            kind = (record.data.get("task") or {}).get("kind")
            out.table = load_cohort(root, task=kind if kind in ("classification", "grading", "survival") else None)
        except BenchError as exc:
            out.error = f"{root} cannot be loaded: {exc}"
        return out
    return out


def heatmaps_for_run(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None,
                     slides: Sequence[str] | None = None, max_slides: int | None = None, *,
                     cohort_root: str | os.PathLike[str] | None = None, max_side: int = 1024,
                     keep_current: bool = False) -> list[Path]:
    """Render `<out_dir>/<slide_id>.png` for the test slides of a run (default out: `<run_dir>/heatmaps/`).

    Args:
        slides: slide ids to draw (default: every slide of attention.h5, in test-bag order).
        max_slides: at most this many (the first ones of `slides` or of the file).
        cohort_root: the cohort folder, when neither attention.h5 nor the work folder layout says it.
        keep_current: leave a PNG that is newer than attention.h5 as it is (its path is still returned).

    Raises:
        MissingFileError: the run has no run.json or no attention.h5 (the message lists what the folder holds),
            or a slide file cannot be found.
        DataError: a slide id that is not in attention.h5 (the message lists those that are).
    """
    from bench.evaluation.records import load_run

    run_dir = Path(run_dir)
    record = load_run(run_dir)
    path = run_dir / ATTENTION_FILE
    if not path.is_file():
        present = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
        agg = record.data.get("aggregator")
        why = (f"aggregator {agg!r} has no attention (mean/max pooling)" if agg in ("mean", "max") else
               "the run predates attention maps or did not predict its test split: rerun it with --force")
        raise MissingFileError(f"run {run_dir} has no {ATTENTION_FILE} ({why}); the folder holds: "
                               f"{', '.join(present) or 'nothing'}")
    file = read_attention(path)
    wanted = list(file.slides) if slides is None else list(dict.fromkeys(slides))
    unknown = [s for s in wanted if s not in file.slides]
    if unknown:
        have = list(file.slides)
        raise DataError(f"slide(s) {', '.join(map(repr, unknown))} not in {path} (the run's test slides with "
                        f"attention); it holds {len(have)}: {', '.join(have[:_LIST])}"
                        f"{' ...' if len(have) > _LIST else ''}")
    if max_slides is not None:
        wanted = wanted[:max(0, int(max_slides))]
    if not wanted:
        return []
    out_dir = Path(out_dir) if out_dir is not None else run_dir / HEATMAP_DIR
    made = path.stat().st_mtime_ns

    def current(sid: str) -> bool:
        png = out_dir / f"{sid}.png"
        return keep_current and png.is_file() and png.stat().st_mtime_ns > made

    if all(current(sid) for sid in wanted):
        return [out_dir / f"{sid}.png" for sid in wanted]
    cohort = _find_cohort(record, file, None if cohort_root is None else Path(cohort_root))
    written = []
    for sid in wanted:
        if current(sid):
            written.append(out_dir / f"{sid}.png")
            continue
        s = file.slides[sid]
        slide_path, mpp = cohort.slide(s)
        title = f"{record.dataset} {record.method} ({record.split}): {sid}, bag {s.bag_id}, {len(s):,} patches"
        img = render_heatmap(slide_path, s.coords, s.attention, s.patch_size_level0, out_dir / f"{sid}.png",
                             lesion_mask=cohort.mask(sid), heads=s.heads, title=title, mpp=mpp, max_side=max_side)
        written.append(img.path)
    return written


def heatmaps_for_suite(run_dirs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
                       max_slides: int = 1, max_side: int = 1024) -> list[Path]:
    """A few heatmaps per method for a leaderboard: `<out_dir>/heatmaps/<dataset>/<method>/<slide_id>.png`.

    One run per (dataset, method) (its first split tag), the same `max_slides` test slides for every method of
    a dataset where they share them (the first slide ids, sorted), so the maps compare side by side. Runs that
    are not ok or have no attention.h5 (mean/max pooling) are left out silently; a run whose maps cannot be
    drawn (a slide file gone) is warned about and left out: heatmaps never fail a leaderboard. PNGs newer than
    their attention.h5 are kept (a rerun with every run cached draws nothing).
    """
    from bench.common.console import warn
    from bench.common.errors import BenchError, WriteError
    from bench.evaluation.records import load_run

    chosen: dict[tuple[str, str], tuple[str, Path]] = {}
    for run_dir in map(Path, run_dirs):
        try:
            record = load_run(run_dir)
        except BenchError:
            continue
        if not record.ok or not (run_dir / ATTENTION_FILE).is_file():
            continue
        key = (record.dataset, record.method)
        if key not in chosen or record.split < chosen[key][0]:
            chosen[key] = (record.split, run_dir)
    slides: dict[tuple[str, str], list[str]] = {}
    for key, (_, run_dir) in chosen.items():
        try:
            slides[key] = sorted(read_attention(run_dir / ATTENTION_FILE).slides)
        except BenchError as exc:
            warn(f"heatmaps of {run_dir}: {exc}")
    written: list[Path] = []
    for (dataset, method), ids in sorted(slides.items()):
        others = [set(v) for (d, _), v in slides.items() if d == dataset]
        shared = sorted(set.intersection(*others)) if others else []
        pick = (shared or ids)[:max(0, int(max_slides))]
        run_dir = chosen[(dataset, method)][1]
        target = Path(out_dir) / HEATMAP_DIR / dataset / method.replace("/", "_")
        try:
            written += heatmaps_for_run(run_dir, target, slides=pick, max_side=max_side, keep_current=True)
        except WriteError:
            raise
        except BenchError as exc:
            warn(f"heatmaps of {dataset} {method}: {exc}")
    return written


__all__ = ["ATTENTION_FILE", "AttentionFile", "HeatmapImage", "Panel", "SlideAttention", "SlideGeometry",
           "bag_attention", "head_rows", "heatmaps_for_run", "heatmaps_for_suite", "paint_cells", "patch_geometry", "read_attention",
           "render_heatmap", "write_attention"]
