"""Slides: resolution lookup, level choice, RGB reads, bad files."""

from __future__ import annotations

import numpy as np
import pytest

from bench.common.errors import ConfigError, MissingFileError, SlideError
from bench.data.slides import Slide, mpp_from_properties, open_slide, rgba_to_rgb
from bench.data.synthetic import write_pyramidal_tiff


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    """A 2048 x 1536 slide at 0.25 um/px (40x) with levels 1 and 4, and its level-0 pixels."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(1536 // 64, 2048 // 64, 3), dtype=np.uint8)
    img = np.kron(img, np.ones((64, 64, 1), dtype=np.uint8))  # 64-px blocks: JPEG keeps them at both levels
    path = tmp_path_factory.mktemp("slides") / "pyr.tif"
    write_pyramidal_tiff(path, img, 2048, 1536, mpp=0.25, jpeg_quality=95)
    return path, img


def test_pyramid_metadata(pyramid):
    path, _ = pyramid
    with open_slide(path) as s:
        assert s.dimensions == (2048, 1536)
        assert s.level_downsamples == (1.0, 4.0)
        assert s.mpp == pytest.approx(0.25)
        assert s.mpp_source == "openslide"
        assert s.magnification == pytest.approx(40.0)


@pytest.mark.parametrize(
    "mag, level, read_size, ps0",
    [
        (40, 0, 256, 256),  # native: read as is
        (20, 0, 512, 512),  # downsample 2: level 1 (4x) is too coarse, read 512 at level 0 and shrink
        (10, 1, 256, 1024),  # downsample 4: level 1 exactly
        (5, 1, 512, 2048),  # downsample 8: read 512 at level 1 and shrink
    ],
)
def test_level_choice_hand_computed(pyramid, mag, level, read_size, ps0):
    with open_slide(pyramid[0]) as s:
        c = s.level_for(magnification=mag, patch_size=256)
    assert (c.level, c.read_size, c.patch_size_level0) == (level, read_size, ps0)
    assert c.target_mpp == pytest.approx(10 / mag)


def test_level_choice_by_mpp_matches_magnification(pyramid):
    with open_slide(pyramid[0]) as s:
        assert s.level_for(mpp=1.0, patch_size=224) == s.level_for(magnification=10, patch_size=224)


def test_level_choice_tolerates_scanner_rounding(pyramid):
    # a target a hair coarser than a level (4.0003x) must use that level without resizing
    with open_slide(pyramid[0], mpp=0.25 / 1.0001) as s:
        c = s.level_for(magnification=10, patch_size=256)
    assert c.level == 1 and not c.needs_resize


def test_upsampling_is_refused(pyramid):
    with open_slide(pyramid[0]) as s, pytest.raises(ConfigError, match="without upsampling"):
        s.level_for(magnification=80)


def test_read_patch_matches_pixels(pyramid):
    path, img = pyramid
    with open_slide(path) as s:
        c = s.level_for(magnification=40, patch_size=64)
        patch = s.read_patch(256, 512, c)
    assert patch.shape == (64, 64, 3) and patch.dtype == np.uint8
    diff = np.abs(patch.astype(int) - img[512:576, 256:320].astype(int))
    assert diff.mean() < 6  # JPEG, not bit-exact


def test_read_patch_at_lower_magnification_is_block_average(pyramid):
    path, img = pyramid
    with open_slide(path) as s:
        c = s.level_for(magnification=10, patch_size=32)  # level 1 directly
        patch = s.read_patch(0, 0, c)
    expected = img[:128, :128].reshape(32, 4, 32, 4, 3).mean(axis=(1, 3))
    assert np.abs(patch - expected).mean() < 6


def test_outside_the_slide_is_white(pyramid):
    with open_slide(pyramid[0]) as s:
        region = s.read_region(-32, -32, 0, 64, 64)
    assert (region[:32, :32] == 255).all()
    assert not (region[40:, 40:] == 255).all()


def test_rgba_to_rgb_composites_on_white():
    rgba = np.array([[[100, 50, 0, 0], [100, 50, 0, 255], [100, 50, 0, 128]]], dtype=np.uint8)
    rgb = rgba_to_rgb(rgba)
    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert rgb[0, 1].tolist() == [100, 50, 0]
    # half transparent: halfway to white
    assert rgb[0, 2].tolist() == [round((100 * 128 + 255 * 127) / 255), round((50 * 128 + 255 * 127) / 255), 127]


def test_rgba_to_rgb_array_fast_path_equals_compositing():
    from PIL import Image

    from bench.data.slides import rgba_to_rgb_array

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, size=(5, 7, 4), dtype=np.uint8)
    opaque = rgba.copy()
    opaque[..., 3] = 255
    for arr in (rgba, opaque):
        want = rgba_to_rgb(arr)
        got = rgba_to_rgb_array(Image.fromarray(arr, "RGBA"))
        assert np.array_equal(got, want) and got.flags.writeable and got.flags.c_contiguous
        out = np.zeros((5, 7, 3), dtype=np.uint8)
        assert rgba_to_rgb_array(Image.fromarray(arr, "RGBA"), out=out) is out and np.array_equal(out, want)
    assert np.array_equal(rgba_to_rgb_array(Image.fromarray(opaque[..., :3])), opaque[..., :3])  # RGB input
    with pytest.raises(ValueError, match="out must be"):
        rgba_to_rgb_array(Image.fromarray(opaque, "RGBA"), out=np.zeros((7, 5, 3), dtype=np.uint8))


def test_read_patch_equals_plain_pil_reads(pyramid):
    """The fast read path gives the pixels of OpenSlide's RGBA -> PIL RGB (-> PIL resize)."""
    import openslide
    from PIL import Image

    path, _ = pyramid
    osr = openslide.OpenSlide(str(path))
    with open_slide(path) as s:
        for magnification, size in ((40, 64), (20, 64), (10, 32), (7, 48)):  # as is or resized, levels 0 and 1
            c = s.level_for(magnification=magnification, patch_size=size)
            for x, y in ((0, 0), (96, 160), (-16, 8)):  # the last one reaches outside: transparent
                rgba = osr.read_region((x, y), c.level, (c.read_size, c.read_size))
                want = np.asarray(Image.fromarray(rgba_to_rgb(np.asarray(rgba))).resize(
                    (size, size), Image.BILINEAR)) if c.needs_resize else rgba_to_rgb(np.asarray(rgba))
                assert np.array_equal(s.read_patch(x, y, c), want), (magnification, x, y)
                batch = np.zeros((2, size, size, 3), dtype=np.uint8)
                s.read_patch(x, y, c, out=batch[1])
                assert np.array_equal(batch[1], want) and not batch[0].any()
    osr.close()


@pytest.mark.parametrize(
    "props, expected",
    [
        ({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.27"}, (0.26, "openslide")),
        ({"tiff.XResolution": "40000", "tiff.ResolutionUnit": "centimeter"}, (0.25, "tiff")),
        ({"tiff.XResolution": "50800", "tiff.ResolutionUnit": "inch"}, (0.5, "tiff")),
        ({"tiff.XResolution": "1", "tiff.ResolutionUnit": "none", "openslide.objective-power": "20"}, (0.5, "objective-power")),
        ({"tiff.XResolution": "1", "tiff.ResolutionUnit": "none"}, None),
        ({"openslide.mpp-x": "nan", "openslide.objective-power": "40"}, (0.25, "objective-power")),
    ],
)
def test_mpp_lookup_order(props, expected):
    found = mpp_from_properties(props)
    if expected is None:
        assert found is None
    else:
        assert found[0] == pytest.approx(expected[0]) and found[1] == expected[1]


def test_slide_without_resolution_names_the_override(tmp_path):
    import tifffile

    path = tmp_path / "nores.tif"
    img = np.full((512, 512, 3), 200, dtype=np.uint8)
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", compression="jpeg", metadata=None)
    with pytest.raises(SlideError, match="mpp") as exc:
        open_slide(path)
    assert "nores" in str(exc.value) and "labels.csv" in str(exc.value)
    with open_slide(path, mpp=0.5) as s:  # the override works
        assert s.mpp == 0.5 and s.mpp_source == "override"


def test_not_a_slide_renamed_svs(tmp_path):
    path = tmp_path / "notes.svs"
    path.write_text("this is a text file, not a slide\n")
    with pytest.raises(SlideError, match="cannot open slide") as exc:
        open_slide(path)
    assert "notes" in str(exc.value)


def test_truncated_tiff_is_a_slide_error(pyramid, tmp_path):
    path = tmp_path / "cut.tif"
    data = pyramid[0].read_bytes()
    path.write_bytes(data[: len(data) // 2])
    # either opening or reading fails, but always with SlideError naming the file
    with pytest.raises(SlideError, match="cut"):
        with Slide(path) as s:
            for level in range(s.level_count):
                w, h = s.level_dimensions[level]
                s.read_region(0, 0, level, w, h)


def test_missing_slide(tmp_path):
    with pytest.raises(MissingFileError, match="nothere"):
        open_slide(tmp_path / "nothere.svs")


def test_bad_mpp_override(pyramid):
    with pytest.raises(ConfigError, match="mpp override"):
        Slide(pyramid[0], mpp=-1)
