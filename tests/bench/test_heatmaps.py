"""Attention heatmaps: pixels line up with the coords, the lesion outline sits on the mask, the trainers write
attention.h5 with the rows of the coords files, and `bench heatmap` names what is missing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bench.common.errors import DataError, MissingFileError
from bench.evaluation.heatmaps import (ATTENTION_FILE, LESION_RGB, SlideAttention, SlideGeometry, bag_attention,
                                       heatmaps_for_run, paint_cells, read_attention, render_heatmap,
                                       write_attention)

PS = 100  # patch side at level 0


@pytest.fixture(scope="module")
def white_slide(tmp_path_factory):
    """A plain white 2600 x 1800 pyramidal TIFF: every colour in the heatmap comes from the overlay."""
    from bench.data.synthetic import write_pyramidal_tiff

    path = tmp_path_factory.mktemp("white") / "white.tif"
    write_pyramidal_tiff(path, np.full((1800, 2600, 3), 255, dtype=np.uint8), 2600, 1800, mpp=0.5)
    return path


def _grid(width: int = 2400, height: int = 1800, step: int = PS) -> np.ndarray:
    xs, ys = np.meshgrid(np.arange(0, width - PS + 1, step), np.arange(0, height - PS + 1, step))
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def _cell_box(img, x: int, y: int) -> tuple[int, int, int, int]:
    """PNG pixel bounds (left, top, right, bottom) of the patch at level-0 (x, y)."""
    ds, p = img.downsample, img.panel
    return (p.left + round(x / ds), p.top + round(y / ds), p.left + round((x + PS) / ds),
            p.top + round((y + PS) / ds))


@pytest.mark.parametrize("overlap", [False, True], ids=["grid", "overlapping"])
def test_a_planted_patch_lights_exactly_its_cell(white_slide, tmp_path, overlap):
    coords = _grid(step=PS // 2 if overlap else PS)  # overlapping coords take the per-patch path
    k = int(np.flatnonzero((coords[:, 0] == 1200) & (coords[:, 1] == 700))[0])
    attention = np.zeros(len(coords))
    attention[k] = 1.0
    img = render_heatmap(white_slide, coords, attention, PS, tmp_path / "one.png")
    png = _png(img.path)
    left, top, right, bottom = _cell_box(img, 1200, 700)
    assert right - left >= 10 and bottom - top >= 10
    red = png[..., 0] - png[..., 2]  # jet: the maximum is red, the minimum blue
    inside = red[top + 1:bottom - 1, left + 1:right - 1]
    assert (inside > 40).all()
    # the hot pixels of the main panel are exactly that cell
    p = img.panel
    hot = np.argwhere(red[p.top:p.top + p.height, p.left:p.left + p.width] > 40)
    assert hot[:, 0].min() + p.top == top and hot[:, 0].max() + p.top + 1 == bottom
    assert hot[:, 1].min() + p.left == left and hot[:, 1].max() + p.left + 1 == right
    # other patches are blue, the glass outside every patch keeps the slide's white
    assert (png[top + 5, right + 3, 2] - png[top + 5, right + 3, 0]) > 40
    assert (png[bottom + 3, left + 5, 2] - png[bottom + 3, left + 5, 0]) > 40
    far = png[p.top + p.height // 2, p.left + p.width - 3]  # x > 2400: glass, no patch there
    assert (far >= 250).all()


def test_paint_cells_grid_and_per_patch_paths_agree():
    coords = _grid()
    rng = np.random.default_rng(0)
    order = rng.random(len(coords))
    fast = paint_cells(coords, order, PS, 2.6, (693, 1000))
    slow = paint_cells(np.vstack([coords, coords[:1]]), np.append(order, -1.0), PS, 2.6, (693, 1000))  # a duplicate
    slow[slow == len(coords)] = 0  # the duplicate of row 0 (painted first, then row 0 on top)
    assert (fast == slow).mean() > 0.999  # edges may round one pixel apart
    assert set(np.unique(fast)) == set(range(-1, len(coords)))


def test_lesion_outline_is_drawn_where_the_mask_is(white_slide, tmp_path):
    mask = np.zeros((1800 // 8, 2600 // 8), dtype=bool)  # downsample 8
    mask[50:100, 100:175] = True  # level 0: x 800..1400, y 400..800
    coords = _grid()
    img = render_heatmap(white_slide, coords, np.ones(len(coords)), PS, tmp_path / "lesion.png",
                         lesion_mask=(mask, 8.0))
    png = _png(img.path)
    magenta = (np.abs(png - np.array(LESION_RGB)).sum(axis=-1) < 30)
    p, ds = img.panel, img.downsample
    panel = magenta[p.top:p.top + p.height, p.left:p.left + p.width]
    ys, xs = np.nonzero(panel)
    assert len(ys) > 0
    assert xs.min() == pytest.approx(800 / ds, abs=2) and xs.max() == pytest.approx(1400 / ds, abs=2)
    assert ys.min() == pytest.approx(400 / ds, abs=2) and ys.max() == pytest.approx(800 / ds, abs=2)
    cy, cx = round(600 / ds), round(1100 / ds)
    assert not panel[cy, cx]  # an outline, not a filled region
    assert panel[cy, round(800 / ds) + 1] and panel[round(400 / ds) + 1, cx]
    assert magenta[p.top:p.top + p.height].sum() == panel.sum()  # nowhere else in the rows of the panel


def test_heads_are_a_small_multiple(white_slide, tmp_path):
    coords = _grid()
    heads = np.zeros((3, len(coords)))
    for j in range(3):
        heads[j, j * 7] = 1.0
    img = render_heatmap(white_slide, coords, heads.mean(axis=0), PS, tmp_path / "heads.png", heads=heads)
    assert len(img.head_panels) == 3
    png = _png(img.path)
    for j, panel in enumerate(img.head_panels):
        sub = png[panel.top:panel.top + panel.height, panel.left:panel.left + panel.width]
        hot = np.argwhere(sub[..., 0] - sub[..., 2] > 40)
        x, y = coords[j * 7]
        scale = panel.width / img.thumb_shape[1] / img.downsample
        assert len(hot) and abs(hot[:, 1].min() - x * scale) <= 2 and abs(hot[:, 0].min() - y * scale) <= 2


def test_a_patient_bag_is_split_back_per_slide(tmp_path):
    geo = {"a": SlideGeometry(np.array([[0, 0], [100, 0]]), 100, 10.0, "/x/a.tif"),
           "b": SlideGeometry(np.array([[0, 0], [0, 100], [100, 100]]), 100, 10.0)}
    att = np.array([0.1, 0.2, 0.3, 0.15, 0.25])
    heads = np.vstack([att, att[::-1]])
    slides = bag_attention("patient-1", ["a", "b"], att, heads, geo.__getitem__)
    assert [s.slide_id for s in slides] == ["a", "b"]
    np.testing.assert_allclose(slides[1].attention, [0.3, 0.15, 0.25])
    np.testing.assert_allclose(slides[0].heads[1], [0.25, 0.15])
    write_attention(tmp_path / ATTENTION_FILE, slides, aggregator="abmilx", cohort_root="/c")
    back = read_attention(tmp_path / ATTENTION_FILE)
    assert list(back.slides) == ["a", "b"] and back.attrs["cohort_root"] == "/c"
    assert back.slides["b"].bag_id == "patient-1" and back.slides["a"].slide_path == "/x/a.tif"
    assert back.slides["b"].heads.shape == (2, 3) and back.slides["b"].coords.shape == (3, 2)
    with pytest.raises(DataError, match="patient-1.*5 attention values.*2 \\+ 2"):
        bag_attention("patient-1", ["a", "a"], att, None, geo.__getitem__)


# ----------------------------------------------------------------------------- a trained run

TINY = """
name = "tinymaps"
description = "tiny synthetic suite for attention maps"
seeds = [0]
bootstrap = 50

[defaults.two-stage]
epochs = 2
lr = 1e-3

[[datasets]]
name = "mini"
task = "classification"
classes = ["IDC", "ILC"]
split = { protocol = "holdout", ratios = [0.6, 0.4], val_fraction = 0.25 }
two_stage = { magnification = 10, patch_size = 64, input_size = 32 }
synthetic = { kind = "subtyping", n_slides = 10, width = 1024, height = 768, minority_fraction = 0.5 }

[[methods]]
paradigm = "two-stage"
encoder = "resnet18-trunc"
aggregators = ["abmil", "abmilx", "mean"]
random_init = true
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from bench.orchestration.runner import RunOptions, run_suite
    from bench.orchestration.suite import load_suite

    root = tmp_path_factory.mktemp("maps-suite")
    (root / "tiny.toml").write_text(TINY)
    report = run_suite(load_suite(root / "tiny.toml"), RunOptions(workdir=root / "work", leaderboards=None,
                                                                  extract_workers=0, device="cpu"))
    assert {o.status for o in report.outcomes} == {"ok"}, report.failed
    return root / "work", {o.method.split("/")[-1]: o.run_dir for o in report.outcomes}


def test_a_trained_abmil_run_writes_the_test_slides_attention(trained):
    from bench.data.tiling import read_coords

    work, runs = trained
    run = runs["abmil"]
    maps = read_attention(run / ATTENTION_FILE)
    test = pd.read_csv(run / "predictions.csv", dtype=str)["bag_id"].tolist()
    assert sorted(maps.slides) == sorted(test)  # subtyping bags are slides
    tiles = work / "tiles" / "mini" / "10x-64px"
    for sid, s in maps.slides.items():
        coords = read_coords(tiles / f"{sid}.h5")
        np.testing.assert_array_equal(s.coords, coords.coords)  # row for row the bag the model saw
        assert s.attention.dtype == np.float32 and s.attention.shape == (len(coords),)
        assert s.attention.sum() == pytest.approx(1.0, abs=1e-4) and s.heads is None
        assert s.patch_size_level0 == coords.patch_size_level0 and s.magnification == 10.0
    assert maps.attrs["aggregator"] == "abmil" and maps.attrs["paradigm"] == "two-stage"
    record = json.loads((run / "run.json").read_text())
    assert "attention_maps" not in record["extra"]


def test_abmilx_saves_its_heads_and_mean_pooling_saves_nothing(trained):
    _, runs = trained
    maps = read_attention(runs["abmilx"] / ATTENTION_FILE)
    s = next(iter(maps.slides.values()))
    assert s.heads.shape == (8, len(s)) and s.heads.dtype == np.float32
    np.testing.assert_allclose(s.heads.mean(axis=0), s.attention, rtol=1e-4, atol=1e-7)
    assert not (runs["mean"] / ATTENTION_FILE).exists()
    assert json.loads((runs["mean"] / "run.json").read_text())["status"] == "ok"


def test_bench_heatmap_renders_a_run_and_names_what_is_missing(trained, tmp_path, capsys):
    from bench.cli.main import main

    _, runs = trained
    run = runs["abmilx"]
    first = next(iter(read_attention(run / ATTENTION_FILE).slides))
    assert main(["heatmap", str(run), "--slide", first, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.split()
    assert out == [str(tmp_path / f"{first}.png")]
    png = _png(tmp_path / f"{first}.png")
    assert (np.abs(png - np.array(LESION_RGB)).sum(axis=-1) < 30).any()  # synthetic cohort: lesions outlined

    assert main(["heatmap", str(run), "--slide", "no-such-slide"]) == 2
    err = capsys.readouterr().err
    assert "no-such-slide" in err and first in err
    assert main(["heatmap", str(runs["mean"])]) == 2
    err = capsys.readouterr().err
    assert ATTENTION_FILE in err and "mean" in err and "run.json" in err


def test_heatmaps_for_run_finds_the_cohort_from_the_work_folder(trained, tmp_path):
    _, runs = trained
    run = runs["abmil"]
    paths = heatmaps_for_run(run, tmp_path, max_slides=2)
    assert len(paths) == 2 and all(p.is_file() and p.parent == tmp_path for p in paths)
    with pytest.raises(MissingFileError, match="not a cohort folder"):
        heatmaps_for_run(run, tmp_path, max_slides=1, cohort_root=tmp_path)


def test_suite_heatmaps_show_the_same_slide_for_every_method_and_are_not_redrawn(trained, tmp_path):
    from bench.evaluation.heatmaps import heatmaps_for_suite

    _, runs = trained
    paths = heatmaps_for_suite(list(runs.values()), tmp_path, max_slides=1)
    methods = sorted(p.parent.name for p in paths)
    assert methods == ["two-stage_resnet18-trunc_abmil", "two-stage_resnet18-trunc_abmilx"]  # mean: no maps
    assert len({p.name for p in paths}) == 1 and all(p.parent.parent == tmp_path / "heatmaps" / "mini" for p in paths)
    stamps = [p.stat().st_mtime_ns for p in paths]
    assert heatmaps_for_suite(list(runs.values()), tmp_path, max_slides=1) == paths
    assert [p.stat().st_mtime_ns for p in paths] == stamps


def test_unknown_slide_is_named_with_what_exists(tmp_path):
    slides = [SlideAttention("s1", "s1", np.ones(2, np.float32), np.zeros((2, 2), np.int64), 64, 10.0)]
    write_attention(tmp_path / ATTENTION_FILE, slides)
    (tmp_path / "run.json").write_text(json.dumps({"schema": 1, "dataset": "d", "method": {"name": "m"},
                                                   "split": {"tag": "t"}}))
    with pytest.raises(DataError, match="'s2'.*holds 1: s1"):
        heatmaps_for_run(tmp_path, slides=["s2"])
