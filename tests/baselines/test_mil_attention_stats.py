"""Attention statistics against hand-computed cases and an independent AUC formula."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from baselines.mil.attention_stats import attention_auc, max_n, sparsity, summarize_attention
from bench.common.errors import DataError


def pairwise_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney: share of (lesion, other) pairs ranked correctly, ties count half."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_sparsity_hand_cases():
    assert sparsity(np.full(7, 1 / 7)) == 0.0  # uniform: every instance gets its share
    assert sparsity(np.eye(1, 5)[0]) == pytest.approx(80.0)  # one of five activated
    # n = 4, uniform share 0.25: 0.5 and 0.3 activated, 0.1 and 0.1 not
    assert sparsity([0.5, 0.3, 0.1, 0.1]) == pytest.approx(50.0)
    assert sparsity([5.0, 3.0, 1.0, 1.0]) == pytest.approx(50.0)  # scale does not matter
    assert sparsity([0.5, 0.3, 0.1, 0.1], tau=0.3) == pytest.approx(0.0)  # 0.1 >= 0.3 * 0.25


def test_sparsity_batch_with_mask_and_tensors():
    attention = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.6, 0.4, 9.0, 9.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    # second bag: n = 2 valid, share 0.5: 0.6 activated, 0.4 not -> 50
    np.testing.assert_allclose(sparsity(attention, mask), [50.0, 50.0])


def test_max_n_is_n_times_the_largest_noise_attention():
    a = np.array([0.4, 0.3, 0.2, 0.1])
    lesion = np.array([1, 0, 0, 1])
    assert max_n(a, noise=lesion == 0) == pytest.approx(4 * 0.3)
    assert max_n(a) == pytest.approx(4 * 0.4)  # label-free upper bound
    assert max_n(np.full(10, 0.1)) == pytest.approx(1.0)  # uniform attention: 1
    assert np.isnan(max_n(a, noise=np.zeros(4, dtype=bool)))  # no noisy instance


def test_max_n_batch_respects_mask():
    a = np.array([[0.25, 0.25, 0.25, 0.25], [0.2, 0.2, 0.6, 0.0]])
    mask = np.array([[True] * 4, [True, True, True, False]])
    noise = np.array([[True] * 4, [True, True, False, True]])
    np.testing.assert_allclose(max_n(a, noise=noise, mask=mask), [1.0, 3 * 0.2])


def test_attention_auc_matches_pairwise_counting():
    rng = np.random.default_rng(0)
    scores = rng.random(40)
    scores[5] = scores[6]  # a tie
    labels = (rng.random(40) < 0.3).astype(int)
    labels[5], labels[6] = 1, 0
    assert attention_auc(scores, labels) == pytest.approx(pairwise_auc(scores / scores.sum(), labels))
    assert attention_auc([0.1, 0.2, 0.7], [0, 0, 1]) == 1.0
    assert np.isnan(attention_auc([0.5, 0.5], [1, 1]))  # one class only


def test_attention_auc_ignores_padding():
    scores = np.array([[0.1, 0.6, 0.3, 0.9, 0.0]])
    labels = np.array([[0, 1, 0, 0, 1]])
    mask = np.array([[True, True, True, False, False]])
    assert attention_auc(scores, labels, mask)[0] == 1.0


def test_summary_means_over_bags():
    attentions = [np.array([0.7, 0.1, 0.1, 0.1]), np.full(5, 0.2)]
    labels = [np.array([1, 0, 0, 0]), None]
    s = summarize_attention(attentions, labels)
    assert s["sparsity"] == pytest.approx((75.0 + 0.0) / 2)
    assert s["max_n_all"] == pytest.approx((4 * 0.7 + 1.0) / 2)
    assert s["max_n"] == pytest.approx(4 * 0.1)  # only the labelled bag
    assert s["attention_auc"] == 1.0 and s["n_bags_auc"] == 1
    unlabeled = summarize_attention(attentions)
    assert unlabeled["max_n"] is None and unlabeled["attention_auc"] is None


def test_bad_attention_is_refused():
    with pytest.raises(DataError, match="non-negative"):
        sparsity([0.5, -0.1])
    with pytest.raises(DataError, match="NaN"):
        max_n([0.5, float("nan")])
    with pytest.raises(DataError, match="0 or 1"):
        attention_auc([0.5, 0.5], [0, 2])
    with pytest.raises(DataError, match="shape"):
        sparsity(np.zeros((1, 2, 3)))
