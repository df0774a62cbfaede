"""Patch sources: live OpenSlide reads and the packed JPEG store give the same pixels; bad input."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from bench.common.errors import ConfigError, DataError, MissingFileError, SlideError

MAG, PATCH = 10.0, 64


@pytest.fixture(scope="module")
def tiled(synthetic_cohort, tmp_path_factory):
    """(cohort of 4 slides, work folder, coords dir, packed dir) tiled at 10x / 64 px and packed."""
    from bench.data.cohort import load_cohort
    from bench.data.layout import Layout
    from bench.data.tiling import TileParams, tile_slides
    from e2e.patches import pack_cohort

    cohort = load_cohort(synthetic_cohort("subtyping", n_slides=10, width=1024, height=768))
    cohort = cohort.subset(cohort.slide_ids[:4])
    layout = Layout(tmp_path_factory.mktemp("patches-work"))
    tiles = layout.tiles_dir("syn", MAG, PATCH)
    tile_slides(cohort.slide_jobs(), tiles, TileParams(magnification=MAG, patch_size=PATCH), qc=False)
    packed = layout.patches_dir("syn", MAG, PATCH)
    report = pack_cohort(cohort, tiles, packed, quality=95)
    assert report.skipped == [] and report.n_new == 4
    return cohort, layout, tiles, packed


def test_live_and_packed_give_the_same_coords_and_pixels_up_to_jpeg(tiled):
    from e2e.patches import LiveSource, PackedSource, PatchSource, open_source

    cohort, _, tiles, packed = tiled
    live = open_source("live", cohort, {MAG: tiles})
    store = open_source("packed", cohort, {MAG: tiles})  # store folder found next to the coords folder
    assert isinstance(live, LiveSource) and isinstance(store, PackedSource)
    assert isinstance(live, PatchSource) and isinstance(store, PatchSource)
    assert store.packed_dirs == {MAG: packed}
    for slide_id in cohort.slide_ids:
        n = live.n_patches(slide_id, MAG)
        assert n > 5 and store.n_patches(slide_id, MAG) == n
        np.testing.assert_array_equal(live.coords(slide_id, MAG), store.coords(slide_id, MAG))
        idx = [n - 1, 0, 3, 3]  # any order, repeats allowed
        a, b = live.read(slide_id, MAG, idx), store.read(slide_id, MAG, idx)
        assert a.shape == b.shape == (4, PATCH, PATCH, 3) and a.dtype == b.dtype == np.uint8
        diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
        assert diff.mean() < 3 and diff.max() < 40
        np.testing.assert_array_equal(a[2], a[3])
        assert not np.array_equal(a[0], a[1])  # different patches really differ
    assert live.read(cohort.slide_ids[0], MAG, []).shape == (0, PATCH, PATCH, 3)
    live.close()
    store.close()


def test_sources_pickle_without_handles_and_read_the_same_after(tiled):
    from e2e.patches import open_source

    cohort, _, tiles, _ = tiled
    sid = cohort.slide_ids[0]
    for kind in ("live", "packed"):
        src = open_source(kind, cohort, {MAG: tiles})
        before = src.read(sid, MAG, [0, 1])  # opens a handle
        blob = pickle.dumps(src)
        assert b"OpenSlide" not in blob and b"h5py" not in blob
        clone = pickle.loads(blob)
        np.testing.assert_array_equal(clone.read(sid, MAG, [0, 1]), before)
        clone.close()
        src.close()


def test_reads_in_dataloader_workers_match_the_main_process(tiled):
    import torch

    from e2e.patches import open_source

    cohort, _, tiles, _ = tiled
    src = open_source("live", cohort, {MAG: tiles})
    sid = cohort.slide_ids[1]
    src.read(sid, MAG, [0])  # a handle open in the parent must not leak into the workers

    class Items(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> np.ndarray:
            return src.read(sid, MAG, [i])[0]

    got = torch.stack(list(torch.utils.data.DataLoader(Items(), batch_size=None, num_workers=2)))
    np.testing.assert_array_equal(got.numpy(), src.read(sid, MAG, range(4)))
    src.close()


def test_pack_is_resumable_forced_and_redone_when_the_coords_change(tiled, tmp_path):
    from dataclasses import replace

    from bench.data.tiling import TileParams, read_coords, tile_slides, write_coords
    from e2e.patches import pack_cohort

    cohort, _, tiles, _ = tiled
    sub = cohort.subset(cohort.slide_ids[:2])
    tiles2 = tmp_path / "tiles"
    tile_slides(sub.slide_jobs(), tiles2, TileParams(magnification=MAG, patch_size=PATCH), qc=False)
    out = tmp_path / "packed"
    first = pack_cohort(sub, tiles2, out)
    assert first.n_new == 2
    stamp = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    (out / f".{sub.slide_ids[0]}.h5.partial-123-abcdef01").write_bytes(b"half a store")  # a killed run's leftover
    again = pack_cohort(sub, tiles2, out)
    assert again.n_new == 0 and all(r.reused for r in again.done)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")} == stamp
    # re-tiled slide (other coords): its store is redone, the other kept; the leftover goes
    sid = sub.slide_ids[0]
    coords = read_coords(tiles2 / f"{sid}.h5")
    coords = replace(coords, coords=coords.coords[:-1])
    write_coords(tiles2 / f"{sid}.h5", coords)
    third = pack_cohort(sub, tiles2, out)
    assert [r.slide_id for r in third.done if not r.reused] == [sid]
    assert not list(out.glob(".*partial*"))
    from e2e.patches import PackedSource

    assert PackedSource({MAG: out}).n_patches(sid, MAG) == len(coords.coords)
    assert pack_cohort(sub, tiles2, out, force=True).n_new == 2
    with pytest.raises(ConfigError, match="quality"):
        pack_cohort(sub, tiles2, out, quality=0)


def test_unreadable_slide_is_a_slide_error_and_pack_skips_and_reports_it(tiled, tmp_path):
    from bench.data.cohort import load_cohort
    from bench.data.tiling import read_skip_report
    from e2e.patches import LiveSource, pack_cohort

    cohort, _, tiles, _ = tiled
    root = tmp_path / "cohort"
    shutil.copytree(cohort.root, root)
    copy = load_cohort(root).subset(cohort.slide_ids)
    bad = copy.slide_ids[2]
    copy.slide_path(bad).write_text("not a slide any more")
    src = LiveSource(copy, {MAG: tiles})
    with pytest.raises(SlideError) as exc:
        src.read(bad, MAG, [0])
    assert exc.value.slide == bad
    np.testing.assert_array_equal(src.read(copy.slide_ids[0], MAG, [0]), LiveSource(cohort, {MAG: tiles}).read(
        copy.slide_ids[0], MAG, [0]))  # the others still read
    out = tmp_path / "packed"
    report = pack_cohort(copy, tiles, out)
    assert [s for s, _ in report.skipped] == [bad] and report.n_new == 3
    assert read_skip_report(out / "skipped.csv")[0][0] == bad
    assert not (out / f"{bad}.h5").exists()


def test_corrupted_store_entry_is_a_clear_error_naming_slide_and_patch(tiled, tmp_path):
    import h5py

    from e2e.patches import PackedSource

    cohort, _, _, packed = tiled
    sid = cohort.slide_ids[0]
    folder = tmp_path / "packed"
    folder.mkdir()
    shutil.copy(packed / f"{sid}.h5", folder / f"{sid}.h5")
    with h5py.File(folder / f"{sid}.h5", "r+") as f:
        start, end = (int(v) for v in f["offsets"][2:4])
        f["jpeg"][(start + end) // 2] ^= 0xFF  # one flipped byte inside patch 2
    src = PackedSource({MAG: folder})
    src.read(sid, MAG, [0, 1, 3])  # the other entries are fine
    with pytest.raises(SlideError, match=rf"patch 2 of slide '{sid}'.*corrupted.*bench pack") as exc:
        src.read(sid, MAG, [1, 2])
    assert exc.value.slide == sid
    # a truncated store file
    data = (packed / f"{sid}.h5").read_bytes()
    (folder / f"{sid}.h5").write_bytes(data[: len(data) // 3])
    with pytest.raises(SlideError, match=rf"store .*{sid}.* (cannot be read|is inconsistent).*bench pack"):
        PackedSource({MAG: folder}).read(sid, MAG, [0])


def test_bad_requests_are_named(tiled, tmp_path):
    from e2e.patches import PackedSource, open_source, packed_dirs_for

    cohort, _, tiles, _ = tiled
    sid = cohort.slide_ids[0]
    live = open_source("live", cohort, {MAG: tiles})
    n = live.n_patches(sid, MAG)
    with pytest.raises(DataError, match=rf"index {n} is out of range .* {n} patches"):
        live.read(sid, MAG, [0, n])
    with pytest.raises(DataError, match="index -1"):
        open_source("packed", cohort, {MAG: tiles}).read(sid, MAG, [-1])
    with pytest.raises(ConfigError, match=r"no coords folder for 5x \(have 10x\)"):
        live.n_patches(sid, 5.0)
    with pytest.raises(ConfigError, match="unknown patch source 'lmdb'"):
        open_source("lmdb", cohort, {MAG: tiles})
    with pytest.raises(MissingFileError, match="bench pack"):
        PackedSource({MAG: tmp_path}).n_patches(sid, MAG)
    with pytest.raises(MissingFileError, match="bench tile"):
        open_source("live", cohort, {MAG: tmp_path}).n_patches(sid, MAG)
    with pytest.raises(ConfigError, match="pass packed_dirs"):
        packed_dirs_for({MAG: tmp_path})
    assert packed_dirs_for({MAG: Path("/w/tiles/ds/10x-64px")}) == {MAG: Path("/w/patches/ds/10x-64px")}


def test_bench_pack_packs_a_tiled_cohort_resumably_and_names_bench_tile_when_untiled(synthetic_cohort, tmp_path,
                                                                                      capsys):
    from bench.cli.main import main
    from bench.data.cohort import load_cohort
    from bench.data.layout import Layout
    from e2e.patches import LiveSource, PackedSource

    root = synthetic_cohort("subtyping", n_slides=10, width=1024, height=768)
    cohort = load_cohort(root)
    work = tmp_path / "work"
    common = ["--cohort", str(root), "--workdir", str(work), "--dataset", "syn", "--patch-size", str(PATCH)]
    assert main(["tile", "--cohort", str(root), "--out", str(work), "--dataset", "syn", "--magnification", "10",
                 "--patch-size", str(PATCH), "--no-qc"]) == 0
    capsys.readouterr()
    # not tiled at 5x: a one-line error that says which `bench tile` to run, and nothing packed
    assert main(["pack", *common, "--magnification", "10", "5"]) == 2
    err = capsys.readouterr().err
    assert "5x-64px" in err and f"bench tile --cohort {root} --out {work} --magnification 10 5 --patch-size 64" in err
    layout = Layout(work)
    out = layout.patches_dir("syn", MAG, PATCH)
    assert not out.exists()

    assert main(["pack", *common, "--magnification", "10"]) == 0
    err = capsys.readouterr().err
    assert f"packed 10 slides into {out} (10 new, 0 up to date)" in err
    live, store = LiveSource(cohort, {MAG: layout.tiles_dir("syn", MAG, PATCH)}), PackedSource({MAG: out})
    for sid in cohort.slide_ids:
        n = live.n_patches(sid, MAG)
        assert store.n_patches(sid, MAG) == n > 0
        np.testing.assert_array_equal(store.coords(sid, MAG), live.coords(sid, MAG))
        a, b = live.read(sid, MAG, range(n)), store.read(sid, MAG, range(n))  # every patch of the slide
        diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
        assert diff.mean() < 3 and diff.max() < 40, sid  # JPEG q95 4:4:4
    store.close()
    live.close()

    # a rerun keeps every finished store; a lost store is the only one redone
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    assert main(["pack", *common]) == 0  # default magnification: 10x, the E2E main scale
    assert "(0 new, 10 up to date)" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")} == stamps
    lost = out / f"{cohort.slide_ids[3]}.h5"
    lost.unlink()
    assert main(["pack", *common, "--magnification", "10"]) == 0
    assert "(1 new, 9 up to date)" in capsys.readouterr().err
    assert lost.exists()
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5") if p != lost} == \
        {k: v for k, v in stamps.items() if k != lost.name}
