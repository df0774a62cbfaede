"""GMA pieces that need no extra process: sampling, shares, the chunked step, config, job files, errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bench.common.errors import ConfigError, DataError, TrainingError


# one torch thread: the tests compare numbers, and on a shared 2-core machine 2 threads run slower
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- sampling and shares


def test_share_bounds_are_contiguous_and_differ_by_at_most_one():
    from e2e.gma.core import share_bounds

    assert share_bounds(7, 2).tolist() == [0, 4, 7]
    assert share_bounds(7, 3).tolist() == [0, 3, 5, 7]
    for n in range(0, 30):
        for parts in (1, 2, 3, 5):
            sizes = np.diff(share_bounds(n, parts))
            assert sizes.sum() == n and sizes.max() - sizes.min() <= 1


def test_allocate_spreads_k_over_slides_in_proportion():
    from e2e.gma.core import allocate

    assert allocate([10, 30], 8).tolist() == [2, 6]
    assert allocate([5], 7).tolist() == [7]
    out = allocate([3, 3, 3], 10)
    assert out.sum() == 10 and sorted(out.tolist()) == [3, 3, 4]
    with pytest.raises(DataError, match="at least one patch"):
        allocate([4, 0], 5)


def test_sample_tiles_is_reproducible_and_replaces_only_short_slides():
    from e2e.gma.core import sample_tiles

    a = sample_tiles(["s"], [20], 8, seed=3, epoch=1, step=2)
    b = sample_tiles(["s"], [20], 8, seed=3, epoch=1, step=2)
    assert np.array_equal(a.index, b.index) and len(a) == 8
    assert len(set(a.index.tolist())) == 8  # 20 >= 8: without replacement
    assert not np.array_equal(a.index, sample_tiles(["s"], [20], 8, seed=3, epoch=1, step=3).index)
    short = sample_tiles(["s"], [3], 8, seed=0, epoch=0, step=0)
    assert len(short) == 8 and set(short.index.tolist()) <= {0, 1, 2}  # with replacement
    bag = sample_tiles(["a", "b"], [10, 30], 8, seed=0, epoch=0, step=0)  # a patient bag
    assert np.bincount(bag.slide).tolist() == [2, 6]


def test_load_pixels_keeps_tile_order_across_slides_and_repeats():
    from e2e.gma.core import Tiles, load_pixels

    data = {"a": torch.arange(5.0), "b": 100 + torch.arange(5.0)}
    calls = []

    def pixels(slide_id, indices):
        calls.append((slide_id, indices.tolist()))
        return data[slide_id][torch.as_tensor(indices)].reshape(-1, 1, 1, 1)

    tiles = Tiles(("a", "b"), np.array([1, 0, 1, 0, 0]), np.array([3, 2, 3, 2, 4]))
    got = load_pixels(pixels, tiles).flatten().tolist()
    assert got == [103.0, 2.0, 103.0, 2.0, 4.0]
    assert sorted(calls) == [("a", [2, 4]), ("b", [3])]  # each slide read once, repeats read once


# ----------------------------------------------------------------------------- one-process equivalence


def test_chunked_step_equals_one_process_training_in_float64():
    from e2e.gma.check import CheckProblem, max_relative, run_chunked, run_reference

    for bn in ("none", "frozen"):
        problem = CheckProblem(batchnorm=bn, steps=3)
        ref, got = run_reference(problem), run_chunked(problem)
        for kind in ("grad", "param", "loss"):
            assert max_relative(got, ref, kind) <= 1e-10, (bn, kind)
    # the runs really train: parameters move between steps
    moved = ref["2/param/aggregator/classifier.weight"] - ref["0/param/aggregator/classifier.weight"]
    assert float(moved.abs().max()) > 1e-4


def test_plain_batchnorm_breaks_the_equivalence():
    """Batch statistics over a chunk differ from those over all K tiles (the README's point)."""
    from e2e.gma.check import CheckProblem, max_relative, run_chunked, run_reference

    problem = CheckProblem(batchnorm="plain", steps=2)
    assert max_relative(run_chunked(problem), run_reference(problem), "grad") > 1e-4


def test_chunked_recompute_uses_chunks_of_the_configured_size():
    from e2e.gma.check import CheckProblem, toy_encoder, toy_pixels
    from e2e.gma.core import EncoderSide, sample_tiles

    problem = CheckProblem(chunk=3)
    sizes = []
    model = toy_encoder(problem)
    model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    side = EncoderSide(model, toy_pixels(problem), torch.device("cpu"), problem.dim, chunk=3, recompute=True)
    tiles = sample_tiles(["s1"], [11], 7, 0, 0, 0)
    f = side.forward(tiles)
    side.backward(torch.ones_like(f))
    assert sizes == [3, 3, 1, 3, 3, 1]  # no-grad pass, then the same chunks with gradients


# ----------------------------------------------------------------------------- rank checks


def test_check_ranks_refuses_differing_feature_sizes_and_configs():
    from e2e.gma.core import check_ranks

    ok = [{"rank": r, "feature_dim": 256, "config_hash": "h"} for r in range(3)]
    check_ranks(ok)
    with pytest.raises(ConfigError, match=r"feature size differs between ranks.*rank 2 produces 512"):
        check_ranks(ok[:2] + [{"rank": 2, "feature_dim": 512, "config_hash": "h"}])
    with pytest.raises(ConfigError, match="different configurations"):
        check_ranks(ok[:2] + [{"rank": 2, "feature_dim": 256, "config_hash": "other"}])


def _clear_torchrun_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)


def test_rank_entry_point_refuses_to_start_without_rendezvous(tmp_path, monkeypatch, capsys):
    from e2e.gma.entry import main

    job = tmp_path / "job.json"
    job.write_text(json.dumps({"kind": "check", "out": str(tmp_path)}))
    _clear_torchrun_env(monkeypatch)
    assert main(["--job", str(job)]) == 2
    err = capsys.readouterr().err
    assert "MASTER_ADDR" in err and "torchrun" in err
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(k, v)
    assert main(["--job", str(job)]) == 2
    assert "world size >= 2" in capsys.readouterr().err
    assert json.loads((tmp_path / "errors" / "rank0.json").read_text())["type"] == "ConfigError"


# ----------------------------------------------------------------------------- config


def _tiling(mag=10.0, ps=64, size=32):
    from bench.data.tiling import Tiling

    return Tiling(magnification=mag, patch_size=ps, input_size=size)


def test_config_from_params_and_validation():
    from e2e.gma.config import GMAConfig

    c = GMAConfig.from_params("resnet18-trunc", "gma", {"tiles": 24, "nproc": 3, "epochs": 2}, tiling=_tiling())
    assert (c.tiles, c.nproc, c.mode, c.magnification, c.input_size) == (24, 3, "distributed", 10.0, 32)
    assert GMAConfig.from_params("resnet18-trunc", "gma", {"nproc": 1}, tiling=_tiling()).mode == "chunked"
    assert GMAConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="unknown GMA parameter 'tile'.*did you mean 'tiles'"):
        GMAConfig.from_params("resnet18-trunc", "gma", {"tile": 3}, tiling=_tiling())
    bad = [
        (dict(nproc=1), "world size >= 2"),
        (dict(nproc=4, tiles=2), "at least the number of encoder ranks"),
        (dict(precision="fp16"), "fp16"),
        (dict(mode="chunked", batchnorm="sync"), "statistics per chunk"),
        (dict(recompute=True, batchnorm="sync"), "statistics per chunk"),
        (dict(mode="async"), "mode must be one of"),
        (dict(lr=0), "lr must be a positive number"),
        (dict(timeout_s=-1), "timeout_s"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ConfigError, match=message):
            GMAConfig(encoder="resnet18-trunc", **kwargs)


def test_result_hash_ignores_run_only_settings():
    from e2e.gma.config import GMAConfig

    c = GMAConfig(encoder="resnet18-trunc")
    assert c.result_hash() == replace(c, timeout_s=5.0, workers=2, device="cpu").result_hash()
    assert c.result_hash() != replace(c, tiles=64).result_hash()


# ----------------------------------------------------------------------------- job files


def _bags(task_kind: str):
    from bench.evaluation.tasks import make_task
    from bench.evaluation.training import FoldBags

    if task_kind == "survival":
        task = make_task("survival").fit(make_task("survival").targets_from_frame(
            pd.DataFrame({"time": [1.0, 2.0, 3.0, 4.0], "event": [1, 1, 0, 1]})))
        rows = lambda ids: pd.DataFrame({"bag_id": ids, "patient_id": ids,  # noqa: E731
                                         "slide_ids": [(f"{i}-a", f"{i}-b") for i in ids],
                                         "time": [1.5] * len(ids), "event": [1] * len(ids)})
    else:
        task = make_task("classification", classes=("x", "y"), class_weights="balanced")
        task = task.fit(task.targets_from_frame(pd.DataFrame({"label": [0, 1, 1]})))
        rows = lambda ids: pd.DataFrame({"bag_id": ids, "patient_id": [f"p{i}" for i in ids],  # noqa: E731
                                         "slide_ids": [(i,) for i in ids], "label": [0, 1][: len(ids)]})
    return FoldBags(task=task, parts={"train": rows(["a", "b"]), "val": rows(["c"]), "test": rows(["d", "e"])},
                    split_path=Path("/x/holdout-seed0.csv"), split_sha256="abc", fold=0)


@pytest.mark.parametrize("kind", ["classification", "survival"])
def test_bags_round_trip_through_the_job_file(kind):
    from e2e.gma.config import bags_from_dict, bags_to_dict

    bags = _bags(kind)
    back = bags_from_dict(json.loads(json.dumps(bags_to_dict(bags))))
    assert back.task == bags.task
    for part, df in bags.parts.items():
        pd.testing.assert_frame_equal(back.parts[part][list(df.columns)], df, check_dtype=False)
        assert all(isinstance(s, tuple) for s in back.parts[part]["slide_ids"])
    assert (back.split_sha256, back.fold) == (bags.split_sha256, bags.fold)


# ----------------------------------------------------------------------------- the parent's error message


_SUMMARY = """
Failures:
[1]:
  time      : 2026-11-24_02:09:13
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 9537)  (SIGTERM)
Root Cause (first observed failure):
[0]:
  time      : 2026-11-24_02:09:13
  host      : localhost
  rank      : 2 (local_rank: 2)
  exitcode  : -9 (pid: 9539)  (SIGKILL)
"""


def test_job_error_names_the_root_cause_first(tmp_path):
    from bench.common.files import write_json_atomic
    from e2e.gma.launch import job_error

    # a rank killed by SIGKILL; rank 1 saw the closed connection
    write_json_atomic(tmp_path / "errors" / "rank1.json", {
        "rank": 1, "type": "TrainingError", "message": "rank 1: gathering features failed: Connection closed",
        "communication": True, "time": 2.0, "epoch": None})
    err = job_error(tmp_path, 1, _SUMMARY.splitlines())
    assert isinstance(err, TrainingError)
    assert str(err).startswith("GMA job failed: rank 2 died (SIGKILL)")
    assert "rank 1: TrainingError" in str(err)
    # bad input on one rank comes back as its own type, first
    write_json_atomic(tmp_path / "errors" / "rank0.json", {
        "rank": 0, "type": "DataError", "message": "slide S1 has no patch", "communication": False, "time": 3.0})
    err = job_error(tmp_path, 1, [])
    assert isinstance(err, DataError) and "rank 0 failed: DataError: slide S1 has no patch" in str(err)


def test_read_ahead_reads_the_next_share_in_the_background_with_the_same_features():
    import threading

    from e2e.gma.check import CheckProblem, toy_encoder, toy_pixels
    from e2e.gma.core import EncoderSide, sample_tiles

    problem = CheckProblem()
    base = toy_pixels(problem)
    readers = []

    def pixels(slide_id, indices):
        readers.append(threading.current_thread().name)
        return base(slide_id, indices)

    steps = [sample_tiles(["s1"], [11], 7, 0, 0, i) for i in range(3)]
    plain = EncoderSide(toy_encoder(problem), base, torch.device("cpu"), problem.dim)
    ahead = EncoderSide(toy_encoder(problem), pixels, torch.device("cpu"), problem.dim)
    for i, tiles in enumerate(steps):
        ahead.read_next(steps[i + 1] if i + 1 < len(steps) else None)
        got, want = ahead.forward(tiles), plain.forward(tiles)
        assert torch.equal(got, want)
        ahead.backward(torch.ones_like(got))
        plain.backward(torch.ones_like(want))
    ahead.close()
    assert readers[0] == threading.current_thread().name  # the first share: nothing was read ahead yet
    assert all(r.startswith("gma-read") for r in readers[1:]) and len(readers) == 3


def test_job_cohort_paths_are_absolute_so_ranks_load_it_from_any_folder(synthetic_cohort, tmp_path, monkeypatch):
    # `bench run` with its default relative workdir: the ranks must not join the root twice
    from bench.data.cohort import load_cohort
    from e2e.gma.config import cohort_from_dict, cohort_to_dict

    root = synthetic_cohort("subtyping", n_slides=6)
    monkeypatch.chdir(root.parent)
    job = cohort_to_dict(load_cohort(root.name))  # a relative cohort folder
    assert all(Path(job[k]).is_absolute() for k in ("root", "labels", "slide_dir"))
    monkeypatch.chdir(tmp_path)  # a rank started elsewhere
    assert cohort_from_dict(job).slide_ids == load_cohort(root).slide_ids
