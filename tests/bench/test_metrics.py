"""Bootstrap and paired comparison: equal to scikit-learn / scikit-survival on the same resamples."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score
from sksurv.metrics import concordance_index_censored

from bench.common.errors import ConfigError, DataError
from bench.evaluation.metrics import (
    bootstrap_metrics,
    draw_resamples,
    paired_bootstrap,
    point_values,
    resample_values,
)
from bench.evaluation.tasks import Targets, make_task


def _classification_frame(n: int, k: int, seed: int, slides_per_patient: int = 1, signal: float = 1.0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    y[:k] = np.arange(k)  # every class present
    z = rng.normal(size=(n, k))
    z[np.arange(n), y] += signal
    z = np.round(z, 1)  # rounded logits make tied scores, which AUC must split 1/2
    task = make_task("classification", classes=k)
    patients = [f"p{i // slides_per_patient}" for i in range(n)]
    return task.prediction_frame([f"s{i}" for i in range(n)], patients, Targets(label=y), task.scores(z))


def _survival_frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    time = np.round(rng.exponential(10.0, n))  # tied times
    event = rng.random(n) < 0.6
    risk = np.round(-0.1 * time + rng.normal(size=n), 1)  # tied risks
    return pd.DataFrame(
        {"bag_id": [f"p{i}" for i in range(n)], "patient_id": [f"p{i}" for i in range(n)],
         "time": time, "event": event.astype(int), "risk": risk}
    )


def _loop(task, frame, resamples):
    """Plain loop: materialise each resample and call the scikit-learn / scikit-survival metrics."""
    targets, scores = task.targets_and_scores_from_frame(frame)
    rows = [resamples.rows(r) for r in range(resamples.n_resamples)]
    vals = [task.metrics(targets.subset(ix), scores[ix]) for ix in rows]
    return {m: np.array([v[m] for v in vals]) for m in task.metric_names}


@pytest.mark.parametrize(
    "kind, frame",
    [
        ("binary", _classification_frame(80, 2, seed=0)),
        ("multiclass", _classification_frame(90, 3, seed=1, slides_per_patient=2)),
        ("grading", None),
        ("survival", _survival_frame(70, seed=2)),
    ],
)
def test_vectorised_values_equal_a_loop_over_the_same_resamples(kind, frame):
    if kind in ("binary", "multiclass"):
        task = make_task("classification", classes=2 if kind == "binary" else 3)
    elif kind == "grading":
        task = make_task("grading")
        rng = np.random.default_rng(3)
        y = rng.integers(0, 6, 60)
        pred = np.clip(y + rng.integers(-2, 3, 60), 0, 5)
        frame = task.prediction_frame([f"s{i}" for i in range(60)], [f"p{i // 3}" for i in range(60)],
                                      Targets(label=y), np.eye(6)[pred] * 0.9 + 0.01)
    else:
        task = make_task("survival")
    res = draw_resamples(task, frame, n_resamples=100, seed=7)
    fast = resample_values(task, frame, res)
    slow = _loop(task, frame, res)
    for m in task.metric_names:
        np.testing.assert_allclose(fast[m], slow[m], rtol=0, atol=1e-12, err_msg=m)
    # The point estimate is the same code with unit weights: it equals the reference metrics too.
    ref = task.metrics(*task.targets_and_scores_from_frame(frame))
    for m, v in point_values(task, frame).items():
        assert v == pytest.approx(ref[m], abs=1e-12)

    cis = bootstrap_metrics(task, frame, n_resamples=100, seed=7)
    for m, ci in cis.items():
        assert (ci.low, ci.high) == pytest.approx(tuple(np.percentile(slow[m], [2.5, 97.5])), abs=1e-12)
        assert ci.mean == pytest.approx(slow[m].mean(), abs=1e-12)
        assert ci.std == pytest.approx(slow[m].std(ddof=1), abs=1e-12)
        assert ci.estimate == pytest.approx(ref[m], abs=1e-12)
        assert ci.n_resamples == 100 and ci.n_redraws == res.n_redraws
        assert ci.low <= ci.mean <= ci.high


def test_c_index_with_all_risks_tied_and_an_all_event_tie_group():
    # Only same-time pairs of an event and a censored patient compare within the group at t=5.
    frame = pd.DataFrame({
        "bag_id": list("abcdef"), "patient_id": list("abcdef"),
        "time": [5.0, 5.0, 5.0, 5.0, 7.0, 2.0], "event": [1, 1, 0, 0, 1, 0], "risk": [0.3] * 6,
    })
    task = make_task("survival")
    assert point_values(task, frame)["c_index"] == 0.5
    frame["risk"] = [0.9, 0.1, 0.5, 0.5, 0.2, 0.0]
    t = frame["time"].to_numpy()
    e = frame["event"].to_numpy(bool)
    assert point_values(task, frame)["c_index"] == concordance_index_censored(e, t, frame["risk"].to_numpy())[0]


def test_percentile_interval_matches_scipy_bootstrap_within_monte_carlo_error():
    frame = _classification_frame(200, 2, seed=11, signal=1.2)
    task = make_task("classification")
    targets, scores = task.targets_and_scores_from_frame(frame)
    ci = bootstrap_metrics(task, frame, n_resamples=2000, seed=0, metrics=["auc"])["auc"]
    ref = stats.bootstrap(
        (np.asarray(targets.label), scores[:, 1]), lambda y, s: roc_auc_score(y, s), paired=True,
        vectorized=False, n_resamples=2000, method="percentile", confidence_level=0.95, random_state=1,
    )
    # MC standard error of a 2.5% quantile from 2000 resamples is about 0.06 bootstrap SDs per estimate.
    tol = 0.35 * ci.std
    assert ci.low == pytest.approx(ref.confidence_interval.low, abs=tol)
    assert ci.high == pytest.approx(ref.confidence_interval.high, abs=tol)
    assert ci.std == pytest.approx(ref.standard_error, rel=0.1)


def test_cluster_resampling_keeps_patients_whole():
    sizes = [1, 3, 2, 1, 4, 2, 1, 3]
    patient = np.repeat([f"p{i}" for i in range(len(sizes))], sizes)
    n = patient.size
    rng = np.random.default_rng(0)
    y = np.r_[0, 1, rng.integers(0, 2, n - 2)]
    task = make_task("classification")
    frame = task.prediction_frame([f"s{i}" for i in range(n)], patient, Targets(label=y), rng.dirichlet([1, 1], n))
    frame = frame.sample(frac=1.0, random_state=0).reset_index(drop=True)  # patients' rows scattered
    res = draw_resamples(task, frame, n_resamples=300, seed=5)
    counts = res.counts()
    pid = frame["patient_id"].to_numpy()
    for r in range(res.n_resamples):
        rows = res.rows(r)
        np.testing.assert_array_equal(np.bincount(rows, minlength=n), counts[r])
        # A patient's rows are all in or all out, with the same multiplicity.
        for p in np.unique(pid):
            assert len(set(counts[r, pid == p])) == 1
        assert counts[r, [np.flatnonzero(pid == p)[0] for p in np.unique(pid)]].sum() == len(sizes)


def test_redraws_are_counted_on_a_tiny_imbalanced_set():
    # One positive in six: (5/6)^6 = 33.5% of draws miss it and must be drawn again.
    task = make_task("classification")
    y = np.array([1, 0, 0, 0, 0, 0])
    frame = task.prediction_frame(list("abcdef"), list("abcdef"), Targets(label=y), np.full((6, 2), 0.5))
    res = draw_resamples(task, frame, n_resamples=1000, seed=0)
    assert (res.counts()[:, 0] > 0).all()  # every kept resample holds the positive
    share = res.n_redraws / (res.n_redraws + 1000)
    assert share == pytest.approx((5 / 6) ** 6, abs=0.05)
    ci = bootstrap_metrics(task, frame, n_resamples=1000, seed=0)["auc"]
    assert ci.n_redraws == res.n_redraws and ci.low == ci.high == 0.5
    # Grading: kappa needs two grades; one bag of grade 4 among grade-2 bags (patients of two slides).
    grading = make_task("grading")
    g = np.array([2, 2, 2, 2, 4, 2])
    gframe = grading.prediction_frame(list("abcdef"), ["p0", "p0", "p1", "p1", "p2", "p2"], Targets(label=g), np.eye(6)[g])
    gres = draw_resamples(grading, gframe, n_resamples=300, seed=0)
    assert gres.n_redraws > 0 and (gres.counts()[:, 4] > 0).all()
    assert (resample_values(grading, gframe, gres)["qwk"] == 1.0).all()
    # Survival: a resample without a comparable pair (e.g. only censored patients) is redrawn too.
    surv = pd.DataFrame({"bag_id": list("abc"), "patient_id": list("abc"), "time": [1.0, 2.0, 3.0],
                         "event": [1, 0, 0], "risk": [0.5, 0.2, 0.1]})
    sres = draw_resamples(make_task("survival"), surv, n_resamples=500, seed=1)
    assert sres.n_redraws > 0
    vals = resample_values(make_task("survival"), surv, sres)["c_index"]
    assert np.isfinite(vals).all() and (vals == 1.0).all()


def test_undefined_and_bad_tables_are_refused():
    task = make_task("classification")
    with pytest.raises(DataError, match="every class"):
        bootstrap_metrics(task, task.prediction_frame(["a", "b"], ["a", "b"], Targets(label=np.array([0, 0])),
                                                      np.full((2, 2), 0.5)))
    frame = _classification_frame(20, 2, seed=0)
    with pytest.raises(DataError, match="prob_1"):
        bootstrap_metrics(task, frame.assign(prob_1=np.r_[np.nan, frame["prob_1"].to_numpy()[1:]]))
    with pytest.raises(DataError, match="more than once"):
        bootstrap_metrics(task, pd.concat([frame, frame.iloc[:1]], ignore_index=True))
    with pytest.raises(DataError, match="empty"):
        bootstrap_metrics(task, frame.iloc[:0])
    with pytest.raises(ConfigError, match="c_index"):
        bootstrap_metrics(task, frame, metrics=["c_index"])
    with pytest.raises(ConfigError, match="n_resamples"):
        bootstrap_metrics(task, frame, n_resamples=1)


def test_same_seed_same_numbers_and_json_ready():
    task = make_task("classification", classes=3)
    frame = _classification_frame(60, 3, seed=4)
    a = bootstrap_metrics(task, frame, n_resamples=200, seed=3)
    b = bootstrap_metrics(task, frame, n_resamples=200, seed=3)
    c = bootstrap_metrics(task, frame, n_resamples=200, seed=4)
    assert a == b and a["auc"] != c["auc"]
    text = json.dumps({m: ci.to_dict() for m, ci in a.items()}, allow_nan=False)
    assert json.loads(text)["auc"]["high"] == a["auc"].high


# ----------------------------------------------------------------------------- paired comparison


def _two_methods(n: int, seed: int, noise_a: float, noise_b: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    task = make_task("classification")
    frames = []
    for noise in (noise_a, noise_b):
        s = 1 / (1 + np.exp(-(2 * y - 1 + rng.normal(scale=noise, size=n))))
        frames.append(task.prediction_frame([f"s{i}" for i in range(n)], [f"p{i}" for i in range(n)],
                                            Targets(label=y), np.c_[1 - s, s]))
    return frames[0], frames[1]


def test_paired_detects_a_planted_difference():
    task = make_task("classification")
    good, bad = _two_methods(300, seed=0, noise_a=0.5, noise_b=3.0)
    res = paired_bootstrap(task, good, bad, "auc", n_resamples=1000, seed=0)
    assert res.difference > 0.1 and res.low > 0 and res.significant
    assert res.p_value < 0.01
    assert res.difference == pytest.approx(res.estimate_a - res.estimate_b)
    # The differences come from the same resamples as the two separate bootstraps.
    ra = resample_values(task, good, draw_resamples(task, good, 1000, 0), ["auc"])["auc"]
    rb = resample_values(task, bad, draw_resamples(task, good, 1000, 0), ["auc"])["auc"]
    assert (res.low, res.high) == pytest.approx(tuple(np.percentile(ra - rb, [2.5, 97.5])))
    # Row order of the second table does not matter: it is aligned on bag_id.
    shuffled = bad.sample(frac=1.0, random_state=1).reset_index(drop=True)
    assert paired_bootstrap(task, good, shuffled, "auc", n_resamples=1000, seed=0) == res


def test_paired_does_not_flag_noise():
    task = make_task("classification")
    a, _ = _two_methods(120, seed=1, noise_a=1.0, noise_b=1.0)
    same = paired_bootstrap(task, a, a.copy(), n_resamples=300, seed=0)
    assert same.difference == 0 and same.p_value == 1.0 and not same.significant
    # Two equally good methods: p-values behave like a test at level 5% (few false alarms, not all tiny).
    pvals = []
    for seed in range(40):
        a, b = _two_methods(120, seed=100 + seed, noise_a=1.0, noise_b=1.0)
        pvals.append(paired_bootstrap(task, a, b, "auc", n_resamples=400, seed=seed).p_value)
    pvals = np.array(pvals)
    assert (pvals < 0.05).mean() <= 0.15
    assert np.median(pvals) > 0.25


def test_paired_refuses_different_bags_or_targets():
    task = make_task("classification")
    a, b = _two_methods(30, seed=2, noise_a=1.0, noise_b=1.0)
    with pytest.raises(DataError, match="same bags"):
        paired_bootstrap(task, a, b.iloc[1:])
    with pytest.raises(DataError, match="label"):
        paired_bootstrap(task, a, b.assign(label=1 - b["label"]))
