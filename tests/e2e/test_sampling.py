"""MRIS: exact per-scale counts, reproducible draws, replacement only when a slide is short."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.common.errors import ConfigError, DataError
from e2e.sampling import MRISampler, draw, scale_counts, split_by_slide


@pytest.mark.parametrize(("s", "ratios", "expected"), [
    (512, [1.0], [512]),
    (512, [0.75, 0.25], [384, 128]),          # the paper's 10x + 5x at ratio 4
    (10, [0.75, 0.25], [7, 3]),               # ceil(2.5) = 3 from the context scale
    (10, [0.5, 0.25, 0.25], [4, 3, 3]),       # the paper's ceilings on every scale would give 11
    (7, [0.6, 0.3, 0.1], [3, 3, 1]),         # ceil(2.1) = 3, ceil(0.7) = 1
    (100, [0.7, 0.2, 0.1], [70, 20, 10]),     # exact products are not ceiled up by float noise
    (1000, [0.9, 0.1], [900, 100]),
    (1, [0.5, 0.25, 0.25], [0, 1, 0]),        # s too small: the last context scale gives way
    (2, [0.5, 0.25, 0.25], [0, 1, 1]),
])
def test_scale_counts_are_exact(s, ratios, expected):
    counts = scale_counts(s, ratios)
    assert counts == expected and sum(counts) == s


@pytest.mark.parametrize("s", [1, 3, 17, 64, 255, 512, 1024])
@pytest.mark.parametrize("ratios", [[1.0], [0.75, 0.25], [0.5, 0.3, 0.2], [0.1, 0.45, 0.45], [0.6, 0.2, 0.1, 0.1]])
def test_scale_counts_total_s_and_context_ceilings_when_they_fit(s, ratios):
    counts = scale_counts(s, ratios)
    assert sum(counts) == s and min(counts) >= 0
    ceilings = [math.ceil(s * r - 1e-9) for r in ratios[1:]]
    if sum(ceilings) <= s:
        assert counts[1:] == ceilings


@pytest.mark.parametrize(("s", "ratios", "match"), [
    (0, [1.0], "integer >= 1"), (8, [0.5, 0.4], "sum to 1"), (8, [], "at least one"),
    (8, [1.5, -0.5], "positive"), (2.5, [1.0], "integer"),
])
def test_bad_counts_are_refused(s, ratios, match):
    with pytest.raises(ConfigError, match=match):
        scale_counts(s, ratios)


def test_sample_has_the_counts_per_scale_and_valid_distinct_indices():
    sampler = MRISampler([(10.0, 0.75), (5.0, 0.25)], samples=64, seed=3)
    out = sampler.sample("slide-a", {10.0: 500, 5.0: 120}, epoch=0)
    assert list(out) == [10.0, 5.0]
    assert [len(out[10.0]), len(out[5.0])] == [48, 16]
    for m, n in ((10.0, 500), (5.0, 120)):
        idx = out[m]
        assert idx.dtype == np.int64 and idx.min() >= 0 and idx.max() < n
        assert len(np.unique(idx)) == len(idx)  # enough patches: no replacement
        assert np.all(np.diff(idx) > 0)  # sorted


def test_same_seed_same_sample_other_epoch_slide_or_seed_another():
    a = MRISampler([(10.0, 0.75), (5.0, 0.25)], samples=32, seed=0)
    b = MRISampler([(10.0, 0.75), (5.0, 0.25)], samples=32, seed=0)
    avail = {10.0: 400, 5.0: 100}

    def same(x, y):
        return all(np.array_equal(x[m], y[m]) for m in x)

    first = a.sample("s1", avail, epoch=2)
    assert same(first, b.sample("s1", avail, epoch=2))
    assert same(first, a.sample("s1", avail, epoch=2))  # no hidden state consumed
    assert not same(first, a.sample("s1", avail, epoch=3))
    assert not same(first, a.sample("s2", avail, epoch=2))
    assert not same(first, MRISampler([(10.0, 0.75), (5.0, 0.25)], 32, seed=1).sample("s1", avail, epoch=2))
    # over many epochs the draws cover the slide (fresh every epoch, not one fixed subset)
    seen = np.unique(np.concatenate([a.sample("s1", avail, e)[10.0] for e in range(40)]))
    assert len(seen) > 0.9 * 400


def test_replacement_only_when_a_slide_has_too_few_patches():
    sampler = MRISampler([(20.0, 0.5), (10.0, 0.5)], samples=20, seed=0)
    out = sampler.sample("small", {20.0: 10, 10.0: 50}, epoch=0)
    short, enough = out[20.0], out[10.0]
    assert len(short) == 10 and len(enough) == 10
    assert sorted(set(short.tolist())) == list(range(10))  # exactly fits: every patch once, no repeat
    assert len(np.unique(enough)) == 10
    out = sampler.sample("small", {20.0: 4, 10.0: 50}, epoch=1)  # 10 wanted from 4: all 4, then 6 repeats
    assert len(out[20.0]) == 10 and set(out[20.0].tolist()) == {0, 1, 2, 3}
    rng = np.random.default_rng(0)
    assert np.array_equal(np.unique(draw(rng, 3, 8)), [0, 1, 2]) and len(draw(rng, 3, 8)) == 8


def test_one_scale_random_sampling_and_a_scale_without_patches():
    plain = MRISampler([(10.0, 1.0)], samples=16, seed=0)
    assert {m: len(v) for m, v in plain.sample("x", {10.0: 100}, 0).items()} == {10.0: 16}
    sampler = MRISampler([(10.0, 0.75), (5.0, 0.25)], samples=16, seed=0)
    out = sampler.sample("biopsy", {10.0: 40, 5.0: 0}, epoch=0)  # no tissue patch at 5x
    assert len(out[10.0]) == 16 and len(out[5.0]) == 0
    out = sampler.sample("odd", {10.0: 0, 5.0: 40}, epoch=0)
    assert len(out[10.0]) == 0 and len(out[5.0]) == 16
    with pytest.raises(DataError, match="no patches at any sampling scale"):
        sampler.sample("blank", {10.0: 0, 5.0: 0}, epoch=0)
    with pytest.raises(DataError, match="at 5x"):
        sampler.sample("untiled", {10.0: 40}, epoch=0)
    with pytest.raises(ConfigError, match="twice"):
        MRISampler([(10.0, 0.5), (10.0, 0.5)], 8, 0)


def test_split_by_slide_maps_bag_indices_back_to_slides():
    parts = split_by_slide(np.array([0, 2, 5, 6, 9, 9]), [3, 4, 3])
    assert [p.tolist() for p in parts] == [[0, 2], [2, 3], [2, 2]]
