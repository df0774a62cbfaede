"""fold_bags: the bags every trainer receives, and lesion instance labels."""

from __future__ import annotations

import numpy as np
import pytest

from bench.data.cohort import load_cohort
from bench.common.errors import DataError
from bench.data.splits import SplitSpec, write_splits
from bench.evaluation.tasks import make_task
from bench.data.tiling import TileParams, read_coords, tile_slide
from bench.evaluation.training import fold_bags


def test_survival_bags_are_patients_and_bins_come_from_train_only(synthetic_cohort, tmp_path):
    cohort = load_cohort(synthetic_cohort("survival", n_slides=24, width=512, height=512))
    splits = write_splits(cohort, tmp_path, SplitSpec("holdout", ratios=(0.6, 0.2, 0.2)), seed=0)
    fb = fold_bags(make_task("survival"), cohort.table, splits, 0)
    seen = set()
    for part, df in fb.parts.items():
        assert df["bag_id"].is_unique and (df["bag_id"] == df["patient_id"]).all()
        for pid, ids in zip(df["patient_id"], df["slide_ids"]):
            assert set(ids) == set(cohort.patients()[pid])  # every slide of the patient, in one bag
            assert pid not in seen
            seen.add(pid)
            assert all(splits.table.set_index("slide_id").loc[s, "part"] == part for s in ids)
    train = fb.parts["train"]
    times = train["time"].to_numpy(float)[train["event"].to_numpy() == 1]
    assert fb.task.bin_edges == pytest.approx(tuple(np.quantile(times, [0.25, 0.5, 0.75])))


def test_unavailable_slides_are_dropped_and_reported(synthetic_cohort, tmp_path):
    cohort = load_cohort(synthetic_cohort("subtyping", n_slides=12, width=512, height=512))
    splits = write_splits(cohort, tmp_path, SplitSpec("holdout", ratios=(0.5, 0.5), val_fraction=0.25), seed=0)
    task = make_task("classification", classes=cohort.classes)
    gone = splits.ids(0, "train")[:1] + splits.ids(0, "test")[:1]
    fb = fold_bags(task, cohort.table, splits, 0, available=set(cohort.slide_ids) - set(gone),
                   unavailable_reason="not tiled")
    assert sorted(s for s, _ in fb.dropped) == sorted(gone)
    assert {r for _, r in fb.dropped} == {"not tiled"}
    assert not set(gone) & set(fb.slide_ids())
    assert len(fb.slide_ids()) == len(cohort) - 2
    with pytest.raises(DataError, match="no test bag"):
        fold_bags(task, cohort.table, splits, 0, available=splits.ids(0, "train"))


def test_lesion_labels_follow_the_mask(synthetic_cohort, tmp_path):
    cohort = load_cohort(synthetic_cohort("subtyping", n_slides=6))
    slide = cohort.slide_ids[0]
    result = tile_slide(cohort.slide_path(slide), tmp_path, TileParams(magnification=20, patch_size=64), qc=False)
    coords = read_coords(result.coords_path)
    labels = cohort.lesion_labels(slide, coords.coords, coords.patch_size_level0)
    assert labels.shape == (len(coords),) and set(np.unique(labels)) <= {0, 1}
    assert 0 < labels.sum() < len(labels)  # lesions are a minority of the tissue
    loose = cohort.lesion_labels(slide, coords.coords, coords.patch_size_level0, min_fraction=0.01)
    assert (loose >= labels).all() and loose.sum() > labels.sum()
