"""Fixtures shared by the GMA tests (trainer and launcher)."""

from __future__ import annotations

import pytest

GMA_MAG, GMA_PATCH = 10.0, 64


@pytest.fixture(scope="session")
def gma_fold(synthetic_cohort, tmp_path_factory):
    """(cohort, {mag: coords dir}, FoldBags) of a 10-slide subtyping cohort tiled at 10x / 64 px (read-only)."""
    from bench.data.cohort import load_cohort
    from bench.data.splits import SplitSpec, write_splits
    from bench.data.tiling import TileParams, tile_slides
    from bench.evaluation.tasks import make_task
    from bench.evaluation.training import fold_bags

    cohort = load_cohort(synthetic_cohort("subtyping", n_slides=10, width=1024, height=768))
    work = tmp_path_factory.mktemp("gma-fold")
    tiles = work / "tiles"
    tile_slides(cohort.slide_jobs(), tiles, TileParams(magnification=GMA_MAG, patch_size=GMA_PATCH), qc=False)
    splits = write_splits(cohort, work, SplitSpec(ratios=(0.5, 0.25, 0.25)), seed=0)
    bags = fold_bags(make_task("classification", classes=cohort.classes), cohort.table, splits, 0)
    return cohort, {GMA_MAG: tiles}, bags
