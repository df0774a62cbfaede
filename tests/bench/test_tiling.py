"""Tissue segmentation and patch grids on synthetic slides with known truth."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

from bench.common.errors import ConfigError, DataError
from bench.data.synthetic import load_mask, write_pyramidal_tiff
from bench.data.tiling import (
    SlideJob,
    TileParams,
    otsu_threshold,
    patch_grid,
    read_coords,
    tile_slide,
    tile_slides,
    tissue_fractions,
    TissueMask,
)


def test_otsu_separates_two_modes():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(30, 5, 5000), rng.normal(150, 10, 3000)]).clip(0, 255).astype(np.uint8)
    t = otsu_threshold(values)
    hist = np.bincount(values, minlength=256)
    assert hist[int(t)] == 0 and 60 < t < 110  # in the middle of the empty gap between the modes
    # brute force: Otsu's threshold maximises the between-class variance
    def between(th):
        a, b = values[values <= th].astype(float), values[values > th].astype(float)
        return a.size * b.size * (a.mean() - b.mean()) ** 2 if a.size and b.size else -1
    assert between(t) == pytest.approx(max(between(th) for th in range(256)))


def test_patch_grid_counts_full_patches_only():
    grid = patch_grid(1000, 600, 256)
    assert len(grid) == 3 * 2
    assert grid.max(axis=0).tolist() == [512, 256]
    assert len(patch_grid(1000, 600, 256, overlap=0.5)) == 6 * 3  # step 128: x 0..744, y 0..344
    assert len(patch_grid(100, 100, 256)) == 0


def test_tissue_fractions_against_counting():
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:6, 3:5] = True
    tm = TissueMask(mask=mask, downsample=4.0, threshold=0)
    coords = np.array([[12, 8], [0, 0], [12, 16]])  # level 0; one mask pixel = 4 level-0 px
    fr = tissue_fractions(tm, coords, 8)  # 2x2 mask pixels per patch
    assert fr.tolist() == [1.0, 0.0, 1.0]
    assert tissue_fractions(tm, np.array([[8, 8]]), 8).tolist() == [0.5]


@pytest.mark.parametrize("kind", ["subtyping", "grading"])
def test_tissue_area_matches_generator_truth(synthetic_cohort, tmp_path, kind):
    root = synthetic_cohort(kind, n_slides=6)
    truth = json.loads((root / "cohort.json").read_text())["truth"]
    for slide_id, t in truth.items():
        r = tile_slide(root / "slides" / f"{slide_id}.tif", tmp_path, TileParams(magnification=10, patch_size=128))
        true_mm2 = t["tissue_area_px"] * 0.5**2 / 1e6
        assert r.tissue_area_mm2 == pytest.approx(true_mm2, rel=0.03), slide_id


def test_coords_file_contents(synthetic_cohort, tmp_path):
    root = synthetic_cohort("subtyping", n_slides=6)
    params = TileParams(magnification=10, patch_size=128, tissue_threshold=0.5)
    r = tile_slide(root / "slides" / "S0000.tif", tmp_path, params)
    c = read_coords(r.coords_path)
    assert len(c) == r.n_patches > 0
    assert (c.patch_size, c.patch_size_level0, c.target_magnification) == (128, 256, 10.0)
    assert c.level0_magnification == pytest.approx(20.0) and c.mpp == pytest.approx(0.5)
    assert c.level == 0 and c.read_size == 256
    assert (c.coords % 256 == 0).all() and (c.coords[:, 0] + 256 <= 1024).all() and (c.coords[:, 1] + 256 <= 768).all()
    assert (c.tissue >= 0.5).all()
    # kept patches lie on the generator's tissue
    mask, ds = load_mask(root, "S0000", "tissue")
    true_fr = tissue_fractions(TissueMask(mask, float(ds), 0), c.coords, 256)
    assert np.abs(true_fr - c.tissue).max() < 0.1  # the thumbnail estimate matches the generator's truth
    with h5py.File(r.coords_path) as f:  # CLAM reads dataset attrs, TRIDENT file attrs
        for key in ("patch_size", "patch_size_level0", "target_magnification", "level0_magnification"):
            assert key in f["coords"].attrs and key in f.attrs
    assert r.qc_path.exists() and r.qc_path.stat().st_size > 1000


def test_rerun_is_skipped_and_params_change_retiles(synthetic_cohort, tmp_path):
    root = synthetic_cohort("subtyping", n_slides=6)
    slide = root / "slides" / "S0001.tif"
    first = tile_slide(slide, tmp_path, TileParams(magnification=20, patch_size=128))
    mtime = os.stat(first.coords_path).st_mtime_ns
    again = tile_slide(slide, tmp_path, TileParams(magnification=20, patch_size=128))
    assert again.skipped and os.stat(first.coords_path).st_mtime_ns == mtime
    changed = tile_slide(slide, tmp_path, TileParams(magnification=20, patch_size=128, tissue_threshold=0.7))
    assert not changed.skipped and read_coords(changed.coords_path).attrs["tissue_threshold"] == 0.7
    assert (read_coords(changed.coords_path).tissue >= 0.7).all() and changed.n_patches <= first.n_patches


def test_damaged_coords_file_is_redone(synthetic_cohort, tmp_path):
    root = synthetic_cohort("subtyping", n_slides=6)
    slide = root / "slides" / "S0002.tif"
    first = tile_slide(slide, tmp_path, TileParams(magnification=10, patch_size=128))
    first.coords_path.write_bytes(b"garbage")
    again = tile_slide(slide, tmp_path, TileParams(magnification=10, patch_size=128))
    assert not again.skipped and len(read_coords(again.coords_path)) == first.n_patches


def test_blank_slide_and_bad_files_are_skipped_and_reported(synthetic_cohort, tmp_path):
    root = synthetic_cohort("subtyping", n_slides=6)
    blank = tmp_path / "blank.tif"
    write_pyramidal_tiff(blank, np.full((768, 1024, 3), 243, dtype=np.uint8), 1024, 768, mpp=0.5)
    fake = tmp_path / "fake.svs"
    fake.write_text("not a slide")
    cut = tmp_path / "cut.tif"
    data = (root / "slides" / "S0003.tif").read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match="no tissue"):
        tile_slide(blank, tmp_path / "one", TileParams(magnification=10, patch_size=128))
    jobs = [SlideJob("blank", blank), SlideJob("fake", fake), SlideJob("cut", cut),
            SlideJob("S0000", root / "slides" / "S0000.tif")]
    out = tmp_path / "tiles"
    report = tile_slides(jobs, out, TileParams(magnification=10, patch_size=128))
    assert [r.slide_id for r in report.done] == ["S0000"]
    assert {s for s, _ in report.skipped} == {"blank", "fake", "cut"}
    lines = (out / "skipped.csv").read_text().splitlines()
    assert lines[0] == "slide_id,reason" and len(lines) == 4
    assert sorted(p.name for p in out.glob("*.h5")) == ["S0000.h5"]  # nothing half-written
    stamps = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = tile_slides(jobs, out, TileParams(magnification=10, patch_size=128))
    assert again.skipped == report.skipped and [r.skipped for r in again.done] == [True]
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps  # rerun: no file touched


def test_reads_clam_style_coords(tmp_path):
    path = tmp_path / "clam.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("coords", data=np.array([[0, 0], [512, 0]], dtype=np.int64))
        ds.attrs["patch_level"] = 0
        ds.attrs["patch_size"] = 512
        ds.attrs["patch_size_level0"] = 512
    c = read_coords(path)
    assert len(c) == 2 and c.level == 0 and c.patch_size == 512 and c.read_size == 512


def test_coords_without_attrs_is_refused(tmp_path):
    path = tmp_path / "bare.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("coords", data=np.zeros((3, 2), dtype=np.int64))
    with pytest.raises(DataError, match="patch_size"):
        read_coords(path)


# --- fast paths: same masks as scipy, same files for one or several targets -----------------


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7])
def test_square_closing_and_opening_equal_scipy(size):
    from scipy import ndimage

    from bench.data.tiling import binary_closing_square, binary_opening_square

    rng = np.random.default_rng(size)
    for trial in range(40):
        h, w = rng.integers(1, 60, size=2)
        mask = ndimage.gaussian_filter(rng.random((h, w)), 1.5) > rng.uniform(0.3, 0.7) if trial % 2 else \
            rng.random((h, w)) < rng.uniform(0.1, 0.9)
        square = np.ones((size, size))
        assert np.array_equal(binary_closing_square(mask, size),
                              ndimage.binary_closing(mask, structure=square, border_value=0))
        assert np.array_equal(binary_opening_square(mask, size), ndimage.binary_opening(mask, structure=square))


def test_cross_erosion_equals_scipy():
    from scipy import ndimage

    from bench.data.tiling import erode_cross

    rng = np.random.default_rng(0)
    for _ in range(30):
        mask = rng.random(tuple(rng.integers(1, 50, size=2))) < 0.8
        for it in (1, 2, 3):
            assert np.array_equal(erode_cross(mask, it), ndimage.binary_erosion(mask, iterations=it))


def _reference_tissue_mask(thumb, ds, mpp, params):
    """The tissue mask written with scipy's generic morphology, as the fast path must reproduce."""
    from PIL import Image, ImageFilter
    from scipy import ndimage

    from bench.data.tiling import _drop_small

    sat = np.asarray(Image.fromarray(thumb).convert("HSV").getchannel("S").filter(
        ImageFilter.MedianFilter(params.median_size | 1)))
    mask = sat > max(otsu_threshold(sat), float(params.min_saturation))
    mask = ndimage.binary_closing(mask, structure=np.ones((params.close_size,) * 2), border_value=0)
    mask = ndimage.binary_opening(mask, structure=np.ones((params.open_size,) * 2))
    um2 = (ds * mpp) ** 2
    mask = _drop_small(mask, params.min_tissue_area_um2 / um2)
    holes = ndimage.binary_fill_holes(mask) & ~mask
    return mask | _drop_small(holes, params.min_hole_area_um2 / um2, keep_small=True)


def test_tissue_mask_equals_scipy_reference(synthetic_cohort):
    from bench.data.slides import open_slide
    from bench.data.tiling import TissueParams, tissue_mask

    root = synthetic_cohort("subtyping", n_slides=6)
    settings = [TissueParams(), TissueParams(min_hole_area_um2=60_000, close_size=7, open_size=5),
                TissueParams(close_size=4, open_size=2, thumbnail_max_side=300)]
    for slide_id in ("S0000", "S0003"):
        with open_slide(root / "slides" / f"{slide_id}.tif") as s:
            for params in settings:
                thumb, ds = s.thumbnail(params.thumbnail_max_side)
                got = tissue_mask(thumb, ds, s.mpp, params).mask
                assert np.array_equal(got, _reference_tissue_mask(thumb, ds, s.mpp, params)), (slide_id, params)
    # a ring of tissue: the large lumen stays out, a pin-hole is filled, the outside is not a hole
    ring = np.full((200, 200, 3), 240, dtype=np.uint8)
    yy, xx = np.mgrid[:200, :200]
    r = np.hypot(yy - 100, xx - 100)
    ring[(r < 80) & (r > 40)] = (200, 80, 160)
    ring[100, 25] = 240  # pin-hole in the tissue
    params = TissueParams(median_size=1, close_size=1, open_size=1)
    mask = tissue_mask(ring, 4.0, 0.5, params).mask
    assert np.array_equal(mask, _reference_tissue_mask(ring, 4.0, 0.5, params))
    assert mask[100, 25] and not mask[100, 100] and not mask[0, 0]


def test_multi_target_tiling_equals_one_target_at_a_time(synthetic_cohort, tmp_path, monkeypatch):
    from bench.data.slides import Slide
    from bench.data.tiling import tile_slides_multi

    root = synthetic_cohort("subtyping", n_slides=6)
    jobs = [SlideJob(f"S000{i}", root / "slides" / f"S000{i}.tif") for i in range(3)]
    params = [TileParams(magnification=20, patch_size=128), TileParams(magnification=10, patch_size=128),
              TileParams(magnification=5, patch_size=512)]  # 512 px at 5x: 2048 level-0 px, larger than the slide
    for p in params:
        tile_slides(jobs, tmp_path / "single" / f"{p.magnification:g}", p)
    reads = []
    thumbnail = Slide.thumbnail
    monkeypatch.setattr(Slide, "thumbnail", lambda self, *a, **k: reads.append(self.name) or thumbnail(self, *a, **k))
    for workers in (1, 2):
        out = tmp_path / f"multi{workers}"
        reads.clear()
        reports = tile_slides_multi(jobs, [(p, out / f"{p.magnification:g}") for p in params], workers=workers)
        assert sorted(reads) == ["S0000", "S0001", "S0002"]  # one thumbnail and mask per slide for all targets
        assert [len(r.done) for r in reports] == [3, 3, 0]
        assert all("smaller than one patch" in why for _, why in reports[2].skipped)  # its own skip reason
        for p in params[:2]:
            for job in jobs:
                a = read_coords(tmp_path / "single" / f"{p.magnification:g}" / f"{job.slide_id}.h5")
                b = read_coords(out / f"{p.magnification:g}" / f"{job.slide_id}.h5")
                assert np.array_equal(a.coords, b.coords) and np.array_equal(a.tissue, b.tissue)
                assert a.attrs.keys() == b.attrs.keys()
                assert all(np.array_equal(a.attrs[k], b.attrs[k]) for k in a.attrs)
        assert (out / "5" / "skipped.csv").exists() and not (out / "20" / "skipped.csv").exists()
    with pytest.raises(ConfigError, match="workers"):
        tile_slides_multi(jobs, [(params[0], tmp_path / "x")], workers=0)


def test_qc_thumbnail_shows_contour_and_patches(synthetic_cohort, tmp_path):
    from PIL import Image

    root = synthetic_cohort("subtyping", n_slides=6)
    r = tile_slide(root / "slides" / "S0004.tif", tmp_path, TileParams(magnification=10, patch_size=128))
    qc = np.asarray(Image.open(r.qc_path).convert("RGB"))
    assert qc.shape == (768, 1024, 3)  # the thumbnail's size: 1024 px on the longer side
    colours = {tuple(c) for c in qc.reshape(-1, 3)[::7]}
    assert (20, 200, 60) in colours and (40, 90, 220) in colours  # tissue contour, kept-patch outlines


def test_changed_mpp_override_or_slide_file_retiles(synthetic_cohort, tmp_path):
    import shutil

    root = synthetic_cohort("subtyping", n_slides=6)
    slide = tmp_path / "S.tif"
    shutil.copy(root / "slides" / "S0000.tif", slide)
    params = TileParams(magnification=10, patch_size=128)
    first = tile_slide(slide, tmp_path / "t", params)
    assert read_coords(first.coords_path).attrs["slide_bytes"] == slide.stat().st_size
    assert tile_slide(slide, tmp_path / "t", params).skipped
    override = tile_slide(slide, tmp_path / "t", params, mpp=0.4)  # the file said 0.5: coords made anew
    c = read_coords(override.coords_path)
    assert not override.skipped and c.mpp == 0.4 and c.attrs["mpp_source"] == "override"
    assert c.patch_size_level0 == 320 and override.n_patches < first.n_patches
    assert tile_slide(slide, tmp_path / "t", params, mpp=0.4).skipped
    assert not tile_slide(slide, tmp_path / "t", params).skipped  # override removed: the file's own mpp again
    shutil.copy(root / "slides" / "S0001.tif", slide)  # another slide under the same name
    again = tile_slide(slide, tmp_path / "t", params)
    assert not again.skipped and read_coords(again.coords_path).attrs["slide_bytes"] == slide.stat().st_size


def test_a_slide_smaller_than_one_patch_has_its_own_skip_reason(tmp_path):
    # 200 x 150 px at 0.25 um/px (40x): a 256 px patch at 20x spans 512 px at level 0
    small = tmp_path / "small.tif"
    rng = np.random.default_rng(0)
    write_pyramidal_tiff(small, rng.integers(60, 200, (150, 200, 3), dtype=np.uint8), 200, 150, mpp=0.25)
    report = tile_slides([SlideJob("small", small, None)], tmp_path / "out", TileParams(magnification=20.0,
                                                                                       patch_size=256))
    assert report.done == [] and len(report.skipped) == 1
    sid, why = report.skipped[0]
    assert sid == "small" and "smaller than one patch" in why and "200 x 150 px" in why and "512 px" in why


def test_bench_tile_exit_codes_nothing_to_do_is_success_nothing_produced_is_not(synthetic_cohort, tmp_path, capsys):
    from bench.cli.main import main

    root = synthetic_cohort("subtyping", n_slides=6)
    args = ["tile", "--cohort", str(root), "--out", str(tmp_path / "w"), "--patch-size", "128", "--no-qc"]
    assert main([*args, "--magnification", "5"]) == 0
    assert main([*args, "--magnification", "5"]) == 0  # everything up to date: no work, no error
    capsys.readouterr()
    # 4096 px patches at 5x span the whole (small) slide and more: every slide is skipped
    assert main(["tile", "--cohort", str(root), "--out", str(tmp_path / "w"), "--patch-size", "4096",
                 "--magnification", "5", "--no-qc"]) == 1
    err = capsys.readouterr().err
    assert "error: no slide of" in err and "5x/4096px" in err and "skipped.csv" in err
