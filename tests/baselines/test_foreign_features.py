"""Other tools' feature files: never overwritten by an extraction; trained on as they are (`bench train --features`).

A tiny synthetic cohort tiled at 10x / 64 px, random-init resnet18-trunc fed 32 px inputs:
seconds on 2 CPU cores, nothing downloaded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from baselines.encoders import build_encoder
from baselines.extract import ExtractOptions, extract_cohort, pending_slides
from baselines.features import (
    MARKER_ATTR,
    ForeignFeaturesError,
    external_features,
    features_folder,
    harness_made,
    read_features,
)
from bench.cli.main import main as bench_main
from bench.common.errors import DataError
from bench.data.cohort import load_cohort
from bench.data.tiling import TileParams, tile_slides

MAG, PX, DS = 10, 64, "mini"
TRAIN = ["--dataset", DS, "--encoder", "resnet18-trunc", "--epochs", "2", "--magnification", str(MAG),
         "--patch-size", str(PX), "--input-size", "32", "--device", "cpu", "--bootstrap", "50",
         "--ratios", "0.6", "0.4", "--val-fraction", "0.25"]


@pytest.fixture(scope="module")
def cohort(synthetic_cohort, tmp_path_factory):
    """(cohort root, coords folder at 10x / 64 px, harness features of every slide) made once."""
    root = synthetic_cohort("subtyping", n_slides=8)
    jobs = load_cohort(root).slide_jobs()
    base = tmp_path_factory.mktemp("foreign")
    tiles = base / "tiles"
    assert not tile_slides(jobs, tiles, TileParams(magnification=MAG, patch_size=PX)).skipped
    feats = base / "ours"
    enc = build_encoder("resnet18-trunc", random_init=True, seed=0, input_size=32)
    report = extract_cohort(jobs, tiles, feats, enc, ExtractOptions(batch_size=64, num_workers=0, device="cpu",
                                                                     torch_threads=1), magnification=MAG, patch_size=PX)
    assert not report.skipped
    return root, tiles, feats


def workdir(tmp_path: Path, tiles: Path) -> Path:
    """A work folder whose tiles are already there (copied), as after `bench tile`."""
    work = tmp_path / "work"
    shutil.copytree(tiles, work / "tiles" / DS / f"{MAG}x-{PX}px")
    return work


def as_clam(src: Path, dest: Path) -> None:
    """A harness feature file rewritten as CLAM's extract_features_fp.py writes h5_files/<slide>.h5."""
    f = read_features(src)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(dest, "w") as out:
        out.create_dataset("features", data=f.features, maxshape=(None, f.features.shape[1]), chunks=True)
        c = out.create_dataset("coords", data=f.coords, maxshape=(None, 2), chunks=True)
        c.attrs["patch_size"] = PX
        c.attrs["patch_level"] = 0


def as_trident(src: Path, dest: Path) -> None:
    """As TRIDENT's save_h5 writes features_<encoder>/<slide>.h5 (attrs on each dataset)."""
    f = read_features(src)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(dest, "w") as out:
        fd = out.create_dataset("features", data=f.features)
        fd.attrs["name"] = dest.stem
        cd = out.create_dataset("coords", data=f.coords)
        for key, value in {"patch_size": PX, "level0_magnification": 20, "target_magnification": MAG}.items():
            cd.attrs[key] = value


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under `folder`: (size, mtime, sha256): what 'untouched' means."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns,
                                         hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_train_random_init_stops_instead_of_overwriting_clam_features(cohort, tmp_path, capsys):
    root, tiles, ours = cohort
    work = workdir(tmp_path, tiles)
    out = work / "features" / DS / "resnet18-trunc" / f"{MAG}x-{PX}px"
    slides = sorted(p.stem for p in ours.glob("*.h5"))
    for slide in slides[:2]:  # a user's CLAM files, copied where the harness looks for features
        as_clam(ours / f"{slide}.h5", out / f"{slide}.h5")
    before = snapshot(out)
    assert bench_main(["train", "--cohort", str(root), "--workdir", str(work), "--random-init", *TRAIN]) == 1
    err = capsys.readouterr().err
    assert snapshot(out) == before  # not overwritten, not deleted, no lock, no skipped.csv, no other slide
    assert f"{out / slides[0]}.h5 and 1 more (CLAM layout) were not made by cpath-bench" in err
    assert f"`bench train --features {out}`" in err and f"move them out of {out} first" in err
    record = json.loads(next((work / "runs").rglob("run.json")).read_text())
    assert record["status"] == "failed" and "ForeignFeaturesError" in record["error"]


def test_extract_and_its_force_never_replace_a_trident_file(cohort, tmp_path, capsys):
    root, tiles, ours = cohort
    work = workdir(tmp_path, tiles)
    out = work / "features" / DS / "resnet18-trunc" / f"{MAG}x-{PX}px"
    slides = sorted(p.stem for p in ours.glob("*.h5"))
    shutil.copytree(ours, out)  # the harness's own files ...
    (out / "skipped.csv").unlink(missing_ok=True)
    as_trident(ours / f"{slides[3]}.h5", out / f"{slides[3]}.h5")  # ... and one of TRIDENT's among them
    before = snapshot(out)
    args = ["extract", "--workdir", str(work), "--cohort", str(root), "--dataset", DS, "--encoder", "resnet18-trunc",
            "--magnification", str(MAG), "--patch-size", str(PX), "--random-init", "--input-size", "32",
            "--workers", "0", "--device", "cpu", "--threads", "1"]
    for extra in ([], ["--force"]):
        assert bench_main(args + extra) == 2
        err = capsys.readouterr().err
        assert f"{out / slides[3]}.h5 (TRIDENT layout) was not made by cpath-bench" in err
        assert "bench train --features" in err and "move the file out of" in err
        assert snapshot(out) == before
    jobs = load_cohort(root).slide_jobs()
    with pytest.raises(ForeignFeaturesError, match=slides[3]):
        pending_slides(jobs, tiles, out, build_encoder("resnet18-trunc", random_init=True, seed=0,
                                                       input_size=32).spec, "random-init", 0)


def test_own_files_without_the_marker_and_unreadable_files(cohort, tmp_path, capsys):
    """A file of a harness version before the marker is still ours (redone when stale); one that
    cannot be opened is moved aside, never deleted, and redone."""
    root, tiles, ours = cohort
    out = tmp_path / "f"
    shutil.copytree(ours, out)
    slides = sorted(p.stem for p in ours.glob("*.h5"))
    legacy, broken = out / f"{slides[0]}.h5", out / f"{slides[1]}.h5"
    assert harness_made(legacy) is True
    with h5py.File(legacy, "a") as f:
        del f.attrs[MARKER_ATTR]
        f.attrs["config_hash"] = "0" * 16  # stale
    assert harness_made(legacy) is True
    damaged = broken.read_bytes()[:1500]
    broken.write_bytes(damaged)
    assert harness_made(broken) is None
    enc = build_encoder("resnet18-trunc", random_init=True, seed=0, input_size=32)
    jobs = load_cohort(root).slide_jobs()
    report = extract_cohort(jobs, tiles, out, enc, ExtractOptions(batch_size=64, num_workers=0, device="cpu",
                                                                  torch_threads=1), magnification=MAG, patch_size=PX)
    assert report.n_new == 2 and not report.skipped
    err = capsys.readouterr().err
    assert f"re-extracting slide {slides[1]}: its feature file {broken} cannot be opened; moved it to " \
           f"{broken.name}.damaged" in err
    assert f"re-extracting slide {slides[0]}: its feature file {legacy} cannot be reused (made with other " in err
    assert (out / f"{broken.name}.damaged").read_bytes() == damaged
    assert harness_made(legacy) and harness_made(broken)


def clam_root(ours: Path, dest: Path) -> Path:
    for p in sorted(ours.glob("*.h5")):
        as_clam(p, dest / "h5_files" / p.name)
    (dest / "pt_files").mkdir()
    return dest


def test_feature_folders_of_each_layout_are_found_and_bad_ones_explained(cohort, tmp_path):
    root, _, ours = cohort
    ids = load_cohort(root).slide_ids
    clam = clam_root(ours, tmp_path / "clam")
    got = external_features(clam, ids)
    assert got.folder == (clam / "h5_files").resolve() and got.layout == "clam" and got.embed_dim == 256
    assert got.slides == set(ids) and not got.missing and got.weights_id.startswith(f"external:{got.folder}#")
    job = tmp_path / "trident_job"
    for p in sorted(ours.glob("*.h5"))[:-1]:
        as_trident(p, job / "10x_64px_0px_overlap" / "features_resnet18" / p.name)
    assert features_folder(job) == job / "10x_64px_0px_overlap" / "features_resnet18"
    tri = external_features(job, ids)
    assert tri.layout == "trident" and tri.missing == (sorted(ours.glob("*.h5"))[-1].stem,)
    # a changed file changes what the run records, so its runs are stale
    with h5py.File(clam / "h5_files" / f"{ids[0]}.h5", "a") as f:
        f["features"][0, 0] += 1.0
    assert external_features(clam, ids).weights_id != got.weights_id
    as_trident(ours / f"{ids[0]}.h5", job / "10x_64px_0px_overlap" / "features_uni_v1" / f"{ids[0]}.h5")
    with pytest.raises(DataError, match="features of 2 encoders or tilings .*features_resnet18.*point at one"):
        features_folder(job)
    with pytest.raises(DataError, match=r"holds no feature files; expected <slide_id>.h5 files with a `features`"):
        external_features(tmp_path / "clam" / "pt_files", ids)
    with h5py.File(clam / "h5_files" / f"{ids[2]}.h5", "a") as f:
        f["features"][3] = np.nan  # a middle row: a last-row check would miss it
    with pytest.raises(DataError, match=rf"1 feature file in .*h5_files cannot be used: {ids[2]}.h5: 1 of \d+ "
                                        "feature rows hold NaN or inf"):
        external_features(clam, ids)


def test_train_features_refuses_bad_folders_and_flags_with_clear_errors(cohort, tmp_path, capsys):
    root, tiles, ours = cohort
    work = workdir(tmp_path, tiles)
    base = ["train", "--cohort", str(root), "--workdir", str(work), *TRAIN]
    assert bench_main(base + ["--features", str(tmp_path / "nope")]) == 2
    assert f"features folder {tmp_path / 'nope'} does not exist; expected a folder of <slide_id>.h5" in \
        capsys.readouterr().err
    other = tmp_path / "other"
    as_clam(next(ours.glob("*.h5")), other / "TCGA-XX.h5")
    assert bench_main(base + ["--features", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"{other} has no feature file for any of the 8 slides of the cohort" in err and "TCGA-XX" in err
    assert bench_main(base + ["--features", str(other), "--random-init"]) == 2
    assert "--random-init and --weights do not apply" in capsys.readouterr().err
    assert not (work / "runs").exists()  # refused before any stage


def test_train_on_clam_features_reads_the_folder_only(cohort, tmp_path, capsys):
    root, tiles, ours = cohort
    work = workdir(tmp_path, tiles)
    clam = clam_root(ours, tmp_path / "clam")
    before = snapshot(clam)
    args = ["train", "--cohort", str(root), "--workdir", str(work), *TRAIN, "--features", str(clam)]
    assert bench_main(args) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert f"features: 8 slides in {(clam / 'h5_files').resolve()} (clam layout, 256-d), read-only" in err
    assert snapshot(clam) == before  # no lock, no skipped.csv, nothing rewritten
    assert not (work / "features").exists()  # nothing extracted
    run_json = work / "runs" / "train" / DS / "two-stage" / "resnet18-trunc+clam" / "abmil"
    record = json.loads(next(run_json.rglob("run.json")).read_text())
    assert record["status"] == "ok", record.get("error")
    assert record["method"]["weights_id"].startswith(f"external:{(clam / 'h5_files').resolve()}#")
    assert bench_main(args) == 0  # a rerun on the same files is up to date
    assert "up to date, skipped" in capsys.readouterr().err
    assert snapshot(clam) == before
