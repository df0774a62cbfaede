"""Offline feature extraction (baselines/extract.py, `bench extract`).

Tiny synthetic slides tiled at 20x / 64 px, a random-init resnet18-trunc fed
32-64 px inputs: fast on 2 CPU cores, and nothing to download.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch

from baselines import extract as extract_mod
from baselines.encoders import build_encoder
from baselines.extract import ExtractOptions, extract_cohort, pending_slides, read_skip_report
from baselines.features import list_features, read_features
from bench.cli.main import main as bench_main
from bench.common.errors import ConfigError, DataError, WriteError
from bench.common.files import file_lock, is_partial
from bench.data.slides import open_slide
from bench.data.tiling import SlideJob, TileParams, read_coords, tile_slides, write_coords

MAG, PX = 20, 64


@pytest.fixture(scope="module")
def tiled(synthetic_cohort, tmp_path_factory):
    """(cohort root, coords folder, slide jobs) of 6 tiny slides tiled at 20x / 64 px."""
    root = synthetic_cohort("subtyping", n_slides=6)
    jobs = [SlideJob(p.stem, p) for p in sorted((root / "slides").glob("*.tif"))]
    tiles = tmp_path_factory.mktemp("tiles") / "20x-64px"
    report = tile_slides(jobs, tiles, TileParams(magnification=MAG, patch_size=PX), qc=False)
    assert not report.skipped and all(r.n_patches > 8 for r in report.done)
    return root, tiles, jobs


@pytest.fixture(scope="module")
def encoder():
    return build_encoder("resnet18-trunc", random_init=True, seed=0, input_size=32)


def copy_tiles(tiles: Path, dest: Path) -> Path:
    shutil.copytree(tiles, dest)
    return dest


def run(jobs, tiles, out, encoder, **options):
    opts = ExtractOptions(**{"batch_size": 16, "num_workers": 0, "device": "cpu", "torch_threads": 1, **options})
    return extract_cohort(jobs, tiles, out, encoder, opts, magnification=MAG, patch_size=PX)


def test_features_equal_the_model_on_patches_read_by_hand(tiled, encoder, tmp_path):
    _, tiles, jobs = tiled
    report = run(jobs[:1], tiles, tmp_path / "w2", encoder, num_workers=2, batch_size=8)
    assert not report.skipped and [r.slide_id for r in report.done] == [jobs[0].slide_id]
    for job in jobs[:1]:
        coords = read_coords(tiles / f"{job.slide_id}.h5")
        with open_slide(job.path) as slide:
            patches = np.stack([slide.read_patch(x, y, coords.level_choice) for x, y in coords.coords])  # (N, 64, 64, 3)
        with torch.inference_mode():
            expected = encoder.model(encoder.transform(patches)).numpy()  # (N, 256)
        got = read_features(tmp_path / "w2" / f"{job.slide_id}.h5")
        assert got.features.shape == (len(coords), 256)
        np.testing.assert_allclose(got.features, expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(got.coords, coords.coords)
        a = got.attrs
        assert (a["encoder"], a["weights_id"], a["init_seed"], a["magnification"], a["patch_size"],
                a["input_size"], a["n_patches"], a["num_workers"]) == (
            "resnet18-trunc", "random-init", 0, MAG, PX, 32, len(coords), 2)
        assert a["seconds"] > 0 and a["peak_memory_mb"] > 0 and a["harness_version"] and a["device"]
        assert a["layout"] == "cpath-bench" and a["level0_magnification"] == 20.0  # coords attrs kept
    # the in-process reader (no workers) gives the same numbers
    run(jobs[:1], tiles, tmp_path / "w0", encoder, num_workers=0, batch_size=50)
    np.testing.assert_allclose(read_features(tmp_path / "w0" / f"{jobs[0].slide_id}.h5").features,
                               read_features(tmp_path / "w2" / f"{jobs[0].slide_id}.h5").features, atol=1e-5)


def test_rerun_does_nothing_and_stale_or_damaged_files_are_redone(tiled, encoder, tmp_path):
    _, tiles, jobs = tiled
    out = tmp_path / "f"
    first = run(jobs[:3], tiles, out, encoder)
    assert first.n_new == 3
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    assert pending_slides(jobs[:3], tiles, out, encoder.spec, "random-init", 0) == []
    second = run(jobs[:3], tiles, out, encoder)
    assert second.n_new == 0 and all(r.reused for r in second.done)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.h5")} == stamps
    # damaged (cut short), wrong number of rows, made with other weights: each is redone
    a, b, c = (out / f"{j.slide_id}.h5" for j in jobs[:3])
    a.write_bytes(a.read_bytes()[:2000])
    with h5py.File(b, "a") as f:
        del f["features"]
        f["features"] = np.zeros((3, 256), np.float32)
    with h5py.File(c, "a") as f:
        f.attrs["config_hash"] = "0" * 16
    assert [j.slide_id for j in pending_slides(jobs[:3], tiles, out, encoder.spec, "random-init", 0)] == \
        [j.slide_id for j in jobs[:3]]
    third = run(jobs[:3], tiles, out, encoder)
    assert third.n_new == 3 and not third.skipped
    for j in jobs[:3]:
        assert read_features(out / f"{j.slide_id}.h5").features.shape[0] == len(read_coords(tiles / f"{j.slide_id}.h5"))
    # another seed is other weights: nothing reused
    other = build_encoder("resnet18-trunc", random_init=True, seed=1, input_size=32)
    assert run(jobs[:1], tiles, out, other).n_new == 1
    assert read_features(out / f"{jobs[0].slide_id}.h5").attrs["init_seed"] == 1


def test_bad_slides_are_skipped_reported_and_the_others_finish(tiled, encoder, tmp_path):
    root, tiles_src, jobs = tiled
    tiles = copy_tiles(tiles_src, tmp_path / "tiles")
    s_missing, s_empty, s_mag, s_broken = (j.slide_id for j in jobs[:4])
    (tiles / f"{s_missing}.h5").unlink()
    empty = read_coords(tiles / f"{s_empty}.h5")
    write_coords(tiles / f"{s_empty}.h5", type(empty)(**{**empty.__dict__, "coords": np.zeros((0, 2), np.int64),
                                                         "tissue": None}))
    other_mag = read_coords(tiles / f"{s_mag}.h5")
    write_coords(tiles / f"{s_mag}.h5", type(other_mag)(**{**other_mag.__dict__, "target_magnification": 10.0}))
    # a slide whose later tiles are damaged: it opens and its first patches read, then reading fails
    broken_path = tmp_path / "broken.tif"
    shutil.copy(jobs[3].path, broken_path)
    with tifffile.TiffFile(broken_path) as t:
        offsets, counts = t.pages[0].dataoffsets, t.pages[0].databytecounts
    data = bytearray(broken_path.read_bytes())
    for o, c in list(zip(offsets, counts))[len(offsets) // 2:]:
        data[o:o + c] = bytes(c)
    broken_path.write_bytes(bytes(data))
    broken_coords = read_coords(tiles / f"{s_broken}.h5")
    with open_slide(broken_path) as slide:
        slide.read_patch(*broken_coords.coords[0], broken_coords.level_choice)  # still readable here
    jobs = [SlideJob(s_broken, broken_path) if j.slide_id == s_broken else j for j in jobs[:5]]

    out = tmp_path / "f"
    report = run(jobs, tiles, out, encoder, num_workers=2, batch_size=8)
    skipped = dict(report.skipped)
    assert sorted(skipped) == sorted([s_missing, s_empty, s_mag, s_broken])
    assert "does not exist" in skipped[s_missing] and "bench tile" in skipped[s_missing]
    assert "no tissue patches" in skipped[s_empty]
    assert "tiled at 10x, expected 20x" in skipped[s_mag]
    assert "Not a JPEG" in skipped[s_broken] or "damaged" in skipped[s_broken]
    assert sorted(r.slide_id for r in report.done) == sorted(j.slide_id for j in jobs[4:])
    assert sorted(list_features(out)) == sorted(j.slide_id for j in jobs[4:])  # no file for a bad slide
    assert dict(read_skip_report(out / "skipped.csv")) == skipped
    assert not [p for p in out.iterdir() if is_partial(p) or p.name.endswith(".lock")]


def test_failed_write_leaves_no_file_that_looks_done(tiled, encoder, tmp_path, monkeypatch):
    _, tiles, jobs = tiled
    victim = jobs[1].slide_id
    real_write = extract_mod._write_h5

    def disk_full(path, features, coords, attrs):
        if attrs["slide_id"] != victim:
            return real_write(path, features, coords, attrs)
        with h5py.File(path, "w") as f:  # half a file, then the disk is full
            f["features"] = features[: len(features) // 2]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(extract_mod, "_write_h5", disk_full)
    out = tmp_path / "f"
    # a full disk ends the stage with one error naming the file (WriteError from atomic_path), not a skip
    with pytest.raises(WriteError, match=f"cannot write {out / victim}.h5: .*No space left on device"):
        run(jobs[:2], tiles, out, encoder)
    assert sorted(p.name for p in out.iterdir()) == [f"{jobs[0].slide_id}.h5"]  # what finished is kept
    monkeypatch.setattr(extract_mod, "_write_h5", real_write)
    again = run(jobs[:2], tiles, out, encoder)
    assert again.n_new == 1 and not again.skipped and not (out / "skipped.csv").exists()


def test_slide_locked_by_a_live_process_is_left_to_it(tiled, encoder, tmp_path):
    _, tiles, jobs = tiled
    out = tmp_path / "f"
    with file_lock(out / f"{jobs[0].slide_id}.h5"):  # this live process holds it
        report = run(jobs[:2], tiles, out, encoder)
    assert report.busy == [jobs[0].slide_id] and [r.slide_id for r in report.done] == [jobs[1].slide_id]
    assert list(list_features(out)) == [jobs[1].slide_id]


def test_float16_features(tiled, encoder, tmp_path):
    _, tiles, jobs = tiled
    run(jobs[:1], tiles, tmp_path / "a", encoder)
    run(jobs[:1], tiles, tmp_path / "b", encoder, float16=True)
    full = read_features(tmp_path / "a" / f"{jobs[0].slide_id}.h5")
    half = read_features(tmp_path / "b" / f"{jobs[0].slide_id}.h5", dtype=None)
    assert half.features.dtype == np.float16 and half.attrs["dtype"] == "float16"
    np.testing.assert_allclose(half.features.astype(np.float32), full.features, rtol=2e-3, atol=2e-3)


KILL_SCRIPT = """
import sys
import time
from pathlib import Path
from baselines.encoders import build_encoder
from baselines.extract import ExtractOptions, extract_cohort
from bench.data.tiling import SlideJob
slides, tiles, out = map(Path, sys.argv[1:4])
jobs = [SlideJob(p.stem, p) for p in sorted(slides.glob("*.tif"))]
enc = build_encoder("resnet18-trunc", random_init=True, seed=0, input_size=32)
forward = enc.model.forward
def slow_forward(x):  # every slide takes a while, so the kill lands mid-run on any machine
    time.sleep(0.1)
    return forward(x)
enc.model.forward = slow_forward
extract_cohort(jobs, tiles, out, enc, ExtractOptions(batch_size=8, num_workers=0, device="cpu", torch_threads=1),
               magnification=20, patch_size=64)
"""


def test_killed_run_leaves_only_complete_files_and_rerun_finishes(tiled, tmp_path):
    root, tiles, jobs = tiled
    out = tmp_path / "f"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(root / "slides"), str(tiles), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "BENCH_PROGRESS": "0"})
    try:
        deadline = time.monotonic() + 120
        while not list_features(out) if out.exists() else True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no feature file appeared"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)  # no chance to clean up: the worst case
    finally:
        proc.wait(timeout=30)
    complete = list_features(out)
    assert 1 <= len(complete) < len(jobs), "the run finished before it could be killed; the test proves nothing"
    for slide, path in complete.items():
        assert read_features(path).features.shape == (len(read_coords(tiles / f"{slide}.h5")), 256)
    stamps = {s: p.stat().st_mtime_ns for s, p in complete.items()}

    enc = build_encoder("resnet18-trunc", random_init=True, seed=0, input_size=32)
    report = run(jobs, tiles, out, enc, batch_size=64)
    assert not report.skipped and not report.busy  # the dead process's lock was taken over
    assert sorted(r.slide_id for r in report.done if r.reused) == sorted(complete)
    assert sorted(list_features(out)) == sorted(j.slide_id for j in jobs)
    assert {s: (out / f"{s}.h5").stat().st_mtime_ns for s in complete} == stamps  # finished files not redone
    assert not [p.name for p in out.iterdir() if is_partial(p) or p.name.endswith(".lock")]


def test_cli_extract_writes_verified_files_and_rerun_does_nothing(tiled, tmp_path, capsys):
    root, tiles, jobs = tiled
    work = tmp_path / "work"
    shutil.copytree(tiles, work / "tiles" / "synth" / "20x-64px")
    args = ["extract", "--workdir", str(work), "--cohort", str(root), "--dataset", "synth", "--encoder",
            "resnet18-trunc", "--patch-size", "64", "--random-init", "--input-size", "32", "--workers", "1",
            "--batch-size", "32", "--device", "cpu", "--threads", "1"]
    assert bench_main(args) == 0
    out = work / "features" / "synth" / "resnet18-trunc" / "20x-64px"
    assert sorted(list_features(out)) == sorted(j.slide_id for j in jobs)
    assert "6 new" in capsys.readouterr().err
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    assert bench_main(args) == 0
    assert "are up to date (random-init)" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")} == stamps
    assert bench_main(args[:8] + ["resnet18-trunkated"] + args[9:]) == 2
    assert "did you mean: resnet18-trunc" in capsys.readouterr().err
    assert bench_main(["encoders"]) == 0
    table = capsys.readouterr().out
    assert "| virchow2" in table and "2560" in table and "cls+mean" in table


def test_reading_workers_and_default_batch_size_fit_the_work():
    from baselines.extract import workers_for

    # the first batch is read before anything can overlap; each worker needs two batches to read ahead
    assert [workers_for(b, 2) for b in (1, 2, 3, 4, 5, 100)] == [0, 0, 1, 1, 2, 2]
    assert workers_for(100, 0) == 0 and workers_for(0, 2) == 0
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = ExtractOptions()
    assert [auto.batch_size_for(cpu, s) for s in (224, 256, 128, 64, 32)] == [8, 8, 24, 64, 64]
    assert auto.batch_size_for(cuda, 224) == 256
    assert ExtractOptions(batch_size=5).batch_size_for(cpu, 224) == 5
    with pytest.raises(ConfigError, match="batch size"):
        ExtractOptions(batch_size=0)


def test_reading_workers_are_chosen_from_cores_threads_and_device_unless_asked_for():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = ExtractOptions()
    # on CPU the encoder's threads take the cores: workers only on cores they leave free
    assert auto.settings(cpu, 224, cores=2, threads=2).num_workers == 0
    assert "read in the main process" in auto.settings(cpu, 224, cores=2, threads=2).why_workers
    assert auto.settings(cpu, 224, cores=8, threads=6).num_workers == 2
    assert auto.settings(cpu, 224, cores=64, threads=8).num_workers == 4
    assert ExtractOptions(torch_threads=1).settings(cpu, 224, cores=2).num_workers == 1
    # on CUDA one core runs the GPU, the rest read (at most 8), batch 256
    assert auto.settings(cuda, 224, cores=16, threads=16).num_workers == 8
    assert auto.settings(cuda, 224, cores=3, threads=3).num_workers == 2
    assert auto.settings(cuda, 224, cores=1, threads=1).num_workers == 0
    assert auto.settings(cuda, 224, cores=16).batch_size == 256
    # what was asked for is kept
    asked = ExtractOptions(num_workers=3, batch_size=4).settings(cpu, 224, cores=2, threads=2)
    assert (asked.num_workers, asked.batch_size, asked.why_workers) == (3, 4, "as asked")
    with pytest.raises(ConfigError, match="workers"):
        ExtractOptions(num_workers=-1)


def test_the_run_reports_the_settings_it_chose(tiled, encoder, tmp_path, capsys):
    root, tiles_src, jobs = tiled
    report = extract_cohort(jobs[:1], tiles_src, tmp_path / "f", encoder,
                            ExtractOptions(batch_size=16, device="cpu", torch_threads=1))
    s = report.settings
    assert (s.batch_size, s.torch_threads, s.device) == (16, 1, "cpu")
    from baselines.extract import available_cores

    assert s.num_workers == (0 if available_cores() <= 1 else min(4, available_cores() - 1))
    assert f"batch 16, {s.num_workers} reading worker(s)" in capsys.readouterr().err


def test_slides_that_tiling_skipped_are_reported_with_its_reason(tiled, encoder, tmp_path, capsys):
    root, tiles_src, jobs = tiled
    tiles = copy_tiles(tiles_src, tmp_path / "tiles")
    (tiles / f"{jobs[0].slide_id}.h5").unlink()
    (tiles / "skipped.csv").write_text(f"slide_id,reason\n{jobs[0].slide_id},cannot open slide: truncated\n")
    report = run(jobs[:2], tiles, tmp_path / "f", encoder)
    assert report.skipped == [(jobs[0].slide_id, "not tiled (`bench tile` skipped it): cannot open slide: truncated")]
    # the CLI refuses a magnification that was never tiled with one message naming the command to run
    work = tmp_path / "work"
    (work / "tiles" / "synth" / "20x-64px").mkdir(parents=True)
    args = ["extract", "--workdir", str(work), "--cohort", str(root), "--dataset", "synth", "--encoder",
            "resnet18-trunc", "--patch-size", "64", "--random-init", "--magnification", "20", "10"]
    assert bench_main(args) == 2
    err = capsys.readouterr().err
    assert "10x-64px" in err and "20x-64px" not in err and "bench tile" in err and "--magnification 20 10" in err


def test_extract_redoes_its_own_files_with_nan_rows_or_missing_attrs_and_says_why(tiled, tmp_path, capsys):
    """Training refuses a file with NaN rows ("extract them again"); extraction must not call it up to date."""
    root, tiles, jobs = tiled
    work = tmp_path / "work"
    shutil.copytree(tiles, work / "tiles" / "synth" / "20x-64px")
    args = ["extract", "--workdir", str(work), "--cohort", str(root), "--dataset", "synth", "--encoder",
            "resnet18-trunc", "--patch-size", "64", "--random-init", "--input-size", "32", "--workers", "0",
            "--batch-size", "64", "--device", "cpu", "--threads", "1"]
    assert bench_main(args) == 0
    out = work / "features" / "synth" / "resnet18-trunc" / "20x-64px"
    capsys.readouterr()
    nan_slide, attr_slide = jobs[1].slide_id, jobs[2].slide_id
    with h5py.File(out / f"{nan_slide}.h5", "a") as f:
        f["features"][2:4] = np.nan  # middle rows: the last row is fine
    with h5py.File(out / f"{attr_slide}.h5", "a") as f:
        del f.attrs["seconds"]
    with pytest.raises(DataError, match="2 of .* feature rows hold NaN or inf; extract them again"):
        read_features(out / f"{nan_slide}.h5")  # what training says
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    spec = build_encoder("resnet18-trunc", random_init=True, seed=0, input_size=32).spec
    assert [j.slide_id for j in pending_slides(jobs, work / "tiles" / "synth" / "20x-64px", out, spec, "random-init",
                                               0)] == [nan_slide, attr_slide]
    assert bench_main(args) == 0
    err = capsys.readouterr().err
    assert f"re-extracting slide {nan_slide}: its feature file {out / nan_slide}.h5 cannot be reused (2 of " in err
    assert "feature rows hold NaN or inf)" in err
    assert f"re-extracting slide {attr_slide}: its feature file {out / attr_slide}.h5 cannot be reused " \
           "(missing attrs: seconds)" in err
    assert "2 new" in err and "are up to date" not in err
    assert np.isfinite(read_features(out / f"{nan_slide}.h5").features).all()
    assert "seconds" in read_features(out / f"{attr_slide}.h5").attrs
    redone = (f"{nan_slide}.h5", f"{attr_slide}.h5")
    assert {n: t for n, t in stamps.items() if n not in redone} == \
        {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5") if p.name not in redone}  # the others not redone
    assert bench_main(args) == 0 and "are up to date" in capsys.readouterr().err


def test_reuse_reads_every_row_only_of_files_changed_since_their_extraction(tiled, encoder, tmp_path, monkeypatch):
    from baselines import features as features_mod

    _, tiles, jobs = tiled
    out = tmp_path / "f"
    run(jobs[:2], tiles, out, encoder)
    full_reads = []
    real = features_mod._non_finite_rows

    def spy(ds, *, everything, **kw):
        full_reads.append((Path(ds.file.filename).stem, everything))
        return real(ds, everything=everything, **kw)

    monkeypatch.setattr(features_mod, "_non_finite_rows", spy)
    assert pending_slides(jobs[:2], tiles, out, encoder.spec, "random-init", 0) == []
    assert full_reads == [(jobs[0].slide_id, False), (jobs[1].slide_id, False)]  # untouched: last row only
    full_reads.clear()
    os.utime(out / f"{jobs[1].slide_id}.h5")  # touched (copied, edited): every row is read
    assert pending_slides(jobs[:2], tiles, out, encoder.spec, "random-init", 0) == []
    assert full_reads == [(jobs[0].slide_id, False), (jobs[1].slide_id, True)]


def test_cli_extract_exit_codes_nothing_produced_is_an_error(tiled, tmp_path, capsys):
    root, tiles, jobs = tiled
    work = tmp_path / "work"
    (work / "tiles" / "synth" / "20x-64px").mkdir(parents=True)  # tiled folder, but no slide has coords in it
    args = ["extract", "--workdir", str(work), "--cohort", str(root), "--dataset", "synth", "--encoder",
            "resnet18-trunc", "--patch-size", "64", "--random-init", "--input-size", "32", "--workers", "0",
            "--device", "cpu", "--threads", "1"]
    assert bench_main(args) == 1
    err = capsys.readouterr().err
    assert "error: no feature file of" in err and "20x" in err and "skipped.csv" in err
