"""Synthetic cohorts: seeded pyramidal TIFF slides whose label lives in sparse lesions.

Each slide is a real tiled, JPEG-compressed, pyramidal TIFF (levels at 1, 4,
16, ... downsample) with its resolution in the TIFF tags, so OpenSlide opens it
like a scanner file and reports `openslide.mpp-x`. Content:

- glass background, tissue blobs with irregular borders and holes (lumens),
  pink stroma with a smooth texture, and scattered small round nuclei;
- a few lesions covering a minority of the tissue, whose nuclei differ in size,
  shape and density according to the slide's label. Outside the lesions both
  classes look the same, so the slide label is decided by a minority of
  patches: a genuine multiple-instance problem.

Kinds: `subtyping` (2 classes "IDC"-like large round dense nuclei vs "ILC"-like
small elongated ones, about 4:1), `grading` (ISUP-like 0..5: no lesion at 0,
then lesion count, size, nuclear size and darkness grow with the grade) and
`survival` (patients with 1-3 slides sharing a latent morphology score; event
times from an exponential hazard rising with the score; 30-50% censored).

Output folder:
    labels.csv        slide_id, patient_id, label | time, event
    slides/<id>.tif   the slides
    masks/<id>.tissue.png, masks/<id>.lesion.png   ground truth at `mask_downsample`
    cohort.json       kind, task, classes, mask_downsample, generator settings, per-slide truth

Pixels are rendered tile by tile from a seeded per-tile generator, so a
40,000 x 30,000 px slide is written without holding level 0 in memory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.common.console import progress
from bench.common.errors import ConfigError, DataError, MissingFileError
from bench.common.files import atomic_path, write_json_atomic, write_text_atomic

KINDS = ("subtyping", "grading", "survival")
TASK_OF_KIND = {"subtyping": "classification", "grading": "grading", "survival": "survival"}
TILE = 256
_BACKGROUND = np.array([242.0, 242.0, 245.0])
_STROMA = np.array([234.0, 168.0, 204.0])
_HEMATOXYLIN = np.array([72.0, 40.0, 128.0])


class CohortSettingsError(ConfigError):
    """A cohort folder holds a synthetic cohort made with other generator settings."""


# (knob, low, high, low end included?): the ranges `SyntheticSpec` accepts
KNOBS = (("witness_rate", 0.0, 0.9, False), ("lesion_contrast", 0.0, 1.0, True), ("label_noise", 0.0, 0.45, True),
         ("hazard_strength", 0.0, 10.0, True))


@dataclass(frozen=True)
class SyntheticSpec:
    """Settings of a synthetic cohort (sizes in level-0 pixels at `mpp` um/px)."""

    kind: str = "subtyping"
    n_slides: int = 40  # survival: approximate, patients get 1-3 slides
    width: int = 4096
    height: int = 3072
    mpp: float = 0.5
    seed: int = 0
    jpeg_quality: int = 90
    minority_fraction: float = 0.2  # subtyping: share of the second class (0.2 is TCGA-BRCA's ~4:1)
    classes: tuple[str, ...] | None = None  # label names; default IDC/ILC (subtyping), 0..5 (grading)
    # Planted-effect knobs (None = the kind's default, and the cohort's bytes are those of a spec without
    # the knob). Their effect on each method family is known in advance; README "Planted effects".
    witness_rate: float | None = None  # share of the tissue inside lesions (grading: at grade 5; survival: at score 1)
    lesion_contrast: float | None = None  # 0 = lesion nuclei look normal, 1 = the kind's full morphology (default)
    label_noise: float | None = None  # share of patients whose recorded label is another class (default 0)
    hazard_strength: float | None = None  # survival: beta of the hazard exp(beta * lesion score) (default 2.5)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown synthetic kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        for knob, low, high, closed_low in KNOBS:
            value = getattr(self, knob)
            if value is None:
                continue
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
                (low <= value if closed_low else low < value) and value <= high)
            if not ok:
                raise ConfigError(f"synthetic knob {knob} = {value!r} is out of range: it must be in "
                                  f"{'[' if closed_low else '('}{low:g}, {high:g}]")
            object.__setattr__(self, knob, float(value))
        if self.label_noise is not None and self.kind == "survival":
            raise ConfigError("synthetic knob label_noise applies to subtyping and grading, not survival")
        if self.hazard_strength is not None and self.kind != "survival":
            raise ConfigError(f"synthetic knob hazard_strength applies to survival only, not {self.kind}")
        if not 0 < self.minority_fraction <= 0.5:
            raise ConfigError(f"minority_fraction must be in (0, 0.5], got {self.minority_fraction}")
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
            want = {"subtyping": 2, "grading": 6, "survival": 0}[self.kind]
            if len(self.classes) != want or len(set(self.classes)) != want:
                raise ConfigError(f"a synthetic {self.kind} cohort needs {want} distinct class names, got {list(self.classes)}")
        if self.n_slides < 2:
            raise ConfigError(f"n_slides must be at least 2, got {self.n_slides}")
        if self.width < 512 or self.height < 512:
            raise ConfigError(f"slides must be at least 512 x 512 px, got {self.width} x {self.height}")
        if not self.mpp > 0:
            raise ConfigError(f"mpp must be positive, got {self.mpp}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"jpeg_quality must be within 1..100, got {self.jpeg_quality}")

    @property
    def mask_downsample(self) -> int:
        """Level-0 pixels per mask pixel: 16, or coarser for huge slides (masks stay <= ~2.5k px)."""
        ds = 16
        while max(self.width, self.height) / ds > 2560:
            ds *= 2
        return ds


@dataclass(frozen=True)
class Morphology:
    """How the nuclei of one region look (radii in microns, density in nuclei per 100x100 um)."""

    radius_um: float
    aspect: float  # major / minor axis
    density: float
    darkness: float  # 0..1 blend towards hematoxylin


NORMAL = Morphology(radius_um=2.6, aspect=1.1, density=7.0, darkness=0.55)


@dataclass(frozen=True)
class SlidePlan:
    slide_id: str
    patient_id: str
    label: int | None
    score: float  # latent morphology score in [0, 1] (survival), or label-derived
    lesion: Morphology | None
    n_lesions: int
    lesion_fraction: float  # share of the tissue covered by lesions (before clipping to tissue)
    seed: int
    recorded_label: int | None = None  # the label written to labels.csv when label noise changed it


# --- cohort plan ---------------------------------------------------------------------------


def _planted(spec: SyntheticSpec, label: int | None, score: float) -> tuple[Morphology | None, int, float]:
    """`_lesion_morphology` with the spec's witness rate and lesion contrast applied."""
    morph, n_lesions, frac = _lesion_morphology(spec.kind, label, score)
    if morph is None:
        return morph, n_lesions, frac
    if spec.witness_rate is not None:
        top = {"subtyping": 0.10, "grading": 0.03 + 0.035 * 5, "survival": 0.05 + 0.12}[spec.kind]
        frac = spec.witness_rate * frac / top  # the kind's schedule, rescaled so its top equals the knob
    if spec.lesion_contrast is not None:
        c = spec.lesion_contrast  # nuclei blended from normal tissue's (0) to the lesion's (1)
        morph = Morphology(*(n + c * (m - n) for n, m in zip(
            (NORMAL.radius_um, NORMAL.aspect, NORMAL.density, NORMAL.darkness),
            (morph.radius_um, morph.aspect, morph.density, morph.darkness))))
    return morph, n_lesions, frac


def _lesion_morphology(kind: str, label: int | None, score: float) -> tuple[Morphology | None, int, float]:
    """Lesion nuclei, number of lesions and the share of the tissue they cover, for one slide."""
    if kind == "subtyping":
        if label == 0:  # IDC-like: large, round, crowded
            return Morphology(radius_um=5.0, aspect=1.15, density=14.0, darkness=0.85), 3, 0.10
        return Morphology(radius_um=2.8, aspect=2.6, density=11.0, darkness=0.95), 3, 0.10  # ILC-like: small, elongated
    if kind == "grading":
        g = int(label or 0)
        if g == 0:
            return None, 0, 0.0
        morph = Morphology(radius_um=2.8 + 0.55 * g, aspect=1.1 + 0.12 * g, density=6.0 + 2.0 * g, darkness=0.6 + 0.07 * g)
        return morph, 1 + (g + 1) // 2, 0.03 + 0.035 * g
    # survival: severity and extent follow the latent score
    morph = Morphology(radius_um=2.8 + 3.0 * score, aspect=1.1 + 0.8 * score, density=6.0 + 9.0 * score,
                       darkness=0.6 + 0.35 * score)
    return morph, 2 + int(round(2 * score)), 0.05 + 0.12 * score


def plan_cohort(spec: SyntheticSpec) -> tuple[list[SlidePlan], dict[str, tuple[float, int]]]:
    """Labels, patients and lesion morphology of every slide; survival outcomes per patient."""
    rng = np.random.default_rng([spec.seed, 0x5EED])
    plans: list[SlidePlan] = []
    outcomes: dict[str, tuple[float, int]] = {}
    if spec.kind in ("subtyping", "grading"):
        if spec.kind == "subtyping":
            n_minority = max(2, int(round(spec.n_slides * spec.minority_fraction)))  # default ~4:1 like TCGA-BRCA
            labels = np.array([0] * (spec.n_slides - n_minority) + [1] * n_minority)
        else:
            labels = np.arange(spec.n_slides) % 6
        labels = rng.permutation(labels)
        patient = 0
        i = 0
        while i < spec.n_slides:
            # ~15% of patients contribute two slides of the same label: splits must keep them together
            n = 2 if (i + 1 < spec.n_slides and labels[i + 1] == labels[i] and rng.random() < 0.15) else 1
            for k in range(n):
                label = int(labels[i + k])
                morph, n_les, frac = _planted(spec, label, 0.0)
                plans.append(SlidePlan(f"S{i + k:04d}", f"P{patient:04d}", label, float(label), morph, n_les, frac,
                                       int(rng.integers(2**31))))
            i += n
            patient += 1
        return _with_label_noise(spec, plans), outcomes
    # survival: patients with 1-3 slides
    i = patient = 0
    scores = []
    while i < spec.n_slides:
        n = int(min(rng.choice([1, 1, 2, 3]), spec.n_slides - i)) or 1
        score = float(rng.random())
        scores.append(score)
        pid = f"P{patient:04d}"
        for k in range(n):
            morph, n_les, frac = _planted(spec, None, score)
            plans.append(SlidePlan(f"S{i + k:04d}", pid, None, score, morph, n_les, frac, int(rng.integers(2**31))))
        i += n
        patient += 1
    s = np.asarray(scores)
    # event time ~ Exponential(rate = lambda0 * exp(beta * score)), months
    beta = 2.5 if spec.hazard_strength is None else spec.hazard_strength
    rate = 0.02 * np.exp(beta * s)
    event_time = rng.exponential(1.0 / rate)
    # censoring: a random 40% of patients (independent of the score) are lost to follow-up at a
    # uniform time before their event, so the censored share is 40% exactly, within the 30-50% asked for
    censored = np.zeros(s.size, dtype=bool)
    censored[rng.permutation(s.size)[: int(round(0.4 * s.size))]] = True
    observed = np.where(censored, event_time * rng.uniform(0.1, 0.95, size=s.size), event_time)
    for p in range(s.size):
        outcomes[f"P{p:04d}"] = (round(float(observed[p]), 2) + 0.01, int(not censored[p]))
    return plans, outcomes


def _with_label_noise(spec: SyntheticSpec, plans: list[SlidePlan]) -> list[SlidePlan]:
    """Record another class for a `label_noise` share of the patients (all their slides); the lesions keep
    the true class. Its own random stream: without noise the plan is that of a spec without the knob."""
    if not spec.label_noise:
        return plans
    from dataclasses import replace

    rng = np.random.default_rng([spec.seed, 0x401E])
    patients = sorted({p.patient_id for p in plans})
    flipped = set(rng.permutation(patients)[: int(round(spec.label_noise * len(patients)))])
    n_classes = 2 if spec.kind == "subtyping" else 6
    shift = {pid: int(rng.integers(1, n_classes)) for pid in sorted(flipped)}
    return [replace(p, recorded_label=(int(p.label) + shift[p.patient_id]) % n_classes)  # type: ignore[arg-type]
            if p.patient_id in flipped else p for p in plans]


# --- geometry maps at mask resolution --------------------------------------------------------


def _ellipse(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float, angle: float = 0.0) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    c, s = math.cos(angle), math.sin(angle)
    u = (xx - cx) * c + (yy - cy) * s
    v = -(xx - cx) * s + (yy - cy) * c
    return (u / max(rx, 1e-6)) ** 2 + (v / max(ry, 1e-6)) ** 2


def make_maps(spec: SyntheticSpec, plan: SlidePlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tissue mask, lesion mask and stroma texture at `mask_downsample` (level-0 / ds)."""
    from scipy import ndimage

    from bench.data.tiling import TissueParams, _drop_small

    ds = spec.mask_downsample
    h, w = math.ceil(spec.height / ds), math.ceil(spec.width / ds)
    um_per_px = ds * spec.mpp
    rng = np.random.default_rng([plan.seed, 1])
    noise = ndimage.gaussian_filter(rng.normal(size=(h, w)), sigma=max(w, h) / 14)
    noise /= np.abs(noise).max() + 1e-9
    envelope = np.full((h, w), np.inf, dtype=np.float32)
    for _ in range(int(rng.integers(1, 4))):
        env = _ellipse((h, w), rng.uniform(0.35, 0.65) * h, rng.uniform(0.3, 0.7) * w,
                       rng.uniform(0.28, 0.42) * h, rng.uniform(0.22, 0.36) * w, rng.uniform(0, math.pi))
        envelope = np.minimum(envelope, env)
    tissue = (1.0 - envelope + 0.45 * noise) > 0.25
    # keep the border clear so tissue never touches the slide edge (like a real section)
    margin = max(2, int(0.03 * min(h, w)))
    tissue[:margin], tissue[-margin:], tissue[:, :margin], tissue[:, -margin:] = False, False, False, False
    defaults = TissueParams()
    tissue = _drop_small(tissue, defaults.min_tissue_area_um2 / um_per_px**2)
    # holes (lumens/fat): relative to the slide, but never below the size tiling keeps out of the tissue
    r_min = 1.5 * math.sqrt(defaults.min_hole_area_um2 / math.pi) / um_per_px
    for _ in range(int(rng.integers(1, 4))):
        r = max(r_min, rng.uniform(0.035, 0.07) * min(h, w))
        ys, xs = np.nonzero(ndimage.binary_erosion(tissue, iterations=int(2 * r) + 2))
        if not ys.size:
            break
        k = int(rng.integers(ys.size))
        tissue &= _ellipse((h, w), ys[k], xs[k], r, r * rng.uniform(0.6, 1.0), rng.uniform(0, math.pi)) > 1.0
    tissue = _drop_small(tissue, defaults.min_tissue_area_um2 / um_per_px**2)
    ys, xs = np.nonzero(tissue)
    blobs = []  # (cy, cx, radius, aspect, angle) of each lesion
    for _ in range(plan.n_lesions if ys.size else 0):
        k = int(rng.integers(ys.size))
        # lesion size relative to the tissue, so small demo slides keep lesions a minority
        r = math.sqrt(plan.lesion_fraction * ys.size / plan.n_lesions / math.pi) * rng.uniform(0.8, 1.2)
        aspect = rng.uniform(0.5, 1.0)
        blobs.append((ys[k], xs[k], r, aspect, rng.uniform(0, math.pi)))

    def lesions(scale: float) -> np.ndarray:
        out = np.zeros_like(tissue)
        for cy, cx, r, aspect, angle in blobs:
            rs = r * scale
            out |= (_ellipse((h, w), cy, cx, rs / math.sqrt(aspect), rs * math.sqrt(aspect), angle) + 0.3 * noise) < 1.0
        return out & tissue

    lesion = lesions(1.0)
    if spec.witness_rate is not None and blobs:
        # a planted witness rate is a measured one: grow or shrink the lesions (same centres and shapes) until
        # their share of the tissue matches it (overlaps and the tissue border make the nominal size fall short)
        target, scale = plan.lesion_fraction, 1.0
        for _ in range(8):
            got = lesion.sum() / max(tissue.sum(), 1)
            if abs(got - target) <= 0.02 * target:
                break
            scale *= math.sqrt(target / max(got, 1e-6))
            lesion = lesions(scale)
    texture = 0.94 + 0.08 * ndimage.gaussian_filter(rng.normal(size=(h, w)), sigma=2.0) / 0.2
    return tissue, lesion, np.clip(texture, 0.85, 1.05).astype(np.float32)


# --- tile rendering ----------------------------------------------------------------------------


def _stamp(radius_px: float, aspect: float, angle: float) -> np.ndarray:
    """A soft-edged elliptical nucleus of opacity 0..1."""
    ry = max(radius_px / math.sqrt(aspect), 0.8)
    rx = ry * aspect
    half = int(math.ceil(max(rx, ry))) + 1
    d = _ellipse((2 * half + 1, 2 * half + 1), half, half, ry, rx, angle)
    return np.clip(1.5 - np.sqrt(d) * 1.2, 0.0, 1.0).astype(np.float32) ** 0.7


class TileRenderer:
    """Renders level-0 tiles of one slide deterministically from (seed, tile row, tile col).

    The pixels are a pure function of the seed and the tile position; the fast paths
    below (cached nucleus centres, float32 where it rounds the same, blending only the
    pixels a nucleus touches) leave every byte as the straightforward computation
    would, which tests/bench/test_synthetic.py pins.
    """

    def __init__(self, spec: SyntheticSpec, plan: SlidePlan, tissue: np.ndarray, lesion: np.ndarray,
                 texture: np.ndarray) -> None:
        self.spec, self.plan = spec, plan
        self.tissue, self.lesion, self.texture = tissue, lesion, texture
        self.ds = spec.mask_downsample
        rng = np.random.default_rng([plan.seed, 2])
        mpp = spec.mpp
        self.kinds: list[tuple[Morphology, list[np.ndarray]]] = []
        for morph in [NORMAL] + ([plan.lesion] if plan.lesion is not None else []):
            angles = rng.uniform(0, math.pi, size=3) if morph.aspect > 1.3 else [0.0]
            self.kinds.append((morph, [_stamp(morph.radius_um / mpp, morph.aspect, a) for a in angles]))
        self.margin = max(s.shape[0] for _, stamps in self.kinds for s in stamps)
        self._point_cache: dict[tuple[int, int], list[np.ndarray]] = {}

    def _points(self, ty: int, tx: int) -> list[np.ndarray]:
        """Nucleus centres (level-0 y, x) of each kind inside tile (ty, tx), region-filtered.

        Each tile's centres are drawn once: a tile is stamped by its own render and its
        eight neighbours' (nuclei cross tile borders), and tiles come in row-major order,
        so rows above the previous one are dropped from the cache.
        """
        cached = self._point_cache.get((ty, tx))
        if cached is not None:
            return cached
        out = []
        area_um2 = (TILE * self.spec.mpp) ** 2
        for k, (morph, _) in enumerate(self.kinds):
            rng = np.random.default_rng([self.plan.seed, 3, ty + 1, tx + 1, k])  # +1: neighbours of row 0 are row -1
            n = rng.poisson(morph.density * area_um2 / 1e4)
            pts = rng.uniform(0, TILE, size=(n, 2)) + np.array([ty * TILE, tx * TILE])
            my = np.clip((pts[:, 0] // self.ds).astype(int), 0, self.tissue.shape[0] - 1)
            mx = np.clip((pts[:, 1] // self.ds).astype(int), 0, self.tissue.shape[1] - 1)
            region = self.lesion if k > 0 else self.tissue & ~self.lesion
            out.append(pts[region[my, mx]])
        if len(self._point_cache) > 4096:
            self._point_cache = {key: v for key, v in self._point_cache.items() if key[0] >= ty - 2}
        self._point_cache[(ty, tx)] = out
        return out

    def _texture(self, y0: int, x0: int) -> np.ndarray:
        """Stroma texture (TILE, TILE) float32, bilinear from the mask grid (pixel centres aligned).

        The same arithmetic as `scipy.ndimage.map_coordinates(order=1, mode="nearest")`
        (float64 products source x row weight x column weight, the four corners summed in
        the same order), but separable: columns are resampled once per corner, then rows
        are gathered whole, which is twice as fast.
        """
        h, w = self.texture.shape
        fy = (np.arange(y0, y0 + TILE) + 0.5) / self.ds - 0.5
        fx = (np.arange(x0, x0 + TILE) + 0.5) / self.ds - 0.5
        iy, ix = np.floor(fy).astype(np.int64), np.floor(fx).astype(np.int64)
        wy, wx = (1.0 - (fy - iy), fy - iy), (1.0 - (fx - ix), fx - ix)
        rows = (np.clip(iy, 0, h - 1), np.clip(iy + 1, 0, h - 1))
        cols = (np.clip(ix, 0, w - 1), np.clip(ix + 1, 0, w - 1))
        r0, r1 = int(rows[0][0]), int(rows[1][-1]) + 1  # the mask rows this tile reads
        total = np.zeros((TILE, TILE), dtype=np.float64)
        term = np.empty((TILE, TILE), dtype=np.float64)
        strips = [self.texture[r0:r1, c].astype(np.float64) for c in cols]  # (rows read, TILE) per corner column
        for a in (0, 1):
            for b in (0, 1):
                np.take(strips[b], rows[a] - r0, axis=0, out=term)
                term *= wy[a][:, None]
                term *= wx[b]
                total += term
        return total.astype(np.float32)

    def render(self, ty: int, tx: int) -> np.ndarray:
        """Level-0 tile (TILE, TILE, 3) uint8 at tile row `ty`, column `tx`.

        Colours are computed channel-first ((3, TILE, TILE): numpy is slow on a trailing
        axis of 3) and every value goes through the same float32/float64 operations in the
        same order as a per-pixel formula would, so the bytes do not depend on the layout.
        """
        y0, x0 = ty * TILE, tx * TILE
        ys = np.minimum((np.arange(y0, y0 + TILE) // self.ds), self.tissue.shape[0] - 1)
        xs = np.minimum((np.arange(x0, x0 + TILE) // self.ds), self.tissue.shape[1] - 1)
        tissue = self.tissue[np.ix_(ys, xs)]  # (TILE, TILE) bool
        rng = np.random.default_rng([self.plan.seed, 4, ty, tx])
        noise = rng.normal(0, 2.0, size=(TILE, TILE)).astype(np.float32)  # one value for the 3 channels
        if not tissue.any():
            img = _BACKGROUND[:, None, None] + noise  # (3, TILE, TILE) float64
            return _to_hwc_uint8(img)
        m = self.margin
        canvas = np.zeros((len(self.kinds), TILE + 2 * m, TILE + 2 * m), dtype=np.float32)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                for k, pts in enumerate(self._points(ty + dy, tx + dx)):
                    stamps = self.kinds[k][1]
                    for j, (py, px) in enumerate(pts):
                        st = stamps[j % len(stamps)]
                        r = st.shape[0] // 2
                        cy, cx = int(py) - y0 + m, int(px) - x0 + m
                        if not (r <= cy < TILE + 2 * m - r and r <= cx < TILE + 2 * m - r):
                            continue
                        view = canvas[k, cy - r: cy + r + 1, cx - r: cx + r + 1]
                        np.maximum(view, st, out=view)
        canvas = canvas[:, m: m + TILE, m: m + TILE]  # (K, TILE, TILE) nucleus opacity per kind
        # stroma x texture in float32: both factors are float32-exact, so the float32 product
        # rounds exactly as a float64 product cast to float32 does
        texture = self._texture(y0, x0)  # (TILE, TILE) float32
        base = np.empty((3, TILE, TILE), dtype=np.float32)
        for c in range(3):
            np.copyto(base[c], np.float32(_STROMA[c]) * texture)
            base[c][~tissue] = np.float32(_BACKGROUND[c])
        img = base.astype(np.float64)  # (3, TILE, TILE)
        # nuclei: alpha-blend towards hematoxylin. Where no nucleus reaches (alpha 0, most
        # pixels) the blend is the identity, so only the touched pixels are computed.
        touched = np.flatnonzero((canvas > 0).any(axis=0))  # flat pixel indices
        if touched.size:
            sub = base.reshape(3, -1)[:, touched]  # (3, n) float32
            for k, (morph, _) in enumerate(self.kinds):
                alpha = canvas[k].reshape(-1)[touched] * morph.darkness  # (n,) float32
                sub = sub * (1 - alpha) + _HEMATOXYLIN[:, None] * alpha  # float64 from the first kind on
            img.reshape(3, -1)[:, touched] = sub
        img += noise
        return _to_hwc_uint8(img)


def _to_hwc_uint8(img: np.ndarray) -> np.ndarray:
    """(3, H, W) float64 colours -> (H, W, 3) uint8, clipped to 0..255 and truncated."""
    np.clip(img, 0, 255, out=img)
    planes = img.astype(np.uint8)
    out = np.empty(planes.shape[1:] + (3,), dtype=np.uint8)
    for c in range(3):  # per-channel copies: 5x faster than one transposing copy
        out[..., c] = planes[c]
    return out


# --- TIFF writing --------------------------------------------------------------------------------


def pyramid_downsamples(width: int, height: int, min_side: int = 512, factor: int = 4) -> list[int]:
    """Downsamples 1, 4, 16, ...: always two levels, more while the longer side stays >= min_side."""
    out = [1, factor]
    while max(width, height) / (out[-1] * factor) >= min_side:
        out.append(out[-1] * factor)
    return out


def _block_mean(arr: np.ndarray, f: int) -> np.ndarray:
    """Mean of f x f blocks of an RGB uint8 image, rounded half up (partial edge blocks dropped).

    PIL's `reduce` computes exactly floor((sum + f*f/2) / (f*f)) in integers, which is
    what a float32 mean + 0.5 truncated gives for uint8 sums, at a tenth of the cost.
    """
    h, w = arr.shape[0] // f * f, arr.shape[1] // f * f
    return np.asarray(Image.fromarray(np.ascontiguousarray(arr[:h, :w])).reduce(f))


def write_pyramidal_tiff(path: str | Path, tiles: Iterator[np.ndarray] | np.ndarray, width: int, height: int,
                         mpp: float, jpeg_quality: int = 90) -> Path:
    """Write a tiled, JPEG-compressed, pyramidal TIFF that OpenSlide opens (generic-tiff).

    Args:
        tiles: a full (height, width, 3) uint8 image, or level-0 tiles of TILE x TILE in
            row-major order covering ceil(height/TILE) x ceil(width/TILE) tiles.
    """
    import tifffile

    path = Path(path)
    ny, nx = math.ceil(height / TILE), math.ceil(width / TILE)
    if isinstance(tiles, np.ndarray):
        image = tiles
        if image.shape != (height, width, 3) or image.dtype != np.uint8:
            raise ConfigError(f"image must be ({height}, {width}, 3) uint8, got {image.shape} {image.dtype}")
        padded = np.full((ny * TILE, nx * TILE, 3), 255, dtype=np.uint8)
        padded[:height, :width] = image
        tiles = (padded[i * TILE:(i + 1) * TILE, j * TILE:(j + 1) * TILE] for i in range(ny) for j in range(nx))
    downs = pyramid_downsamples(width, height)
    f = downs[1] if len(downs) > 1 else 4
    level1 = np.zeros((ny * TILE // f, nx * TILE // f, 3), dtype=np.uint8)
    t1 = TILE // f

    def level0_tiles() -> Iterator[np.ndarray]:
        for idx, tile in enumerate(tiles):
            i, j = divmod(idx, nx)
            level1[i * t1:(i + 1) * t1, j * t1:(j + 1) * t1] = _block_mean(tile, f)
            yield tile

    common = dict(photometric="rgb", compression="jpeg", compressionargs={"level": jpeg_quality},
                  resolutionunit="CENTIMETER", metadata=None)
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=width * height * 3 > 2**31) as tw:
            tw.write(level0_tiles(), shape=(height, width, 3), dtype=np.uint8, tile=(TILE, TILE),
                     resolution=(1e4 / mpp, 1e4 / mpp), subfiletype=0, **common)
            level = level1
            for d in downs[1:]:
                lh, lw = math.ceil(height / d), math.ceil(width / d)
                tw.write(np.ascontiguousarray(level[:lh, :lw]), tile=(TILE, TILE),
                         resolution=(1e4 / (mpp * d), 1e4 / (mpp * d)), subfiletype=1, **common)
                level = _block_mean(level, 4)
    return path


# --- cohort -----------------------------------------------------------------------------------------


def write_slide(spec: SyntheticSpec, plan: SlidePlan, out_dir: Path) -> dict:
    """Render and write one slide and its masks; returns its ground-truth summary."""
    tissue, lesion, texture = make_maps(spec, plan)
    renderer = TileRenderer(spec, plan, tissue, lesion, texture)
    ny, nx = math.ceil(spec.height / TILE), math.ceil(spec.width / TILE)
    tiles = (renderer.render(i, j) for i in range(ny) for j in range(nx))
    write_pyramidal_tiff(out_dir / "slides" / f"{plan.slide_id}.tif", tiles, spec.width, spec.height, spec.mpp,
                         spec.jpeg_quality)
    for name, mask in (("tissue", tissue), ("lesion", lesion)):
        with atomic_path(out_dir / "masks" / f"{plan.slide_id}.{name}.png") as tmp:
            Image.fromarray((mask * 255).astype(np.uint8)).save(tmp, format="PNG")
    return _truth(spec, plan, tissue, lesion)


def _truth(spec: SyntheticSpec, plan: SlidePlan, tissue: np.ndarray, lesion: np.ndarray) -> dict:
    """Ground-truth summary of one slide for cohort.json."""
    ds = spec.mask_downsample
    crop = (slice(0, spec.height // ds), slice(0, spec.width // ds))  # whole mask pixels inside the slide
    return {
        "label": plan.label,
        "patient_id": plan.patient_id,
        "score": plan.score,
        "tissue_area_px": float(tissue[crop].sum()) * ds * ds,
        "tissue_fraction": float(tissue[crop].mean()),
        "lesion_fraction_of_tissue": float(lesion[crop].sum() / max(tissue[crop].sum(), 1)),
        **({"recorded_label": plan.recorded_label} if plan.recorded_label is not None else {}),
    }


def make_cohort(spec: SyntheticSpec, out_dir: str | Path, *, workers: int = 1) -> Path:
    """Write a synthetic cohort to `out_dir` (resumable: finished slides are kept).

    A folder written with other settings is refused rather than mixed.

    Args:
        workers: slides written at once, in threads. numpy, PIL and the JPEG encoder
            release the GIL in the heavy parts, so 2 threads on 2 free cores are about
            1.5x faster; every slide is a function of its own seed, so the bytes are the same.
    """
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"synthetic cohort workers must be a positive integer, got {workers!r}")
    out_dir = Path(out_dir)
    manifest_path = out_dir / "cohort.json"
    # tuples as lists, as read back from cohort.json; knobs left at None are not settings (older cohorts match)
    settings = {k: v for k, v in json.loads(json.dumps(asdict(spec))).items()
                if not (v is None and k in dict((knob, 0) for knob, *_ in KNOBS))}
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old.get("generator") != settings:
            raise CohortSettingsError(
                f"{out_dir} holds a synthetic cohort made with other settings ({old.get('generator')}); "
                "choose another --out folder or delete this one"
            )
        if all((out_dir / "slides" / f"{sid}.tif").exists() for sid in old.get("truth", {})):
            return out_dir
    plans, outcomes = plan_cohort(spec)

    def one(plan: SlidePlan) -> dict:
        slide_file = out_dir / "slides" / f"{plan.slide_id}.tif"
        lesion_png = out_dir / "masks" / f"{plan.slide_id}.lesion.png"
        if slide_file.exists() and lesion_png.exists():
            tissue, lesion, _ = make_maps(spec, plan)  # cheap: recompute the truth summary
            return _truth(spec, plan, tissue, lesion)
        return write_slide(spec, plan, out_dir)

    truth: dict[str, dict] = {}
    bar = progress(total=len(plans), desc=f"synth {spec.kind}", unit="slide")
    executor = None
    try:
        if workers > 1 and len(plans) > 1:
            from concurrent.futures import ThreadPoolExecutor

            executor = ThreadPoolExecutor(min(workers, len(plans)), thread_name_prefix="synth")
            results = executor.map(one, plans)  # in plan order
        else:
            results = map(one, plans)
        for plan, summary in zip(plans, results):
            truth[plan.slide_id] = summary
            bar.update(1)
    finally:
        bar.close()
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    rows = []
    if spec.kind == "survival":
        rows.append("slide_id,patient_id,time,event")
        rows += [f"{p.slide_id},{p.patient_id},{outcomes[p.patient_id][0]},{outcomes[p.patient_id][1]}" for p in plans]
        classes = None
    else:
        rows.append("slide_id,patient_id,label")
        classes = list(spec.classes or (("IDC", "ILC") if spec.kind == "subtyping" else [str(g) for g in range(6)]))
        rows += [f"{p.slide_id},{p.patient_id},{classes[p.label if p.recorded_label is None else p.recorded_label]}"
                 for p in plans]
    write_text_atomic(out_dir / "labels.csv", "\n".join(rows) + "\n")
    write_json_atomic(manifest_path, {
        "name": out_dir.name,
        "kind": spec.kind,
        "task": TASK_OF_KIND[spec.kind],
        "classes": classes,
        "synthetic": True,
        "mask_downsample": spec.mask_downsample,
        "generator": settings,
        **({"planted": planted_effects(spec)} if planted_effects(spec) else {}),
        "truth": truth,
    })
    return out_dir


PLANTED_EXPECTED = {  # what each knob plants, in words (cohort.json, leaderboards)
    "witness_rate": "the lower, the fewer patches carry the label: mean pooling falls toward chance first, "
                    "attention MIL (instance selection) holds out longer",
    "lesion_contrast": "the lower, the subtler the lesion nuclei: a frozen random-init encoder separates them "
                       "worse, so training the encoder end-to-end helps more",
    "label_noise": "the share of recorded labels that contradict the lesions: every method's ceiling drops to "
                   "about 1 - noise",
    "hazard_strength": "how strongly risk rises with lesion burden: 0 makes every C-index 0.5 in expectation",
}


def planted_effects(spec: SyntheticSpec) -> dict[str, dict[str, Any]]:
    """The knobs a cohort was made with, each with the consequence it plants (written to cohort.json)."""
    return {k: {"value": getattr(spec, k), "expected": PLANTED_EXPECTED[k]}
            for k, *_ in KNOBS if getattr(spec, k) is not None}


# --- ground truth for attention scoring -------------------------------------------------------------


def load_mask(cohort_dir: str | Path, slide_id: str, which: str = "lesion") -> tuple[np.ndarray, int]:
    """(mask bool array, level-0 downsample) of a synthetic slide's ground truth."""
    cohort_dir = Path(cohort_dir)
    manifest = cohort_dir / "cohort.json"
    png = cohort_dir / "masks" / f"{slide_id}.{which}.png"
    if not manifest.exists() or not png.exists():
        raise MissingFileError(f"no {which} mask for slide {slide_id} in {cohort_dir} (only synthetic cohorts have them)")
    meta = json.loads(manifest.read_text())
    if "mask_downsample" not in meta:
        raise DataError(f"{manifest} lacks mask_downsample; regenerate the cohort with `bench synth`")
    return np.asarray(Image.open(png)) > 127, int(meta["mask_downsample"])


def mask_fraction(mask: np.ndarray, downsample: int, coords: np.ndarray, patch_size_level0: int) -> np.ndarray:
    """Fraction of each patch (level-0 top-left `coords`, side `patch_size_level0`) covered by `mask`."""
    from bench.data.tiling import TissueMask, tissue_fractions

    return tissue_fractions(TissueMask(mask=mask, downsample=float(downsample), threshold=0.0), coords,
                            patch_size_level0)
