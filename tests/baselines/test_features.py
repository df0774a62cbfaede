"""Reading feature files of every layout (baselines/features.py): ours, CLAM's, TRIDENT's."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from baselines.features import (
    ForeignFeaturesError,
    check_feature_file,
    extraction_seconds,
    harness_made,
    list_features,
    read_features,
    refuse_foreign,
    validate_features_dir,
)
from bench.common.errors import DataError, MissingFileError


def bag(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n, d)).astype(np.float32)
    coords = (rng.integers(0, 100, size=(n, 2)) * 256).astype(np.int64)
    return feats, coords


def write_clam(path: Path, feats: np.ndarray, coords: np.ndarray) -> None:
    """As CLAM's extract_features_fp.py writes h5_files/<slide>.h5 (attrs only on coords)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats, maxshape=(None, feats.shape[1]), chunks=True)
        c = f.create_dataset("coords", data=coords, maxshape=(None, 2), chunks=True)
        c.attrs["patch_size"] = 256
        c.attrs["patch_level"] = 0


def write_trident(path: Path, feats: np.ndarray, coords: np.ndarray) -> None:
    """As TRIDENT's save_h5 writes features_<encoder>/<slide>.h5 (attrs on each dataset)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        fd = f.create_dataset("features", data=feats)
        fd.attrs["name"] = path.stem
        fd.attrs["savetodir"] = str(path.parent)
        cd = f.create_dataset("coords", data=coords)
        for key, value in {"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
                           "target_magnification": 20, "overlap": 0, "name": path.stem}.items():
            cd.attrs[key] = value


def test_clam_layout_is_read_from_its_output_root(tmp_path):
    bags = {f"slide_{i}": bag(10 + i, 1024, seed=i) for i in range(3)}
    for slide, (feats, coords) in bags.items():
        write_clam(tmp_path / "clam" / "h5_files" / f"{slide}.h5", feats, coords)
        (tmp_path / "clam" / "pt_files").mkdir(exist_ok=True)
    found = list_features(tmp_path / "clam")
    assert sorted(found) == sorted(bags)
    for slide, (feats, coords) in bags.items():
        got = read_features(found[slide])
        np.testing.assert_array_equal(got.features, feats)
        np.testing.assert_array_equal(got.coords, coords)
        assert got.attrs["layout"] == "clam" and got.attrs["patch_size"] == 256
    with pytest.raises(DataError, match="CLAM pt file .* h5_files/slide_0.h5"):
        (tmp_path / "clam" / "pt_files" / "slide_0.pt").write_bytes(b"")
        read_features(tmp_path / "clam" / "pt_files" / "slide_0.pt")


def test_trident_layout_attrs_are_merged(tmp_path):
    feats, coords = bag(7, 1536, seed=4)
    path = tmp_path / "20x_256px_0px_overlap" / "features_uni_v2" / "TCGA-01.h5"
    write_trident(path, feats, coords)
    got = read_features(path)
    np.testing.assert_array_equal(got.features, feats)
    np.testing.assert_array_equal(got.coords, coords)
    assert got.attrs["layout"] == "trident"
    assert got.attrs["level0_magnification"] == 40 and got.attrs["name"] == "TCGA-01"
    assert list_features(path.parent) == {"TCGA-01": path}


def test_leading_singleton_axes_and_float16_are_handled(tmp_path):
    feats, coords = bag(5, 8, seed=1)
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        f["features"] = feats[None].astype(np.float16)  # (1, N, D) as some tools write it
        f["coords"] = coords[None]
    got = read_features(path)
    assert got.features.shape == (5, 8) and got.features.dtype == np.float32
    np.testing.assert_allclose(got.features, feats, atol=2e-3)
    assert read_features(path, dtype=None).features.dtype == np.float16


@pytest.mark.parametrize("make,message", [
    (lambda f: f.create_dataset("coords", data=np.zeros((3, 2))), "no 'features' dataset"),
    (lambda f: f.create_dataset("features", data=np.zeros((3, 4))), "no 'coords' dataset"),
    (lambda f: (f.create_dataset("features", data=np.zeros((3, 4))), f.create_dataset("coords", data=np.zeros((2, 2)))),
     "3 feature rows but 2 coords"),
    (lambda f: (f.create_dataset("features", data=np.full((2, 4), np.nan)), f.create_dataset("coords", data=np.zeros((2, 2)))),
     "2 of 2 feature rows hold NaN"),
    (lambda f: (f.create_dataset("features", data=np.zeros((0, 4))), f.create_dataset("coords", data=np.zeros((0, 2)))),
     "no patches"),
])
def test_bad_feature_files_get_a_clear_error(tmp_path, make, message):
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        make(f)
    with pytest.raises(DataError, match=message):
        read_features(path)
    assert check_feature_file(path) is not None


def test_damaged_and_missing_files(tmp_path):
    feats, coords = bag(50, 16, seed=2)
    good = tmp_path / "good.h5"
    write_clam(good, feats, coords)
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # a copy cut short
    with pytest.raises(DataError, match="damaged"):
        read_features(damaged)
    assert "damaged" in check_feature_file(damaged)
    assert check_feature_file(good) is None
    assert check_feature_file(good, n_patches=49) == "50 rows but the coords file has 49 patches"
    assert check_feature_file(good, embed_dim=32) == "dimension 16 but the encoder gives 32"
    assert "config hash" in check_feature_file(good, config_hash="abc")
    with pytest.raises(MissingFileError):
        read_features(tmp_path / "nope.h5")


def test_partial_and_lock_files_are_never_listed(tmp_path):
    feats, coords = bag(3, 4, seed=0)
    write_clam(tmp_path / "a.h5", feats, coords)
    (tmp_path / ".b.h5.partial-123-abcdef12").write_bytes(b"half")
    (tmp_path / "b.h5.lock").write_text("host:1:0")
    assert list(list_features(tmp_path)) == ["a"]


def test_validate_features_dir_reports_missing_bad_and_odd_dimension(tmp_path):
    for i in range(3):
        write_clam(tmp_path / f"s{i}.h5", *bag(4, 16, seed=i))
    write_clam(tmp_path / "odd.h5", *bag(4, 8, seed=9))
    (tmp_path / "broken.h5").write_bytes(b"not hdf5")
    check = validate_features_dir(tmp_path, ["s0", "s1", "s2", "odd", "broken", "absent"])
    assert sorted(check.files) == ["s0", "s1", "s2"] and check.embed_dim == 16
    assert check.missing == ["absent"]
    assert dict(check.bad)["odd"] == "feature dimension 8, expected 16"
    assert "damaged" in dict(check.bad)["broken"]
    assert not check.ok
    assert validate_features_dir(tmp_path, ["s0", "s1"]).ok


def test_extraction_seconds_only_from_files_that_record_them(tmp_path):
    write_clam(tmp_path / "clam.h5", *bag(2, 4, seed=0))
    ours = tmp_path / "ours.h5"
    write_clam(ours, *bag(2, 4, seed=1))
    with h5py.File(ours, "a") as f:
        f.attrs["seconds"] = 12.5
    assert extraction_seconds(list_features(tmp_path)) == {"ours": 12.5}


def test_every_row_check_attrs_and_advice_for_other_tools_files(tmp_path):
    feats, coords = bag(40, 8, seed=3)
    feats[10:12] = np.nan  # middle rows: the cheap last-row check cannot see them
    path = tmp_path / "clam.h5"
    write_clam(path, feats, coords)
    assert check_feature_file(path) is None
    assert check_feature_file(path, scan="all") == "2 of 40 feature rows hold NaN or inf"
    assert check_feature_file(path, scan="auto") == "2 of 40 feature rows hold NaN or inf"  # no checked mtime
    with pytest.raises(DataError, match="made by another tool \\(clam layout\\): re-create it there"):
        read_features(path)
    good = tmp_path / "good.h5"
    write_clam(good, *bag(5, 8, seed=4))
    assert check_feature_file(good, attrs=("config_hash", "seconds")) == "missing attrs: config_hash, seconds"
    with h5py.File(good, "a") as f:
        del f["coords"]
        f["coords"] = np.zeros((5, 3), np.int64)
    assert check_feature_file(good).startswith("bad shapes")


def test_only_files_with_the_marker_or_an_old_harness_signature_are_ours(tmp_path):
    clam, trident, ours, old, broken = (tmp_path / f"{n}.h5" for n in ("clam", "trident", "ours", "old", "broken"))
    for p in (clam, ours, old):
        write_clam(p, *bag(3, 4, seed=0))
    write_trident(trident, *bag(3, 4, seed=1))
    with h5py.File(ours, "a") as f:
        f.attrs["created_by"] = "cpath-bench"
    with h5py.File(old, "a") as f:  # a feature file of the harness before the marker
        for key in ("config_hash", "harness_version", "weights_id", "encoder"):
            f.attrs[key] = "x"
    broken.write_bytes(b"not hdf5")
    assert [harness_made(p) for p in (clam, trident, ours, old, broken)] == [False, False, True, True, None]
    refuse_foreign([ours, old, broken, tmp_path / "absent.h5"])  # nothing foreign: no error
    with pytest.raises(ForeignFeaturesError, match=r"trident.h5 and 1 more \(TRIDENT layout\) were not made by "
                                                   r"cpath-bench .* `bench train --features .*` .* move them out"):
        refuse_foreign([ours, trident, clam])
