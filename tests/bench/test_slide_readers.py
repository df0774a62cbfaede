"""The tiffslide reader backend gives OpenSlide's pixels (synthetic TIFF, Aperio SVS), and is picked explicitly."""

from __future__ import annotations

import numpy as np
import pytest

from bench.common.errors import ConfigError
from bench.data.slides import READER_ENV, default_reader, open_slide, reader_available
from bench.data.synthetic import write_pyramidal_tiff

needs_tiffslide = pytest.mark.skipif(not reader_available("tiffslide"), reason="pip install tiffslide")


def _image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.kron(rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8), np.ones((64, 64, 1), dtype=np.uint8))
    return (img.astype(np.int16) + rng.integers(-30, 30, img.shape)).clip(0, 255).astype(np.uint8)  # JPEG detail


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """A synthetic generic TIFF and an Aperio SVS (baseline, thumbnail, level 1), 2048 x 1536 at 0.25 um/px."""
    import tifffile

    d = tmp_path_factory.mktemp("readers")
    tif = write_pyramidal_tiff(d / "generic.tif", _image(0), 2048, 1536, mpp=0.25, jpeg_quality=90)
    img = _image(1)
    level1 = img.reshape(384, 4, 512, 4, 3).mean(axis=(1, 3)).astype(np.uint8)
    head = "Aperio Image Library v12.0.0 \r\n"
    jpeg = dict(photometric="rgb", compression="jpeg", compressionargs={"level": 90}, metadata=None)
    svs = d / "aperio.svs"
    with tifffile.TiffWriter(svs) as tw:
        tw.write(img, tile=(256, 256), description=head + "2048x1536 [0,0 2048x1536] (256x256) JPEG/RGB Q=90"
                 "|AppMag = 40|MPP = 0.25", **jpeg)
        tw.write(np.ascontiguousarray(level1[::4, ::4]), description=head + "2048x1536 -> 128x96", **jpeg)
        tw.write(level1, tile=(256, 256), description=head + "2048x1536 -> 512x384", **jpeg)
    return {"tif": tif, "svs": svs}


@needs_tiffslide
@pytest.mark.parametrize("kind", ["tif", "svs"])
def test_tiffslide_patches_equal_openslide_patches(slides, kind):
    with open_slide(slides[kind], reader="openslide") as a, open_slide(slides[kind], reader="tiffslide") as b:
        if kind == "svs":
            assert a.properties["openslide.vendor"] == "aperio"
        assert (a.dimensions, a.level_downsamples, a.mpp) == (b.dimensions, b.level_downsamples, b.mpp)
        # 40x / 20x read level 0 (20x resized 448 -> 224), 10x reads level 1; the last corner crosses the border
        for mag, size, step in ((40, 256, 1), (20, 224, 1), (10, 128, 4)):
            choice = a.level_for(magnification=mag, patch_size=size)
            assert choice == b.level_for(magnification=mag, patch_size=size)
            for x, y in ((0, 0), (333, 517), (1700, 1300), (1900, 1400), (-64, -32), (2100, 100)):
                x, y = x // step * step, y // step * step  # on whole pixels of the level read
                pa, pb = a.read_patch(x, y, choice), b.read_patch(x, y, choice)
                assert pa.shape == pb.shape == (size, size, 3)
                assert np.array_equal(pa, pb), (kind, mag, x, y, int(np.abs(pa.astype(int) - pb).max()))
        assert np.array_equal(a.thumbnail(256)[0], b.thumbnail(256)[0])
        assert (a.read_patch(1900, 1400, a.level_for(magnification=40, patch_size=256))[-1, -1] == 255).all()


@needs_tiffslide
def test_tiffslide_warns_once_where_openslide_would_interpolate_between_level_pixels(slides, capsys):
    with open_slide(slides["svs"], reader="tiffslide") as b:
        choice = b.level_for(magnification=10, patch_size=128)
        b.read_patch(333, 517, choice)
        b.read_patch(335, 519, choice)
    err = capsys.readouterr().err
    assert err.count("OpenSlide interpolates there") == 1


def test_reader_choice_env_and_errors(slides, monkeypatch):
    monkeypatch.delenv(READER_ENV, raising=False)
    assert default_reader() == "openslide"
    with pytest.raises(ConfigError, match="slide reader must be one of openslide, tiffslide, got 'cucim'"):
        open_slide(slides["tif"], reader="cucim")
    monkeypatch.setenv(READER_ENV, "fastslide")
    with pytest.raises(ConfigError, match="BENCH_SLIDE_READER='fastslide' is not a slide reader"):
        open_slide(slides["tif"])
    monkeypatch.setenv(READER_ENV, "tiffslide")
    if reader_available("tiffslide"):
        with open_slide(slides["tif"]) as s:
            assert s.reader == "tiffslide"


def test_a_missing_tiffslide_names_the_pip_install(slides, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_tiffslide(name, *args, **kw):
        if name == "tiffslide":
            raise ImportError("No module named 'tiffslide'")
        return real(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tiffslide)
    with pytest.raises(ConfigError, match=r"pip install 'cpath-bench\[tiffslide\]'"):
        open_slide(slides["tif"], reader="tiffslide")
