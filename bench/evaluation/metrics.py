"""Bootstrap confidence intervals and paired comparisons for every task metric.

The ABMILX paper reports each metric as the mean and 95% interval of a
1000-resample bootstrap of the test set; this module does that for any
predictions table (see `bench.evaluation.tasks` for its columns), for example:

    cis = bootstrap_metrics(task, predictions, n_resamples=1000, seed=0)
    cis["auc"].low, cis["auc"].high
    paired_bootstrap(task, e2e_predictions, two_stage_predictions, "auc").p_value

Resampling. The unit of resampling is the patient: a resample draws as many
patients as the table has, with replacement, and keeps all rows (slides) of
each drawn patient, so slides of one patient never end up split between
"in" and "out" (a cluster bootstrap). With one row per patient this is the
ordinary bootstrap. A resample on which a metric is undefined is drawn again
and counted in `n_redraws`: classification needs every class (AUC), grading at
least two grades (kappa), survival one comparable pair (C-index).

Vectorisation. A resample is represented by how many times it holds each row
(a rows x resamples count matrix built with one `bincount`), never by
materialised copies. Every metric is a weighted statistic of the fixed rows,
whose geometry (sort orders, search positions) is computed once: AUC by
Mann-Whitney, the negatives sorted once by score and each positive reading the
negative weight below it (ties 1/2) from one cumulative sum; accuracy, balanced accuracy, macro F1 and quadratic kappa from weighted
confusion matrices; Harrell's C-index by weighted counts of concordant pairs
over the rows sorted by time (a divide-and-conquer over time groups, so the
work is O(R n log n), not O(R n^2)). On the same resamples the values equal
scikit-learn / scikit-survival called on the materialised resamples (the tests
check this); `Resamples.rows(r)` gives those materialised row lists.

Paired comparison. Two methods' predictions on the same bags are evaluated on
the *same* resamples; the difference a - b per resample gives the interval.
The two-sided p-value is the percentile-bootstrap one: twice the smaller tail
of the resampled differences on either side of zero, with the usual +1
correction, p = min(1, 2 * (1 + min(#{d <= 0}, #{d >= 0})) / (R + 1)). It is
the smallest alpha at which the (1 - alpha) percentile interval of the
difference excludes 0; identical predictions give p = 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.common.errors import ConfigError, DataError

if TYPE_CHECKING:
    import pandas as pd

    from bench.evaluation.tasks import Targets, Task

# sksurv's concordance_index_censored treats risks within this distance as tied.
CINDEX_TIED_TOL = 1e-8
_MAX_REDRAW_FACTOR = 100
# Rows x resamples handled at once: temporaries of a few MiB stay in cache and are
# reused by the allocator instead of being page-faulted in afresh (2-3x faster than 16 MiB).
_CHUNK_ELEMENTS = 1 << 18


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class MetricCI:
    """One metric with its bootstrap distribution summarised."""

    metric: str
    estimate: float  # on the full table
    mean: float  # of the resampled values
    std: float  # of the resampled values (ddof=1)
    low: float  # percentile interval
    high: float
    confidence: float
    n_resamples: int
    n_redraws: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PairedResult:
    """Difference a - b of one metric between two methods on the same resamples."""

    metric: str
    estimate_a: float
    estimate_b: float
    difference: float  # estimate_a - estimate_b on the full table
    mean: float  # of the resampled differences
    std: float
    low: float
    high: float
    p_value: float  # two-sided percentile-bootstrap p-value (module docstring)
    confidence: float
    n_resamples: int
    n_redraws: int
    seed: int

    @property
    def significant(self) -> bool:
        """True when the interval of the difference excludes 0."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "significant": self.significant}


# ----------------------------------------------------------------------------- resamples


@dataclass(frozen=True, eq=False)
class Resamples:
    """Bootstrap resamples of the rows of one predictions table.

    Attributes:
        unit_index: (R, P) patients drawn by each resample (indices into units).
        unit_of_row: (n,) patient index of each row.
        n_redraws: resamples drawn again because a metric was undefined on them.
        seed: the seed they were drawn with.
    """

    unit_index: np.ndarray
    unit_of_row: np.ndarray
    n_redraws: int
    seed: int

    @property
    def n_resamples(self) -> int:
        return int(self.unit_index.shape[0])

    @property
    def n_units(self) -> int:
        return int(self.unit_index.shape[1])

    def counts(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """(R', n) float64: how many times each row is in resamples start..stop."""
        return _row_counts(self.unit_index[start:stop], self.unit_of_row, self.n_units).T

    def rows(self, r: int) -> np.ndarray:
        """Row indices of resample `r`, materialised (all rows of each drawn patient)."""
        order = np.argsort(self.unit_of_row, kind="stable")
        starts = np.searchsorted(self.unit_of_row[order], np.arange(self.n_units + 1))
        return np.concatenate([order[starts[u] : starts[u + 1]] for u in self.unit_index[r]])


def _row_counts(unit_idx: np.ndarray, unit_of_row: np.ndarray, n_units: int) -> np.ndarray:
    """(n, R) float64 copies of each row in each resample of `unit_idx` (R, P).

    Rows-major on purpose: the metrics gather and cumulate rows, and a row here
    is a contiguous vector over resamples, which is several times faster than
    strided columns.
    """
    r = unit_idx.shape[0]
    flat = (unit_idx.astype(np.int64) * r + np.arange(r)[:, None]).ravel()
    unit_counts = np.bincount(flat, minlength=r * n_units).reshape(n_units, r).astype(np.float64)  # (P, R)
    if unit_of_row.size == n_units and (unit_of_row == np.arange(n_units)).all():
        return unit_counts  # one row per patient, in order: no gather needed
    return unit_counts[unit_of_row]  # (n, R)


def _valid(task: Task, targets: Targets, counts: np.ndarray) -> np.ndarray:
    """(R,) bool: the task's metrics are defined on each resample; `counts` is (n, R)."""
    inside = counts > 0  # (n, R)
    if task.kind == "survival":
        time = np.asarray(targets.time, dtype=np.float64)[:, None]  # (n, 1)
        event = np.asarray(targets.event, dtype=bool)[:, None]
        # A comparable pair exists iff the earliest event has a later time, or a censored tie, beside it.
        t_first = np.where(inside & event, time, np.inf).min(axis=0)  # (R,)
        later = inside & ((time > t_first) | ((time == t_first) & ~event))
        return np.isfinite(t_first) & later.any(axis=0)
    y = np.asarray(targets.label, dtype=np.int64)
    onehot = (y[:, None] == np.arange(task.n_outputs)).astype(np.float64)  # (n, K)
    # counts.T @ onehot, not onehot.T @ counts: OpenBLAS is ~20x slower on the latter's shape.
    present = (counts.T @ onehot) > 0  # (R, K) class occurs in the resample
    if task.kind == "classification":
        return present.all(axis=1)
    return present.sum(axis=1) >= 2


def draw_resamples(task: Task, frame: pd.DataFrame, n_resamples: int = 1000, seed: int = 0) -> Resamples:
    """Draw `n_resamples` patient-level resamples of `frame`, redrawing invalid ones."""
    if not isinstance(n_resamples, (int, np.integer)) or n_resamples < 2:
        raise ConfigError(f"n_resamples must be an integer >= 2, got {n_resamples!r}")
    targets, _ = _checked(task, frame)
    unit_of_row, n_units = _units(frame)
    if not _valid(task, targets, np.ones((len(frame), 1)))[0]:
        raise DataError(_undefined_message(task, len(frame)))
    rng = np.random.default_rng(seed)
    # int32 halves the memory traffic of drawing R x P indices (patients never number 2^31).
    idx = rng.integers(0, n_units, size=(n_resamples, n_units), dtype=np.int32)
    bad = np.flatnonzero(~_valid_chunked(task, targets, idx, unit_of_row, n_units))
    redraws = 0
    while bad.size:
        redraws += bad.size
        if redraws > _MAX_REDRAW_FACTOR * n_resamples:
            raise DataError(
                f"{redraws} resamples had to be redrawn for {n_resamples} valid ones: the {len(frame)} evaluated bags are "
                "too few or too imbalanced for a bootstrap; use a larger test set"
            )
        idx[bad] = rng.integers(0, n_units, size=(bad.size, n_units), dtype=np.int32)
        still = ~_valid_chunked(task, targets, idx[bad], unit_of_row, n_units)
        bad = bad[still]
    return Resamples(unit_index=idx, unit_of_row=unit_of_row, n_redraws=int(redraws), seed=int(seed))


def _valid_chunked(task: Task, targets: Targets, idx: np.ndarray, unit_of_row: np.ndarray, n_units: int) -> np.ndarray:
    if task.kind != "survival" and task.n_outputs <= 62:
        # Classes present per patient as a bit mask; a resample's classes are the OR over its
        # patients: one gather and one reduction over (R, P), no count matrix needed.
        full = (1 << task.n_outputs) - 1
        dtype = np.min_scalar_type(full)  # uint8 for up to 8 classes: less to gather
        bits = np.left_shift(1, np.asarray(targets.label, dtype=np.int64)).astype(dtype)
        unit_mask = np.zeros(n_units, dtype=dtype)
        np.bitwise_or.at(unit_mask, unit_of_row, bits)
        present = np.bitwise_or.reduce(unit_mask[idx], axis=1)  # (R,)
        if task.kind == "classification":
            return present == full
        return (present & (present - 1)) != 0  # at least two bits: two grades
    step = max(1, _CHUNK_ELEMENTS // max(1, unit_of_row.size))
    return np.concatenate(
        [_valid(task, targets, _row_counts(idx[s : s + step], unit_of_row, n_units)) for s in range(0, len(idx), step)]
    )


def _undefined_message(task: Task, n: int) -> str:
    need = {
        "classification": "every class",
        "grading": "at least two grades",
        "survival": "an event before another patient's time (a comparable pair)",
    }[task.kind]
    return f"the {n} evaluated bags do not hold {need}; the {task.kind} metrics are undefined on them"


def _units(frame: pd.DataFrame) -> tuple[np.ndarray, int]:
    import pandas as pd

    codes, uniques = pd.factorize(frame["patient_id"].astype(str), sort=False)
    return codes.astype(np.int64), len(uniques)


def _checked(task: Task, frame: pd.DataFrame) -> tuple[Targets, np.ndarray]:
    if len(frame) == 0:
        raise DataError("the predictions table is empty; nothing to evaluate")
    targets, scores = task.targets_and_scores_from_frame(frame)  # refuses NaN scores and bad targets
    bag = frame["bag_id"].astype(str)
    if bag.duplicated().any():
        raise DataError(f"the predictions table lists bag {bag[bag.duplicated()].iloc[0]!r} more than once")
    return targets, scores


# ----------------------------------------------------------------------------- weighted metrics


class _AUCPlan:
    """Fixed geometry of a weighted Mann-Whitney AUC; each resample only sums weights.

    AUC = sum over (positive i, negative j) of w_i w_j [s_j < s_i] + 1/2 [s_j == s_i],
    divided by (sum w_pos)(sum w_neg), which is what scikit-learn's trapezoidal
    ROC area equals. With the negatives sorted by score once, the negative
    weight strictly below (or tied with) a positive is a prefix sum ending at a
    position found once by `searchsorted`.
    """

    def __init__(self, pos: np.ndarray, score: np.ndarray) -> None:
        self.pos = np.flatnonzero(pos)
        neg = np.flatnonzero(~pos)
        self.neg = neg[np.argsort(score[neg], kind="stable")]
        neg_scores = score[self.neg]
        self.lo = np.searchsorted(neg_scores, score[self.pos], side="left")  # negatives strictly below
        self.hi = np.searchsorted(neg_scores, score[self.pos], side="right")  # ... or tied

    def __call__(self, w: np.ndarray) -> np.ndarray:
        """(R,) AUC for row weights `w` (n, R)."""
        cs = np.empty((self.neg.size + 1, w.shape[1]))
        cs[0] = 0.0
        np.cumsum(w[self.neg], axis=0, out=cs[1:])  # (n_neg+1, R) negative weight by score
        wp = w[self.pos]  # (n_pos, R)
        below = cs[self.lo]
        below += cs[self.hi]  # 2 x (strictly below + 1/2 tied)
        return np.einsum("pr,pr->r", wp, below) / (2.0 * wp.sum(axis=0) * cs[-1])


def _confusion(y: np.ndarray, pred: np.ndarray, k: int, w: np.ndarray) -> np.ndarray:
    """(R, K, K) weighted confusion matrices, rows = truth, columns = prediction; `w` (n, R)."""
    cell = y * k + pred
    order = np.argsort(cell, kind="stable")
    cells, starts = np.unique(cell[order], return_index=True)
    out = np.zeros((k * k, w.shape[1]))
    out[cells] = np.add.reduceat(w[order], starts, axis=0)  # (cells, R)
    return out.T.reshape(-1, k, k)


def _from_confusion(cm: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    k = cm.shape[1]
    diag = np.diagonal(cm, axis1=1, axis2=2)  # (R, K)
    true_n = cm.sum(axis=2)  # (R, K)
    pred_n = cm.sum(axis=1)  # (R, K)
    total = true_n.sum(axis=1)  # (R,)
    out: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        if "accuracy" in names:
            out["accuracy"] = diag.sum(axis=1) / total
        if "balanced_accuracy" in names:  # recall averaged over the classes present in the truth (sklearn)
            has = true_n > 0
            out["balanced_accuracy"] = np.where(has, diag / true_n, 0.0).sum(axis=1) / has.sum(axis=1)
        if "f1_macro" in names:  # F1 averaged over classes present in truth or prediction (sklearn default)
            has = (true_n + pred_n) > 0
            f1 = np.where(has, 2 * diag / (true_n + pred_n), 0.0)
            out["f1_macro"] = f1.sum(axis=1) / has.sum(axis=1)
        if "qwk" in names:
            i = np.arange(k)
            wq = (i[:, None] - i[None, :]) ** 2.0  # (K, K) quadratic disagreement weights
            expected = true_n[:, :, None] * pred_n[:, None, :] / total[:, None, None]  # (R, K, K)
            out["qwk"] = 1.0 - (wq * cm).sum(axis=(1, 2)) / (wq * expected).sum(axis=(1, 2))
    return out


class _CIndexPlan:
    """Fixed geometry of Harrell's C-index so each resample only sums weights.

    A pair (i, j) is comparable when i has an event and t_j > t_i, or t_j == t_i
    and j is censored (scikit-survival's rule); it scores 1 when r_j < r_i - tol,
    1/2 when |r_j - r_i| <= tol. For weights c (copies of each row in a
    resample) the C-index is sum c_i c_j score / sum c_i c_j over comparable
    pairs: copies of one row are never comparable with each other (same time,
    same event status), so this equals the C-index of the materialised resample.

    Comparable pairs are split into passes; in each pass every event row i
    queries one block of rows, and only the rows of that block with risk below
    a threshold count. Pass 0 pairs events with censored rows of the same time;
    the other passes are the levels of a divide-and-conquer over the sorted
    distinct times (level l pairs the left and right halves of blocks of 2^(l+1)
    time groups), so each earlier-later pair is met exactly once.
    """

    def __init__(self, time: np.ndarray, event: np.ndarray, risk: np.ndarray, tol: float = CINDEX_TIED_TOL) -> None:
        n = time.size
        # Global risk positions: r_j < r_i - tol  <=>  pos_j < lo_i;  r_j <= r_i + tol  <=>  pos_j < hi_i.
        by_risk = np.argsort(risk, kind="stable")
        pos = np.empty(n, dtype=np.int64)
        pos[by_risk] = np.arange(n)
        sorted_risk = risk[by_risk]
        lo = np.searchsorted(sorted_risk, risk - tol, side="left")
        hi = np.searchsorted(sorted_risk, risk + tol, side="right")
        _, group = np.unique(time, return_inverse=True)  # time group of each row, ascending
        n_groups = int(group.max()) + 1
        self.passes: list[tuple[np.ndarray, ...]] = []
        # Same-time pairs: event i, censored j in the same group.
        self._add_pass(group, event, ~event, group, pos, lo, hi)
        level = 0
        while (1 << level) < n_groups:
            half = (group >> level) & 1
            block = group >> (level + 1)
            self._add_pass(block, event & (half == 0), half == 1, block, pos, lo, hi)
            level += 1

    def _add_pass(
        self, q_block: np.ndarray, is_query: np.ndarray, is_right: np.ndarray, r_block: np.ndarray,
        pos: np.ndarray, lo: np.ndarray, hi: np.ndarray,
    ) -> None:
        n = pos.size
        right = np.flatnonzero(is_right)
        query = np.flatnonzero(is_query)
        if right.size == 0 or query.size == 0:
            return
        key = r_block[right] * (n + 1) + pos[right]
        order = np.argsort(key, kind="stable")
        right, key = right[order], key[order]
        base = q_block[query] * (n + 1)
        start = np.searchsorted(key, base, side="left")
        end = np.searchsorted(key, base + n + 1, side="left")
        keep = end > start  # events whose block holds no right row add nothing
        query, start, end, base = query[keep], start[keep], end[keep], base[keep]
        if query.size == 0:
            return
        q_lo = np.searchsorted(key, base + lo[query], side="left")
        q_hi = np.searchsorted(key, base + hi[query], side="left")
        self.passes.append((right, query, start, end, q_lo, q_hi))

    def __call__(self, wt: np.ndarray) -> np.ndarray:
        """(R,) C-index for row weights `wt` (n, R)."""
        num = np.zeros(wt.shape[1])
        den = np.zeros(wt.shape[1])
        for right, query, start, end, q_lo, q_hi in self.passes:
            cs = np.zeros((right.size + 1, wt.shape[1]))
            np.cumsum(wt[right], axis=0, out=cs[1:])  # (m+1, R) weight of right rows by (block, risk)
            wq = wt[query]  # (q, R)
            c0 = cs[start]  # (q, R) weight before the query's block
            g = cs[q_lo]  # (q, R) ... up to its concordant rows
            g += cs[q_hi]  # ... up to its tied rows
            g *= 0.5
            g -= c0  # concordant + 1/2 tied weight
            num += np.einsum("qr,qr->r", wq, g)
            c1 = cs[end]
            c1 -= c0  # comparable weight
            den += np.einsum("qr,qr->r", wq, c1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return num / den


class _Evaluator:
    """The metrics of one predictions table for any row weights; geometry computed once."""

    def __init__(self, task: Task, targets: Targets, scores: np.ndarray, names: Sequence[str]) -> None:
        self.names = list(names)
        self.kind = task.kind
        self.k = task.n_outputs
        if task.kind == "survival":
            self.cindex = _CIndexPlan(np.asarray(targets.time, np.float64), np.asarray(targets.event, bool), scores)
            return
        self.y = np.asarray(targets.label, dtype=np.int64)
        self.pred = task.decide(scores)  # the task's operating point, or the argmax
        self.aucs: list[_AUCPlan] = []
        if "auc" in self.names:  # binary: class 1 vs 0; multiclass: one-vs-rest per class
            classes = [1] if self.k == 2 else list(range(self.k))
            self.aucs = [_AUCPlan(self.y == c, scores[:, c]) for c in classes]

    def __call__(self, w: np.ndarray) -> dict[str, np.ndarray]:
        """Each metric (R,) for the weights `w` (n, R) of R resamples."""
        if self.kind == "survival":
            return {"c_index": self.cindex(w)}
        vals = _from_confusion(_confusion(self.y, self.pred, self.k, w), self.names)
        if self.aucs:  # unweighted mean over one-vs-rest AUCs (a single one when binary)
            vals["auc"] = np.mean([plan(w) for plan in self.aucs], axis=0)
        return {m: vals[m] for m in self.names}


def resample_values(task: Task, frame: pd.DataFrame, resamples: Resamples, metrics: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """(R,) value of each metric on each resample of `frame` (vectorised, in chunks of resamples)."""
    names = _metric_names(task, metrics)
    targets, scores = _checked(task, frame)
    if resamples.unit_of_row.size != len(frame):
        raise DataError(f"resamples were drawn for {resamples.unit_of_row.size} rows, the table has {len(frame)}")
    evaluate = _Evaluator(task, targets, scores, names)
    out: dict[str, list[np.ndarray]] = {m: [] for m in names}
    step = max(1, _CHUNK_ELEMENTS // max(1, len(frame)))
    for s in range(0, resamples.n_resamples, step):
        w = _row_counts(resamples.unit_index[s : s + step], resamples.unit_of_row, resamples.n_units)  # (n, R')
        vals = evaluate(w)
        for m in names:
            out[m].append(vals[m])
    return {m: np.concatenate(v) for m, v in out.items()}


def point_values(task: Task, frame: pd.DataFrame, metrics: Sequence[str] | None = None) -> dict[str, float]:
    """Each metric on the full table (the same vectorised code with unit weights)."""
    names = _metric_names(task, metrics)
    targets, scores = _checked(task, frame)
    vals = _Evaluator(task, targets, scores, names)(np.ones((len(frame), 1)))
    return {m: float(v[0]) for m, v in vals.items()}


def _metric_names(task: Task, metrics: Sequence[str] | None) -> list[str]:
    names = list(task.metric_names) if metrics is None else [metrics] if isinstance(metrics, str) else list(metrics)
    for m in names:
        if m not in task.metric_names:
            raise ConfigError(f"{m!r} is not a {task.kind} metric; pick from {list(task.metric_names)}")
    return names


# ----------------------------------------------------------------------------- public API


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _check_confidence(confidence: float) -> None:
    if not (0 < confidence < 1):
        raise ConfigError(f"confidence must be in (0, 1), got {confidence!r}")


def bootstrap_metrics(
    task: Task, frame: pd.DataFrame, n_resamples: int = 1000, seed: int = 0,
    metrics: Sequence[str] | None = None, confidence: float = 0.95,
) -> dict[str, MetricCI]:
    """Point estimate, bootstrap mean/std and percentile interval of each metric.

    Args:
        task: the task whose metrics to compute (`bench.evaluation.tasks.make_task`).
        frame: a predictions table (`bench.evaluation.tasks` module docstring).
        n_resamples: number of valid resamples (redraws not included).
        seed: seed of the resampling; same seed, same intervals.
        metrics: subset of `task.metric_names` (default: all).
        confidence: coverage of the percentile interval.
    """
    _check_confidence(confidence)
    names = _metric_names(task, metrics)
    resamples = draw_resamples(task, frame, n_resamples, seed)
    point = point_values(task, frame, names)
    values = resample_values(task, frame, resamples, names)
    out = {}
    for m in names:
        v = values[m]
        low, high = _interval(v, confidence)
        out[m] = MetricCI(
            metric=m, estimate=point[m], mean=float(v.mean()), std=float(v.std(ddof=1)), low=low, high=high,
            confidence=confidence, n_resamples=resamples.n_resamples, n_redraws=resamples.n_redraws, seed=int(seed),
        )
    return out


def align_frames(task: Task, frame_a: pd.DataFrame, frame_b: pd.DataFrame) -> pd.DataFrame:
    """`frame_b` reordered to `frame_a`'s bags; refuses different bags, patients or targets."""
    _checked(task, frame_a)
    _checked(task, frame_b)
    a = frame_a["bag_id"].astype(str)
    b = frame_b["bag_id"].astype(str)
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        raise DataError(
            f"paired comparison needs predictions for the same bags: {len(only_a)} only in the first "
            f"(e.g. {only_a[:3]}), {len(only_b)} only in the second (e.g. {only_b[:3]}); were they made on the same split?"
        )
    aligned = frame_b.set_axis(b.to_numpy()).loc[a.to_numpy()].reset_index(drop=True)
    for col in ("patient_id", *task.target_columns):
        as_type = str if col == "patient_id" else np.float64
        x, y = frame_a[col].to_numpy().astype(as_type), aligned[col].to_numpy().astype(as_type)
        diff = np.flatnonzero(x != y)
        if diff.size:
            i = int(diff[0])
            raise DataError(f"bag {a.iloc[i]!r} has {col}={x[i]!r} in one table and {y[i]!r} in the other; the tables disagree")
    return aligned


def paired_bootstrap(
    task: Task, frame_a: pd.DataFrame, frame_b: pd.DataFrame, metric: str | None = None,
    n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95,
) -> PairedResult:
    """Compare method a with method b on the same bags and the same resamples.

    Returns the difference a - b (default metric: the task's primary metric)
    with its percentile interval and a two-sided bootstrap p-value (module
    docstring).
    """
    _check_confidence(confidence)
    metric = metric or task.primary_metric
    names = _metric_names(task, [metric])
    frame_b = align_frames(task, frame_a, frame_b)
    resamples = draw_resamples(task, frame_a, n_resamples, seed)
    va = resample_values(task, frame_a, resamples, names)[metric]
    vb = resample_values(task, frame_b, resamples, names)[metric]
    pa = point_values(task, frame_a, names)[metric]
    pb = point_values(task, frame_b, names)[metric]
    d = va - vb
    low, high = _interval(d, confidence)
    r = d.size
    tail = min(int((d <= 0).sum()), int((d >= 0).sum()))
    p = min(1.0, 2.0 * (1 + tail) / (r + 1))
    return PairedResult(
        metric=metric, estimate_a=pa, estimate_b=pb, difference=pa - pb, mean=float(d.mean()), std=float(d.std(ddof=1)),
        low=low, high=high, p_value=p, confidence=confidence, n_resamples=r, n_redraws=resamples.n_redraws, seed=int(seed),
    )
