"""Resolution on every slide: implausible or screen-default mpp refused with the override named; mpp, its source
and the level in every coords file and in the tiling's qc.csv."""

from __future__ import annotations

import csv

import h5py
import numpy as np
import pytest

from bench.data.tiling import SlideJob, TileParams, read_coords, tile_slides


def _tissue_image(size: int = 2048) -> np.ndarray:
    img = np.full((size, size, 3), 240, dtype=np.uint8)
    img[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = (150, 60, 140)  # a stained square on glass
    return img


def _tiff(path, *, resolution=None, unit=None, description=None):
    import tifffile

    kwargs = {} if resolution is None else {"resolution": (resolution, resolution), "resolutionunit": unit}
    tifffile.imwrite(path, _tissue_image(), tile=(256, 256), photometric="rgb", compression="jpeg", metadata=None,
                     description=description, **kwargs)
    return path


@pytest.mark.parametrize("dpi", [72, 96, 300])
def test_screen_dpi_tag_is_refused_with_the_mpp_advice(tmp_path, dpi):
    path = _tiff(tmp_path / "web.tif", resolution=dpi, unit="INCH")
    report = tile_slides([SlideJob("web", path)], tmp_path / "tiles", TileParams(magnification=20, patch_size=64))
    assert report.done == []
    (sid, why), = report.skipped
    assert sid == "web" and f"{dpi} dpi" in why and "`mpp` column" in why and "magnification" not in why
    rows = list(csv.DictReader(open(tmp_path / "tiles" / "qc.csv")))
    assert [(r["slide_id"], r["status"]) for r in rows] == [("web", "skipped")] and "dpi" in rows[0]["reason"]
    # the override named in the message fixes it, and the coords file says where the mpp came from
    fixed = tile_slides([SlideJob("web", path, mpp=0.5)], tmp_path / "tiles", TileParams(magnification=20,
                                                                                        patch_size=64))
    assert len(fixed.done) == 1 and fixed.skipped == []
    c = read_coords(tmp_path / "tiles" / "web.h5")
    assert c.mpp == 0.5 and c.attrs["mpp_source"] == "override"


def test_implausible_mpp_is_refused(tmp_path):
    coarse = _tiff(tmp_path / "coarse.tif", resolution=1e4 / 25.0, unit="CENTIMETER")  # 25 um/px
    fine = _tiff(tmp_path / "fine.tif", resolution=1e4 / 0.01, unit="CENTIMETER")  # 0.01 um/px
    report = tile_slides([SlideJob("coarse", coarse), SlideJob("fine", fine), SlideJob("bad", coarse, mpp=20.0)],
                         tmp_path / "tiles", TileParams(magnification=0.2, patch_size=64))
    why = dict(report.skipped)
    assert "25 um/px" in why["coarse"] and "0.05-10 um/px" in why["coarse"] and "`mpp` column" in why["coarse"]
    assert "0.01 um/px" in why["fine"]
    assert "the `mpp` override" in why["bad"] and "fix the override" in why["bad"]


def test_coords_and_qc_table_carry_mpp_source_and_level(tmp_path):
    a = _tiff(tmp_path / "a.tif", resolution=1e4 / 0.25, unit="CENTIMETER")  # a 40x scan
    b = _tiff(tmp_path / "b.tif", resolution=1e4 / 0.5, unit="CENTIMETER")  # a 20x scan
    c = _tiff(tmp_path / "c.tif", description="Aperio Image Library v12\n2048x2048 |AppMag = 20|MPP = 0.5")
    out = tmp_path / "tiles"
    report = tile_slides([SlideJob("a", a), SlideJob("b", b), SlideJob("c", c), SlideJob("d", b, mpp=0.5)], out,
                         TileParams(magnification=10, patch_size=64))
    assert {r.slide_id for r in report.done} == {"a", "b", "c", "d"}, report.skipped
    rows = {r["slide_id"]: r for r in csv.DictReader(open(out / "qc.csv"))}
    for sid in "abcd":
        coords = read_coords(out / f"{sid}.h5")
        with h5py.File(out / f"{sid}.h5") as f:
            assert f.attrs["mpp"] == coords.mpp and f.attrs["mpp_source"] and "level" in f.attrs
        assert float(rows[sid]["mpp"]) == pytest.approx(coords.mpp, rel=1e-3)
        assert rows[sid]["mpp_source"] == coords.attrs["mpp_source"]
        assert int(rows[sid]["level"]) == coords.level and int(rows[sid]["n_patches"]) == len(coords)
    assert rows["a"]["mpp_from"] == "tiff-tag" and rows["d"]["mpp_from"] == "override"
    assert read_coords(out / "a.h5").attrs["mpp_from"] == "tiff-tag"
    assert float(rows["a"]["mpp"]) == 0.25 and float(rows["b"]["mpp"]) == 0.5
    # mixed resolutions: every patch spans the same microns (64 px at 10x = 1 um/px)
    assert {rows[s]["patch_um"] for s in "abd"} == {"64.0"}
    assert int(rows["a"]["patch_size_level0"]) == 2 * int(rows["b"]["patch_size_level0"])
    # an Aperio description: OpenSlide's aperio reader, the scanner's own mpp and objective power
    assert (rows["c"]["vendor"], rows["c"]["mpp_from"], rows["c"]["objective_power"]) == ("aperio", "vendor", "20")


def test_qc_overview_groups_slides_by_resolution(tmp_path):
    from PIL import Image

    slides = {"a": _tiff(tmp_path / "a.tif", resolution=1e4 / 0.25, unit="CENTIMETER"),
              "b": _tiff(tmp_path / "b.tif", resolution=1e4 / 0.5, unit="CENTIMETER"),
              "web": _tiff(tmp_path / "web.tif", resolution=72, unit="INCH")}
    out = tmp_path / "tiles"
    jobs = [SlideJob(k, v) for k, v in slides.items()] + [SlideJob("b2", slides["b"])]
    tile_slides(jobs, out, TileParams(magnification=10, patch_size=64))
    page = Image.open(out / "qc_overview.png")
    assert page.size == (170 + 8 * 160, 24 + 2 * (160 + 14))  # two resolution rows: 0.5 (2 slides), 0.25 (1)
    arr = np.asarray(page.convert("RGB"))
    first_row = arr[24:24 + 160, 170:170 + 2 * 160]
    assert (first_row != 255).any(axis=2).mean() > 0.3  # thumbnails pasted, not a blank page
    stamp = (out / "qc_overview.png").stat().st_mtime_ns
    tile_slides(jobs, out, TileParams(magnification=10, patch_size=64))
    assert (out / "qc_overview.png").stat().st_mtime_ns == stamp  # an unchanged page is not rewritten
