"""train_gma on a small synthetic cohort, from pixels: distributed (torchrun, gloo) and chunked, resume, bad input."""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.common.errors import DataError, TrainingError

pytest.importorskip("e2e.patches", reason="GMA reads patches through e2e.patches")

MAG, PATCH = 10.0, 64  # the tiling of the shared gma_fold fixture (tests/e2e/conftest.py)


# one torch thread: small models on 2 cores run faster, and timings do not fight the other tests
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def fold(gma_fold):
    return gma_fold  # tests/e2e/conftest.py: one tiled cohort for every GMA test module


def config(**kw):
    from e2e.gma.config import GMAConfig

    base = dict(encoder="resnet18-trunc", random_init=True, epochs=2, tiles=8, nproc=3, chunk=8, lr=1e-3,
                magnification=MAG, patch_size=PATCH, input_size=32, precision="fp32", timeout_s=60.0, device="cpu")
    return GMAConfig(**{**base, **kw})


def weights(out: Path) -> dict[str, torch.Tensor]:
    from bench.evaluation.training import load_safetensors

    return {f"{side}.{k}": v for side in ("encoder", "aggregator")
            for k, v in load_safetensors(out / f"{side}.safetensors")[0].items()}


def test_distributed_training_from_pixels_records_metrics_and_per_rank_costs_and_equals_chunked(fold, tmp_path):
    from e2e.gma.trainer import train_gma

    cohort, tiles, bags = fold
    logged = []
    result = train_gma(bags, cohort, tiles, config(workers=1), tmp_path / "dist", echo=False,
                       epoch_callback=lambda epoch, values: logged.append((epoch, values)))
    # predictions: one row per bag, probabilities
    for part in ("val", "test"):
        df = result.predictions[part]
        assert list(df["bag_id"]) == list(bags.parts[part]["bag_id"])
        assert np.allclose(df[["prob_0", "prob_1"]].sum(axis=1), 1.0)
    assert [e for e, _ in logged] == [0, 1] and all("train_loss" in v for _, v in logged)
    assert len(result.history) == 2 and all(math.isfinite(h["train_loss"]) for h in result.history)
    # per-rank costs: 1 aggregator + 2 encoder ranks, each with its own process and step/communication times
    ranks = result.extra["ranks"]
    assert [r["role"] for r in ranks] == ["aggregator", "encoder", "encoder"]
    assert len({r["pid"] for r in ranks}) == 3
    n_steps = 2 * len(bags.parts["train"])
    for r in ranks:
        assert r["steps"] == n_steps and r["step_seconds"] > 0 and 0 < r["comm_seconds"] <= r["step_seconds"]
        assert r["peak_memory_mb"] > 0
    assert ranks[1]["read_seconds"] > 0 and ranks[0]["read_seconds"] == 0  # rank 0 reads no pixels
    assert result.costs["device"].startswith("3 x ") and result.costs["params"] > 0 and result.costs["flops"] > 0
    assert set(weights(tmp_path / "dist")) and result.params["nproc"] == 3
    assert "sparsity" in result.attention
    # the same run in chunked mode on one process: same numbers up to float32 round-off
    chunked = train_gma(bags, cohort, tiles, config(mode="chunked"), tmp_path / "chunked")
    for a, b in zip(result.history, chunked.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    for part in ("val", "test"):
        np.testing.assert_allclose(result.predictions[part]["prob_1"], chunked.predictions[part]["prob_1"],
                                   atol=1e-4)
    assert chunked.extra["ranks"][0]["role"] == "aggregator+encoder"


def test_chunked_resume_gives_the_weights_of_an_uninterrupted_run(fold, tmp_path):
    from e2e.gma.trainer import train_gma

    cohort, tiles, bags = fold
    c = config(mode="chunked", tiles=6)
    straight = train_gma(bags, cohort, tiles, c, tmp_path / "a")
    with pytest.raises(RuntimeError, match="injected fault"):
        train_gma(bags, cohort, tiles, c, tmp_path / "b", fault={"rank": 0, "epoch": 1, "step": 1, "kind": "raise"})
    assert (tmp_path / "b" / "checkpoint" / "aggregator" / "state.pt").exists()
    resumed = train_gma(bags, cohort, tiles, c, tmp_path / "b")
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in straight.history]
    assert list((tmp_path / "b" / "checkpoint").glob("encoder-*")) == [tmp_path / "b" / "checkpoint" / "encoder-1"]


def test_a_checkpoint_of_another_configuration_is_refused(fold, tmp_path):
    from bench.common.errors import ConfigError
    from e2e.gma.trainer import train_gma

    cohort, tiles, bags = fold
    c = config(mode="chunked", epochs=1, tiles=4)
    train_gma(bags, cohort, tiles, c, tmp_path, predict_test=False)
    with pytest.raises(ConfigError, match="another configuration"):
        train_gma(bags, cohort, tiles, replace(c, lr=2e-3), tmp_path, predict_test=False)


def test_a_slide_without_patches_is_refused_before_any_process_starts(fold, tmp_path):
    from bench.data.tiling import read_coords, write_coords
    from e2e.gma.trainer import train_gma

    cohort, tiles, bags = fold
    bad_tiles = tmp_path / "tiles"
    shutil.copytree(tiles[MAG], bad_tiles)
    victim = bags.parts["train"]["slide_ids"].iloc[0][0]
    coords = read_coords(bad_tiles / f"{victim}.h5")
    write_coords(bad_tiles / f"{victim}.h5", replace(coords, coords=coords.coords[:0],
                                                     tissue=None if coords.tissue is None else coords.tissue[:0]))
    with pytest.raises(DataError, match=f"no tissue patches.*{victim}"):
        train_gma(bags, cohort, {MAG: bad_tiles}, config(), tmp_path / "run", echo=False)
    assert not (tmp_path / "run" / "gma" / "job.json").exists()  # nothing was launched


@pytest.mark.slow
def test_distributed_resume_after_a_killed_rank_equals_an_uninterrupted_run(fold, tmp_path):
    from e2e.gma.trainer import train_gma

    cohort, tiles, bags = fold
    c = config()
    train_gma(bags, cohort, tiles, c, tmp_path / "a", echo=False)
    with pytest.raises(TrainingError, match="rank 2 died"):
        train_gma(bags, cohort, tiles, c, tmp_path / "b", echo=False,
                  fault={"rank": 2, "epoch": 1, "step": 0, "kind": "kill"})
    train_gma(bags, cohort, tiles, c, tmp_path / "b", echo=False)
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-6) for k in wa)


@pytest.mark.slow
def test_distributed_survival_on_patient_bags(synthetic_cohort, tmp_path):
    """Survival bags are patients with several slides: K tiles spread over them; C-index recorded."""
    from bench.data.cohort import load_cohort
    from bench.data.splits import SplitSpec, write_splits
    from bench.evaluation.tasks import make_task
    from bench.data.tiling import TileParams, tile_slides
    from bench.evaluation.training import fold_bags
    from e2e.gma.trainer import train_gma

    cohort = load_cohort(synthetic_cohort("survival", n_slides=14, width=768, height=512))
    tile_slides(cohort.slide_jobs(), tmp_path / "tiles", TileParams(magnification=MAG, patch_size=PATCH), qc=False)
    splits = write_splits(cohort, tmp_path, SplitSpec(ratios=(0.5, 0.25, 0.25)), seed=0)
    bags = fold_bags(make_task("survival"), cohort.table, splits, 0)
    result = train_gma(bags, cohort, {MAG: tmp_path / "tiles"}, config(epochs=1), tmp_path / "run", echo=False)
    assert list(result.predictions["test"]["bag_id"]) == list(bags.parts["test"]["bag_id"])
    assert np.isfinite(result.predictions["test"]["risk"]).all()


def test_a_hand_written_config_becomes_the_same_job_as_train_gma_writes(fold, tmp_path):
    """`torchrun ... -m e2e.gma --config gma.toml` (multi-node runs) builds its job from cohort + split + params."""
    from bench.common.errors import ConfigError
    from e2e.gma.config import job_from_config

    cohort, tiles, bags = fold
    toml = tmp_path / "gma.toml"
    toml.write_text(f'''cohort = "{cohort.root}"
tiles = "{tiles[MAG]}"
split = "{bags.split_path}"
out = "{tmp_path / 'run'}"
encoder = "resnet18-trunc"
random_init = true
magnification = {MAG}
patch_size = {PATCH}
input_size = 32
[params]
tiles = 8
nproc = 3
epochs = 2
''')
    job = job_from_config(toml)
    assert job["kind"] == "train" and job["config"]["tiles"] == 8 and job["config"]["nproc"] == 3
    assert job["bags"]["parts"]["test"]["bag_id"] == list(bags.parts["test"]["bag_id"])
    assert job["tiles_dirs"] == {str(MAG): str(tiles[MAG])}
    toml.write_text(toml.read_text().replace("encoder =", "encoders ="))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['encoders'\].*missing key\(s\) \['encoder'\]"):
        job_from_config(toml)
