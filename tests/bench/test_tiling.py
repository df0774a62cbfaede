"""Tissue segmentation and patch grids on synthetic slides with known truth."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

from bench.errors import DataError
from bench.synthetic import load_mask, write_pyramidal_tiff
from bench.tiling import (
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
