"""Task layer: losses, scores and metrics against hand computations and scikit-learn / scikit-survival."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, cohen_kappa_score, f1_score, roc_auc_score
from sklearn.utils.class_weight import compute_class_weight
from sksurv.metrics import concordance_index_censored

from bench.common.errors import ConfigError, DataError
from bench.evaluation.tasks import (
    TASKS,
    Targets,
    balanced_class_weights,
    make_task,
    oversample_indices,
    sampling_weights,
)

# ----------------------------------------------------------------------------- factory


def test_registry_lists_the_three_kinds_and_rejects_unknown_names():
    assert TASKS.names() == ["classification", "grading", "survival"]
    with pytest.raises(ConfigError, match="did you mean: survival"):
        make_task("survial")
    with pytest.raises(ConfigError, match="no parameter 'clases'"):
        make_task("classification", clases=("a", "b"))
    with pytest.raises(ConfigError, match="primary_metric 'c_index'"):
        make_task("classification", primary_metric="c_index")


@pytest.mark.parametrize(
    "kind, params, n_out, primary",
    [
        ("classification", {"classes": ["IDC", "ILC"], "oversample_ratio": 2.0}, 2, "auc"),
        ("classification", {"classes": 3, "class_weights": [1, 2, 3]}, 3, "auc"),
        ("grading", {}, 6, "accuracy"),
        ("survival", {"alpha": 0.4, "bin_edges": [1.0, 2.0, 3.0]}, 4, "c_index"),
    ],
)
def test_to_dict_round_trips_and_describes_the_head(kind, params, n_out, primary):
    task = make_task(kind, **params)
    assert task.n_outputs == n_out
    assert task.primary_metric == primary
    assert set(task.higher_is_better) == set(task.metric_names)
    assert make_task(**task.to_dict()) == task


# ----------------------------------------------------------------------------- classification


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_cross_entropy_equals_the_formula_with_and_without_class_weights():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(7, 3))
    y = np.array([0, 1, 2, 2, 1, 0, 2])
    nll = -_log_softmax(z)[np.arange(7), y]
    task = make_task("classification", classes=3)
    got = task.loss(torch.tensor(z), Targets(label=y)).item()
    assert got == pytest.approx(nll.mean(), rel=1e-12)

    w = np.array([0.5, 2.0, 1.0])
    weighted = make_task("classification", classes=3, class_weights=tuple(w))
    got = weighted.loss(torch.tensor(z), Targets(label=y)).item()
    assert got == pytest.approx((w[y] * nll).sum() / w[y].sum(), rel=1e-12)


def test_balanced_class_weights_match_sklearn_and_are_resolved_by_fit():
    y = np.array([0, 0, 0, 0, 0, 1, 1, 2])
    expected = compute_class_weight("balanced", classes=np.arange(3), y=y)
    np.testing.assert_allclose(balanced_class_weights(y, 3), expected)
    task = make_task("classification", classes=3, class_weights="balanced")
    with pytest.raises(ConfigError, match="fit"):
        task.loss(torch.zeros(1, 3), Targets(label=np.array([0])))
    np.testing.assert_allclose(task.fit(Targets(label=y)).class_weights, expected)


def test_binary_metrics_hand_case():
    # Classic example: positives score 0.35 and 0.8, negatives 0.1 and 0.4 -> 3 of 4 pairs ordered.
    task = make_task("classification")
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    probs = np.c_[1 - p1, p1]
    m = task.metrics(Targets(label=np.array([0, 0, 1, 1])), probs)
    assert m["auc"] == pytest.approx(0.75)
    # argmax predictions 0, 0, 0, 1: recalls 1 and 1/2; F1 of class 0 = 4/5, of class 1 = 2/3.
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["f1_macro"] == pytest.approx((4 / 5 + 2 / 3) / 2)


def test_multiclass_metrics_equal_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 120)
    z = rng.normal(size=(120, 4))
    z[np.arange(120), y] += 1.0
    task = make_task("classification", classes=("a", "b", "c", "d"))
    probs = task.scores(torch.tensor(z))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    m = task.metrics(Targets(label=y), probs)
    pred = probs.argmax(axis=1)
    assert m["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"), abs=1e-12)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))


def test_auc_refuses_a_test_set_without_some_class():
    task = make_task("classification", classes=("IDC", "ILC"))
    with pytest.raises(DataError, match="ILC"):
        task.metrics(Targets(label=np.array([0, 0, 0])), np.full((3, 2), 0.5))


def test_labels_accept_names_or_indices_and_refuse_outsiders():
    task = make_task("classification", classes=("IDC", "ILC"))
    t = task.targets_from_frame(pd.DataFrame({"label": ["ILC", "IDC", "1"]}))
    np.testing.assert_array_equal(t.label, [1, 0, 1])
    np.testing.assert_array_equal(task.targets_from_frame(pd.DataFrame({"label": [1, 0]})).label, [1, 0])
    with pytest.raises(DataError, match="'LCIS'"):
        task.targets_from_frame(pd.DataFrame({"label": ["IDC", "LCIS"]}))
    with pytest.raises(DataError, match="label 2 is outside"):
        task.targets_from_frame(pd.DataFrame({"label": [0, 2]}))
    with pytest.raises(DataError, match="lacks column"):
        task.targets_from_frame(pd.DataFrame({"grade": [0]}))


# ----------------------------------------------------------------------------- grading


def test_quadratic_kappa_hand_case_and_sklearn():
    task = make_task("grading", n_grades=3)
    y = np.array([0, 1, 2, 2])
    pred = np.array([0, 2, 2, 1])
    probs = np.eye(3)[pred]
    # Observed disagreement sum w*O = (1-2)^2 + (2-1)^2 = 2; expected sum w*E with row sums (1,1,2),
    # column sums (1,1,2): sum_ij (i-j)^2 r_i c_j / 4 = (1*1*1 + 1*2*4 + 1*1*1 + 1*2*1 + 2*1*4 + 2*1*1) / 4 = 5.5
    assert task.metrics(Targets(label=y), probs)["qwk"] == pytest.approx(1 - 2 / 5.5)
    assert task.metrics(Targets(label=y), probs)["accuracy"] == pytest.approx(0.5)
    rng = np.random.default_rng(2)
    y = rng.integers(0, 6, 80)
    pred = np.clip(y + rng.integers(-1, 2, 80), 0, 5)
    got = make_task("grading").metrics(Targets(label=y), np.eye(6)[pred])["qwk"]
    assert got == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic", labels=list(range(6))))


def test_kappa_measures_distance_in_grade_values_when_grades_are_missing():
    # Grades 1, 3 and 4 never occur: an error 0 -> 5 must weigh (5-0)^2, not (2-0)^2 as
    # sklearn's default labels (only the grades present) would make it.
    y = np.array([0, 0, 2, 5, 5])
    pred = np.array([0, 5, 2, 5, 0])
    got = make_task("grading").metrics(Targets(label=y), np.eye(6)[pred])["qwk"]
    w = (np.arange(6)[:, None] - np.arange(6)[None, :]) ** 2
    o = np.zeros((6, 6))
    np.add.at(o, (y, pred), 1)
    e = np.outer(o.sum(1), o.sum(0)) / o.sum()
    assert got == pytest.approx(1 - (w * o).sum() / (w * e).sum())
    assert got != pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))


# ----------------------------------------------------------------------------- survival


def _nll_direct(z: np.ndarray, bins: np.ndarray, event: np.ndarray, alpha: float) -> float:
    """Per-sample discrete-time likelihood written out with loops (probability space)."""
    total = 0.0
    for zi, y, e in zip(z, bins, event):
        h = 1 / (1 + np.exp(-zi))
        surv_before = np.prod(1 - h[:y])  # S(y-1): survived every bin before y
        surv_through = np.prod(1 - h[: y + 1])  # S(y)
        unc = -(np.log(surv_before) + np.log(h[y])) if e else 0.0
        cen = 0.0 if e else -np.log(surv_through)
        total += (1 - alpha) * (unc + cen) + alpha * unc
    return total / len(z)


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_nll_survival_loss_equals_direct_formula(alpha):
    rng = np.random.default_rng(3)
    z = rng.normal(scale=2.0, size=(9, 4))
    bins = np.array([0, 1, 2, 3, 0, 3, 2, 1, 3])
    event = np.array([1, 0, 1, 0, 0, 1, 0, 1, 0], dtype=bool)
    task = make_task("survival", alpha=alpha, bin_edges=(1.0, 2.0, 3.0))
    logits = torch.tensor(z, requires_grad=True)
    loss = task.loss(logits, Targets(time=bins + 0.5, event=event, bin=bins))
    assert loss.item() == pytest.approx(_nll_direct(z, bins, event, alpha), rel=1e-10)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # Without a bin column the loss bins the times itself with the task's edges.
    again = task.loss(torch.tensor(z), Targets(time=bins + 0.5, event=event))
    assert again.item() == pytest.approx(loss.item(), rel=1e-12)


def test_survival_loss_is_finite_for_extreme_logits():
    task = make_task("survival", bin_edges=(1.0, 2.0, 3.0))
    z = torch.tensor([[60.0, -60.0, 60.0, -60.0], [-80.0, -80.0, -80.0, -80.0]], requires_grad=True)
    loss = task.loss(z, Targets(time=np.array([0.5, 0.5]), event=np.array([False, True])))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


def test_quartile_bins_use_only_uncensored_training_times():
    rng = np.random.default_rng(4)
    seen = rng.exponential(20.0, size=41)
    censored = rng.exponential(200.0, size=30)  # very different, must not move the edges
    train = Targets(time=np.r_[seen, censored], event=np.r_[np.ones(41, bool), np.zeros(30, bool)])
    task = make_task("survival").fit(train)
    np.testing.assert_allclose(task.bin_edges, np.quantile(seen, [0.25, 0.5, 0.75]))
    moved = Targets(time=np.r_[seen, censored * 10], event=train.event)
    assert make_task("survival").fit(moved).bin_edges == task.bin_edges
    # Each quarter of the uncensored training times lands in its own bin (edges are left-closed).
    counts = np.bincount(task.assign_bins(seen), minlength=4)
    assert counts.sum() == 41 and counts.min() >= 10
    e1, e2, e3 = task.bin_edges
    np.testing.assert_array_equal(task.assign_bins([-1.0, e1, np.nextafter(e1, 0), e3, 1e9]), [0, 1, 0, 3, 3])
    with pytest.raises(DataError, match="no uncensored"):
        make_task("survival").fit(Targets(time=np.array([1.0, 2.0]), event=np.array([False, False])))
    with pytest.raises(ConfigError, match="fit"):
        make_task("survival").assign_bins([1.0])


def test_survival_targets_from_frame_bin_after_fit_and_refuse_bad_values():
    task = make_task("survival")
    df = pd.DataFrame({"time": [5.0, 3.0, 8.0, 1.0, 10.0], "event": [1, 0, 1, 1, 0]})
    unfitted = task.targets_from_frame(df)
    assert unfitted.bin is None
    fitted = task.fit(unfitted)
    np.testing.assert_allclose(fitted.bin_edges, np.quantile([5.0, 8.0, 1.0], [0.25, 0.5, 0.75]))
    np.testing.assert_array_equal(fitted.targets_from_frame(df).bin, fitted.assign_bins(df["time"]))
    with pytest.raises(DataError, match="event must be 0"):
        task.targets_from_frame(df.assign(event=[1, 2, 0, 0, 0]))
    with pytest.raises(DataError, match="'time'"):
        task.targets_from_frame(df.assign(time=[1.0, np.nan, 2.0, 3.0, 4.0]))


def test_risk_is_minus_the_sum_of_the_survival_curve_and_c_index_matches_sksurv():
    rng = np.random.default_rng(5)
    z = rng.normal(size=(50, 4))
    task = make_task("survival")
    h = 1 / (1 + np.exp(-z))
    expected = -np.cumprod(1 - h, axis=1).sum(axis=1)
    risk = task.scores(torch.tensor(z))
    np.testing.assert_allclose(risk, expected, rtol=1e-12)
    time = rng.exponential(10.0, 50).round()  # rounding makes tied times
    event = rng.random(50) < 0.6
    got = task.metrics(Targets(time=time, event=event), risk)["c_index"]
    assert got == concordance_index_censored(event, time, risk)[0]
    # Hand cases: risk ordered like early death -> 1; reversed -> 0.
    t3 = Targets(time=np.array([1.0, 2.0, 3.0]), event=np.array([True, True, True]))
    assert task.metrics(t3, np.array([3.0, 2.0, 1.0]))["c_index"] == 1.0
    assert task.metrics(t3, np.array([1.0, 2.0, 3.0]))["c_index"] == 0.0
    with pytest.raises(DataError, match="comparable"):
        task.metrics(Targets(time=np.array([1.0, 2.0]), event=np.array([False, False])), np.array([1.0, 2.0]))


def test_survival_bags_are_patients():
    labels = pd.DataFrame(
        {"slide_id": ["s1", "s2", "s3"], "patient_id": ["p1", "p1", "p2"], "time": [4.0, 4.0, 9.0], "event": [1, 1, 0]}
    )
    bags = make_task("survival").bag_frame(labels)
    assert list(bags["bag_id"]) == ["p1", "p2"]
    assert list(bags["slide_ids"]) == [("s1", "s2"), ("s3",)]
    with pytest.raises(DataError, match="p1"):
        make_task("survival").bag_frame(labels.assign(time=[4.0, 5.0, 9.0]))
    slides = make_task("classification").bag_frame(labels.assign(label=[0, 1, 1]))
    assert list(slides["bag_id"]) == ["s1", "s2", "s3"]


# ----------------------------------------------------------------------------- predictions table


def test_prediction_frame_round_trip():
    task = make_task("classification", classes=3)
    probs = np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    t = Targets(label=torch.tensor([2, 0]))
    df = task.prediction_frame(["s1", "s2"], ["p1", "p1"], t, probs)
    assert list(df.columns) == ["bag_id", "patient_id", "label", "prob_0", "prob_1", "prob_2"]
    back, scores = task.targets_and_scores_from_frame(df)
    np.testing.assert_array_equal(back.label, [2, 0])
    np.testing.assert_array_equal(scores, probs)

    surv = make_task("survival")
    df = surv.prediction_frame(["p1", "p2"], ["p1", "p2"], Targets(time=np.array([3.0, 4.0]), event=np.array([True, False])), [-1.5, -2.0])
    assert list(df.columns) == ["bag_id", "patient_id", "time", "event", "risk"]
    back, risk = surv.targets_and_scores_from_frame(df)
    np.testing.assert_array_equal(risk, [-1.5, -2.0])
    np.testing.assert_array_equal(back.event, [True, False])
    with pytest.raises(DataError, match="'risk'"):
        surv.targets_and_scores_from_frame(df.assign(risk=[np.nan, 1.0]))


# ----------------------------------------------------------------------------- oversampling


def test_oversampling_reaches_the_ratio_and_keeps_every_item():
    y = np.array([0] * 10 + [1] * 3)
    idx = oversample_indices(y, ratio=2.0, seed=0)
    counts = np.bincount(y[idx])
    assert counts.tolist() == [10, 5]  # IDC:ILC 2:1 as in the paper
    assert set(idx) == set(range(13))  # nobody dropped
    reps = np.bincount(idx, minlength=13)[10:]
    assert reps.max() - reps.min() <= 1  # repeats spread over the minority
    np.testing.assert_array_equal(idx, oversample_indices(y, 2.0, seed=0))
    assert not np.array_equal(idx, oversample_indices(y, 2.0, seed=1))
    with pytest.raises(ConfigError, match="0.5"):
        oversample_indices(y, ratio=0.5, seed=0)


def test_sampling_weights_give_the_same_class_mix():
    y = np.array([0] * 10 + [1] * 3 + [2] * 8)
    w = sampling_weights(y, ratio=2.0)
    assert w.sum() == pytest.approx(1.0)
    mass = np.bincount(y, weights=w)
    np.testing.assert_allclose(mass / mass[1], [10 / 5, 1.0, 8 / 5])
    task = make_task("classification", classes=3, oversample_ratio=2.0)
    order = task.epoch_indices(Targets(label=y), seed=3)
    assert np.bincount(y[order]).tolist() == [10, 5, 8]
