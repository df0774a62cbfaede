"""Synthetic cohorts: deterministic, real slides, labels carried by sparse lesions."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from bench.common.errors import ConfigError
from bench.data.slides import open_slide
from bench.data.synthetic import SyntheticSpec, load_mask, make_cohort, mask_fraction, plan_cohort
from bench.data.tiling import TileParams, read_coords, tile_slide


def test_same_seed_same_bytes(tmp_path):
    spec = SyntheticSpec(kind="subtyping", n_slides=2, width=768, height=512, seed=3)
    a, b = make_cohort(spec, tmp_path / "a"), make_cohort(spec, tmp_path / "b")
    for rel in ("labels.csv", "slides/S0000.tif", "slides/S0001.tif", "masks/S0001.lesion.png"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    other = make_cohort(SyntheticSpec(kind="subtyping", n_slides=2, width=768, height=512, seed=4), tmp_path / "c")
    assert (other / "slides/S0000.tif").read_bytes() != (a / "slides/S0000.tif").read_bytes()


def test_settings_mismatch_is_refused(tmp_path):
    make_cohort(SyntheticSpec(kind="subtyping", n_slides=2, width=768, height=512), tmp_path / "x")
    with pytest.raises(ConfigError, match="other settings"):
        make_cohort(SyntheticSpec(kind="grading", n_slides=2, width=768, height=512), tmp_path / "x")


def test_resume_rewrites_only_missing_slides(tmp_path):
    spec = SyntheticSpec(kind="grading", n_slides=3, width=768, height=512)
    root = make_cohort(spec, tmp_path / "r")
    keep = (root / "slides/S0000.tif").stat().st_mtime_ns
    original = (root / "slides/S0002.tif").read_bytes()
    (root / "slides/S0002.tif").unlink()
    (root / "cohort.json").unlink()  # as if killed before the manifest was written
    make_cohort(spec, root)
    assert (root / "slides/S0000.tif").stat().st_mtime_ns == keep
    assert (root / "slides/S0002.tif").read_bytes() == original


def test_slides_open_with_levels_and_mpp(synthetic_cohort):
    root = synthetic_cohort("subtyping", n_slides=6)
    with open_slide(root / "slides" / "S0000.tif") as s:
        assert s.dimensions == (1024, 768)
        assert s.level_count >= 2 and s.level_downsamples[1] == pytest.approx(4.0)
        assert s.mpp == pytest.approx(0.5) and s.mpp_source == "openslide"


def test_subtyping_labels_are_imbalanced_about_four_to_one():
    plans, _ = plan_cohort(SyntheticSpec(kind="subtyping", n_slides=50, seed=1))
    counts = Counter(p.label for p in plans)
    assert counts[0] == 40 and counts[1] == 10
    by_patient: dict[str, set] = {}
    for p in plans:
        by_patient.setdefault(p.patient_id, set()).add(p.label)
    assert all(len(v) == 1 for v in by_patient.values())  # a patient has one label
    assert len(by_patient) < 50  # some patients have two slides


def test_grading_covers_all_grades_and_lesions_grow():
    plans, _ = plan_cohort(SyntheticSpec(kind="grading", n_slides=12))
    assert sorted(Counter(p.label for p in plans)) == [0, 1, 2, 3, 4, 5]
    by_grade = {p.label: p for p in plans}
    assert by_grade[0].lesion is None and by_grade[0].n_lesions == 0
    extents = [by_grade[g].lesion_fraction for g in range(1, 6)]
    radii = [by_grade[g].lesion.radius_um for g in range(1, 6)]
    assert extents == sorted(extents) and radii == sorted(radii)


def test_survival_censoring_and_hazard():
    plans, outcomes = plan_cohort(SyntheticSpec(kind="survival", n_slides=400, seed=2))
    per_patient = Counter(p.patient_id for p in plans)
    assert set(per_patient.values()) <= {1, 2, 3} and max(per_patient.values()) > 1
    events = np.array([e for _, e in outcomes.values()])
    assert 0.3 <= 1 - events.mean() <= 0.5
    score = {p.patient_id: p.score for p in plans}
    times = np.array([outcomes[pid][0] for pid in outcomes])
    s = np.array([score[pid] for pid in outcomes])
    from scipy.stats import spearmanr

    rho = spearmanr(s[events == 1], times[events == 1]).statistic
    assert rho < -0.3  # higher morphology score, earlier event


def test_labels_csv_columns(synthetic_cohort):
    sub = pd.read_csv(synthetic_cohort("subtyping", n_slides=6) / "labels.csv")
    assert list(sub.columns) == ["slide_id", "patient_id", "label"] and set(sub.label) <= {"IDC", "ILC"}
    surv = pd.read_csv(synthetic_cohort("survival", n_slides=6) / "labels.csv")
    assert list(surv.columns) == ["slide_id", "patient_id", "time", "event"]
    assert (surv.time > 0).all() and set(surv.event) <= {0, 1}
    assert surv.groupby("patient_id")[["time", "event"]].nunique().max().max() == 1


def test_lesions_are_a_minority_and_their_morphology_carries_the_label(synthetic_cohort, tmp_path):
    root = synthetic_cohort("subtyping", n_slides=6)
    meta = json.loads((root / "cohort.json").read_text())
    dark = {0: [], 1: []}
    normal = {0: [], 1: []}
    for slide_id, t in meta["truth"].items():
        assert 0 < t["lesion_fraction_of_tissue"] < 0.25
        r = tile_slide(root / "slides" / f"{slide_id}.tif", tmp_path, TileParams(magnification=20, patch_size=64))
        c = read_coords(r.coords_path)
        mask, ds = load_mask(root, slide_id, "lesion")
        frac = mask_fraction(mask, ds, c.coords, c.patch_size_level0)
        with open_slide(root / "slides" / f"{slide_id}.tif") as s:
            for (x, y), f in zip(c.coords, frac):
                if f > 0.9 or f == 0:
                    patch = s.read_patch(int(x), int(y), c.level_choice).astype(float)
                    nuclei = (patch.sum(axis=2) < 400).mean()  # dark purple pixels
                    (dark if f > 0.9 else normal)[t["label"]].append(nuclei)
    # lesions hold many more nucleus pixels than normal tissue, and IDC-like lesions more than ILC-like
    assert np.mean(dark[0]) > 2 * np.mean(normal[0])
    assert np.mean(dark[0]) > 1.5 * np.mean(dark[1])
    # outside lesions the two classes look alike
    assert abs(np.mean(normal[0]) - np.mean(normal[1])) < 0.5 * np.mean(normal[0])


# Digests of every rendered level-0 tile of three 768 x 600 cohorts, taken with the
# first, straightforward renderer (scipy map_coordinates, float64 blending over whole
# tiles, numpy block means). The fast renderer must reproduce them byte for byte:
# changing a synthetic slide changes every downstream result.
RENDER_DIGESTS = {
    ("subtyping", 0): "128de0e4c8d85cfbc0aac6a525cf4462707879d3eaad6e216016df4e84377c07",
    ("grading", 1): "14bcd28e0912af36f19c2d9c199cbfb83b7747df18858accf6df42ebea6ce1ee",
    ("survival", 2): "d16d6740f4684cc64959d7fc351f0b09949d2e7ad7ef80166738cb7c38914295",
}


@pytest.mark.parametrize("kind,seed", list(RENDER_DIGESTS))
def test_rendered_tiles_are_pinned(kind, seed):
    import hashlib
    import math

    from bench.data.synthetic import TileRenderer, _block_mean, make_maps

    spec = SyntheticSpec(kind=kind, n_slides=3, width=768, height=600, seed=seed)
    plans, _ = plan_cohort(spec)
    digest = hashlib.sha256()
    for plan in plans:
        renderer = TileRenderer(spec, plan, *make_maps(spec, plan))
        for i in range(math.ceil(spec.height / 256)):
            for j in range(math.ceil(spec.width / 256)):
                tile = renderer.render(i, j)
                assert tile.dtype == np.uint8 and tile.shape == (256, 256, 3)
                digest.update(tile.tobytes())
        digest.update(_block_mean(np.full((8, 12, 3), 7, np.uint8), 4).tobytes())
    assert digest.hexdigest() == RENDER_DIGESTS[(kind, seed)]


def test_fast_texture_and_block_mean_equal_the_plain_formulas():
    from scipy import ndimage

    from bench.data.synthetic import TILE, TileRenderer, _block_mean, make_maps

    spec = SyntheticSpec(kind="subtyping", n_slides=2, width=1000, height=700, seed=4)
    plan = plan_cohort(spec)[0][0]
    renderer = TileRenderer(spec, plan, *make_maps(spec, plan))
    for y0, x0 in ((0, 0), (256, 512), (512, 768)):  # includes tiles past the mask's edge
        fy = (np.arange(y0, y0 + TILE) + 0.5) / spec.mask_downsample - 0.5
        fx = (np.arange(x0, x0 + TILE) + 0.5) / spec.mask_downsample - 0.5
        gy, gx = np.meshgrid(fy, fx, indexing="ij")
        want = ndimage.map_coordinates(renderer.texture, [gy, gx], order=1, mode="nearest")
        assert np.array_equal(renderer._texture(y0, x0).view(np.int32), want.view(np.int32))
    rng = np.random.default_rng(0)
    for shape in ((256, 256, 3), (70, 45, 3)):
        arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
        h, w = shape[0] // 4 * 4, shape[1] // 4 * 4
        plain = (arr[:h, :w].reshape(h // 4, 4, w // 4, 4, 3).astype(np.float32).mean(axis=(1, 3)) + 0.5)
        assert np.array_equal(_block_mean(arr, 4), plain.astype(np.uint8))


def test_workers_write_the_same_bytes(tmp_path):
    spec = SyntheticSpec(kind="grading", n_slides=3, width=768, height=512, seed=6)
    one, two = make_cohort(spec, tmp_path / "a" / "c"), make_cohort(spec, tmp_path / "b" / "c", workers=2)
    for rel in ("labels.csv", "cohort.json", *(f"slides/S000{i}.tif" for i in range(3)), "masks/S0002.lesion.png"):
        assert (one / rel).read_bytes() == (two / rel).read_bytes(), rel
    with pytest.raises(ConfigError, match="workers"):
        make_cohort(spec, tmp_path / "three", workers=0)
