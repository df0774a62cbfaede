"""Tasks: targets, losses, scores and metrics shared by both paradigms.

The two-stage trainer and the end-to-end trainers differ only in where the
encoder sits; everything a task defines lives here, once:

    >>> task = make_task("classification", classes=("IDC", "ILC"))
    >>> task.n_outputs, task.primary_metric
    (2, 'auc')
    >>> task = make_task("survival")           # 4 bins, learned from training data
    >>> # task = task.fit(task.targets_from_frame(train_bags))

Kinds (`TASKS` registry; `make_task(kind, **params)`):

- ``classification``: cross-entropy (optional class weights, optional
  oversampling of minority classes); scores are class probabilities; metrics
  AUC (binary, or macro one-vs-rest), balanced accuracy, macro F1, accuracy.
- ``grading``: ordinal grades 0..K-1 (PANDA ISUP: K=6) trained with
  cross-entropy; metrics accuracy and quadratic weighted kappa.
- ``survival``: discrete-time NLL survival loss over bins at the quartiles of
  the uncensored event times of the training split; risk = -sum of the
  survival curve; metric Harrell's C-index. Bags are patients.

Bags: for survival a bag is a patient (all slides of the patient
concatenated, ``bag_id = patient_id``); otherwise a bag is a slide
(``bag_id = slide_id``). `Task.bag_frame(labels)` turns a slide-level labels
table into one row per bag.

Predictions table (``predictions.csv``), the contract between trainers,
records, bootstrap and leaderboards, one row per bag:

    bag_id       str    the bag (slide id, or patient id for survival)
    patient_id   str    patient of the bag (the bootstrap resamples patients)
    label        int    classification/grading: class index 0..K-1
    time, event  float, int   survival: follow-up time and 1 = event seen, 0 = censored
    prob_<k>     float  classification/grading: probability of class k (k = 0..K-1)
    risk         float  survival: higher = earlier expected event

`Task.prediction_frame(...)` writes it and `Task.targets_and_scores_from_frame(df)`
reads it back.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Union

import numpy as np

from bench.common.errors import ConfigError, DataError
from bench.common.registry import Registry

if TYPE_CHECKING:
    import pandas as pd
    import torch


@dataclass(frozen=True, eq=False)
class Targets:
    """Targets of a list of bags; fields are numpy arrays or torch tensors of shape (B,).

    Classification/grading fill `label`; survival fills `time`, `event` and,
    once the task is fitted, `bin`.
    """

    label: Any = None  # (B,) int64 class index
    time: Any = None  # (B,) float64 follow-up time
    event: Any = None  # (B,) bool: True = event observed, False = censored
    bin: Any = None  # (B,) int64 discrete time bin 0..n_bins-1

    def _fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def __len__(self) -> int:
        fields = self._fields()
        assert fields, "empty Targets"
        return len(next(iter(fields.values())))

    def subset(self, index: Any) -> Targets:
        """Targets of the bags at `index` (an int array, slice or boolean mask)."""
        if isinstance(index, (int, np.integer)):
            index = [int(index)]
        return Targets(**{k: v[index] for k, v in self._fields().items()})

    def to_torch(self, device: Any = "cpu") -> Targets:
        """Same targets as tensors on `device` (event as bool, label/bin as int64)."""
        import torch

        out = {}
        for k, v in self._fields().items():
            dtype = {"label": torch.int64, "bin": torch.int64, "event": torch.bool, "time": torch.float64}[k]
            out[k] = torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else v, dtype=dtype, device=device)
        return Targets(**out)


# ----------------------------------------------------------------------------- helpers


def balanced_class_weights(labels: Sequence[int] | np.ndarray, n_classes: int) -> tuple[float, ...]:
    """`n / (K * count_k)` per class (scikit-learn's "balanced"); absent classes get 0."""
    y = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    if y.size == 0:
        raise DataError("cannot compute class weights from an empty training set")
    w = np.where(counts > 0, y.size / (n_classes * np.maximum(counts, 1)), 0.0)
    return tuple(float(x) for x in w)


def _oversample_targets(counts: np.ndarray, ratio: float) -> np.ndarray:
    if not (ratio >= 1 and math.isfinite(ratio)):
        raise ConfigError(f"oversample ratio must be a finite number >= 1 (majority:minority), got {ratio}")
    target = np.ceil(counts.max() / ratio)
    return np.where(counts > 0, np.maximum(counts, target), 0).astype(np.int64)


def oversample_indices(labels: Sequence[int] | np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """Item order for one epoch with minority classes repeated up to `majority / ratio` items.

    The ABMILX paper oversamples TCGA-BRCA ILC so that the training set has
    IDC:ILC = 2:1, i.e. ``ratio=2``. Every item appears at least once; the extra
    copies of a class are whole shuffled passes over that class plus a partial
    one drawn without replacement, so repeats are spread evenly. The result is
    shuffled with `seed`.
    """
    y = np.asarray(labels, dtype=np.int64)
    if y.ndim != 1 or y.size == 0:
        raise DataError(f"labels must be a non-empty 1-d array, got shape {y.shape}")
    rng = np.random.default_rng(seed)
    counts = np.bincount(y)
    target = _oversample_targets(counts, ratio)
    chunks = []
    for k in np.flatnonzero(counts):
        members = np.flatnonzero(y == k)
        extra = int(target[k] - counts[k])
        reps = [members]
        while extra > 0:
            take = rng.permutation(members)[: min(extra, members.size)]
            reps.append(take)
            extra -= take.size
        chunks.append(np.concatenate(reps))
    return rng.permutation(np.concatenate(chunks))


def sampling_weights(labels: Sequence[int] | np.ndarray, ratio: float) -> np.ndarray:
    """Per-item sampling probabilities (sum 1) giving the class mix of `oversample_indices`.

    For a `torch.utils.data.WeightedRandomSampler`: each class with fewer than
    `majority / ratio` items gets that much total mass, shared by its items.
    """
    y = np.asarray(labels, dtype=np.int64)
    if y.ndim != 1 or y.size == 0:
        raise DataError(f"labels must be a non-empty 1-d array, got shape {y.shape}")
    counts = np.bincount(y)
    mass = _oversample_targets(counts, ratio).astype(np.float64)
    w = mass[y] / counts[y]
    return w / w.sum()


def _require_columns(df: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{what} lacks column(s) {missing}; it has {list(df.columns)}")


def _finite_column(df: pd.DataFrame, col: str, what: str) -> np.ndarray:
    import pandas as pd

    values = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        ident = df["bag_id"].iloc[i] if "bag_id" in df.columns else df.index[i]
        raise DataError(f"{what}: column {col!r} has a missing or non-numeric value {df[col].iloc[i]!r} at {ident!r}")
    return values


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").double().numpy()
    return np.asarray(x, dtype=np.float64)


# ----------------------------------------------------------------------------- tasks


class _TaskBase:
    """Behaviour every task shares; subclasses are frozen dataclasses."""

    kind: ClassVar[str]
    metric_names: ClassVar[tuple[str, ...]]
    target_columns: ClassVar[tuple[str, ...]]
    bag_level: ClassVar[str]  # "slide" or "patient"
    primary_metric: str

    def _check_primary(self) -> None:
        if self.primary_metric not in self.metric_names:
            raise ConfigError(
                f"primary_metric {self.primary_metric!r} is not a {self.kind} metric; pick one of {list(self.metric_names)}"
            )

    @property
    def higher_is_better(self) -> dict[str, bool]:
        """Every metric of every task is better when higher (AUC, accuracy, kappa, C-index)."""
        return {m: True for m in self.metric_names}

    @property
    def n_outputs(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """`{"kind": ..., **params}`; `make_task(**task.to_dict())` rebuilds the task."""
        out: dict[str, Any] = {"kind": self.kind}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def fit(self, train_targets: Targets) -> Any:
        """Learn what the task needs from the training split only; returns the fitted task."""
        return self

    def epoch_indices(self, train_targets: Targets, seed: int) -> np.ndarray:
        """Order of the training bags for one epoch (shuffled with `seed`)."""
        return np.random.default_rng(seed).permutation(len(train_targets))

    def bag_frame(self, labels: pd.DataFrame) -> pd.DataFrame:
        """One row per bag: `bag_id`, `patient_id`, `slide_ids` (tuple), target columns.

        `labels` has one row per slide (`slide_id`, `patient_id` and the task's
        target columns). Slide tasks keep one bag per slide.
        """
        _require_columns(labels, ("slide_id", "patient_id", *self.target_columns), "labels table")
        df = labels.copy()
        df["slide_id"] = df["slide_id"].astype(str)
        df["patient_id"] = df["patient_id"].astype(str)
        if df["slide_id"].duplicated().any():
            dup = df.loc[df["slide_id"].duplicated(), "slide_id"].iloc[0]
            raise DataError(f"labels table lists slide {dup!r} twice; each slide needs one row")
        if self.bag_level == "slide":
            out = df.assign(bag_id=df["slide_id"], slide_ids=[(s,) for s in df["slide_id"]])
            return out[["bag_id", "patient_id", "slide_ids", *self.target_columns]].reset_index(drop=True)
        rows = []
        for pid, g in df.groupby("patient_id", sort=False):
            for col in self.target_columns:
                if g[col].nunique(dropna=False) > 1:
                    raise DataError(
                        f"patient {pid!r} has slides with different {col!r} values {sorted(g[col].astype(str).unique())}; "
                        "a survival bag is a patient, so its slides must agree"
                    )
            rows.append({"bag_id": pid, "patient_id": pid, "slide_ids": tuple(g["slide_id"]),
                         **{c: g[c].iloc[0] for c in self.target_columns}})
        import pandas as pd

        return pd.DataFrame(rows, columns=["bag_id", "patient_id", "slide_ids", *self.target_columns])

    @property
    def score_columns(self) -> tuple[str, ...]:  # pragma: no cover - overridden
        raise NotImplementedError

    def prediction_frame(
        self, bag_ids: Sequence[str], patient_ids: Sequence[str], targets: Targets, scores: Any
    ) -> pd.DataFrame:
        """The predictions table (see module docstring) for `scores` from `self.scores`."""
        import pandas as pd

        s = _as_numpy(scores)
        n = len(bag_ids)
        if len(patient_ids) != n or len(targets) != n or s.shape[0] != n:
            raise DataError(
                f"prediction_frame needs one row per bag: {n} bag ids, {len(patient_ids)} patient ids, "
                f"{len(targets)} targets, {s.shape[0]} score rows"
            )
        cols: dict[str, Any] = {"bag_id": [str(b) for b in bag_ids], "patient_id": [str(p) for p in patient_ids]}
        for c in self.target_columns:
            v = getattr(targets, c)
            v = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
            cols[c] = v.astype(np.int64) if c in ("label", "event") else v.astype(np.float64)
        s2 = s.reshape(n, -1)
        if s2.shape[1] != len(self.score_columns):
            raise DataError(f"{self.kind} scores need {len(self.score_columns)} column(s), got shape {s.shape}")
        for j, c in enumerate(self.score_columns):
            cols[c] = s2[:, j]
        return pd.DataFrame(cols)

    def targets_and_scores_from_frame(self, df: pd.DataFrame) -> tuple[Targets, np.ndarray]:
        """Inverse of `prediction_frame`: targets and scores ((B, K) probs or (B,) risk)."""
        what = "predictions table"
        _require_columns(df, ("bag_id", "patient_id", *self.target_columns, *self.score_columns), what)
        targets = self._targets_from_columns(df, what)
        scores = np.stack([_finite_column(df, c, what) for c in self.score_columns], axis=1)
        return targets, (scores[:, 0] if self.kind == "survival" else scores)

    def targets_from_frame(self, df: pd.DataFrame) -> Targets:
        """Targets from a labels/bag/split table (one row per bag)."""
        _require_columns(df, self.target_columns, "labels table")
        return self._targets_from_columns(df, "labels table")

    def _targets_from_columns(self, df: pd.DataFrame, what: str) -> Targets:  # pragma: no cover
        raise NotImplementedError


class _CategoricalTask(_TaskBase):
    """Shared code of classification and grading: labels 0..K-1, softmax, cross-entropy."""

    target_columns: ClassVar[tuple[str, ...]] = ("label",)
    bag_level: ClassVar[str] = "slide"
    class_weights: Any

    @property
    def classes(self) -> tuple[str, ...]:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def n_outputs(self) -> int:
        return len(self.classes)

    @property
    def score_columns(self) -> tuple[str, ...]:
        return tuple(f"prob_{k}" for k in range(self.n_outputs))

    def _check_class_weights(self) -> None:
        w = self.class_weights
        if w is None or w == "balanced":
            return
        if isinstance(w, str) or len(w) != self.n_outputs or any(not (x >= 0 and math.isfinite(x)) for x in w):
            raise ConfigError(
                f"class_weights must be None, 'balanced' or {self.n_outputs} non-negative numbers, got {w!r}"
            )

    def fit(self, train_targets: Targets) -> Any:
        """Resolve `class_weights="balanced"` from the training labels."""
        if self.class_weights == "balanced":
            return dataclasses.replace(self, class_weights=balanced_class_weights(np.asarray(train_targets.label), self.n_outputs))
        return self

    def _targets_from_columns(self, df: pd.DataFrame, what: str) -> Targets:
        import pandas as pd

        raw = df["label"]
        names = {c: k for k, c in enumerate(self.classes)}
        if raw.isna().any():
            i = int(np.flatnonzero(raw.isna().to_numpy())[0])
            raise DataError(f"{what}: missing label at row {i}; every bag needs one of {list(self.classes)}")
        if pd.api.types.is_numeric_dtype(raw):
            values = raw.to_numpy(dtype=np.float64)
            bad = (values != np.round(values)) | (values < 0) | (values >= self.n_outputs)
            if bad.any():
                v = raw.iloc[int(np.flatnonzero(bad)[0])]
                v = v.item() if hasattr(v, "item") else v
                raise DataError(
                    f"{what}: label {v!r} is outside the {self.kind} classes 0..{self.n_outputs - 1} "
                    f"({list(self.classes)}); fix the label or the task's classes"
                )
            return Targets(label=values.astype(np.int64))
        out = np.empty(len(raw), dtype=np.int64)
        for i, v in enumerate(raw.astype(str)):
            if v in names:
                out[i] = names[v]
            elif v.isdigit() and int(v) < self.n_outputs:
                out[i] = int(v)
            else:
                raise DataError(
                    f"{what}: label {v!r} is not a {self.kind} class; expected one of {list(self.classes)} "
                    f"or an index 0..{self.n_outputs - 1}"
                )
        return Targets(label=out)

    def loss(self, logits: torch.Tensor, targets: Targets) -> torch.Tensor:
        """Mean cross-entropy of `logits` (B, K) against `targets.label` (B,)."""
        import torch
        import torch.nn.functional as F

        if logits.ndim != 2 or logits.shape[1] != self.n_outputs:
            raise DataError(f"{self.kind} logits must have shape (B, {self.n_outputs}), got {tuple(logits.shape)}")
        y = torch.as_tensor(targets.label, device=logits.device).long().reshape(-1)  # (B,)
        if self.class_weights == "balanced":
            raise ConfigError("class_weights='balanced' is resolved by task.fit(train_targets); call it before training")
        weight = None
        if self.class_weights is not None:
            weight = torch.as_tensor(self.class_weights, dtype=logits.dtype, device=logits.device)  # (K,)
        return F.cross_entropy(logits, y, weight=weight)

    def scores(self, logits: Any) -> np.ndarray:
        """Class probabilities (B, K), softmax in float64."""
        z = _as_numpy(logits).reshape(-1, self.n_outputs)  # (B, K)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def _labels_and_probs(self, targets: Targets, scores: Any) -> tuple[np.ndarray, np.ndarray]:
        y = np.asarray(targets.label, dtype=np.int64).reshape(-1)
        p = np.asarray(scores, dtype=np.float64).reshape(len(y), -1)
        if p.shape[1] != self.n_outputs:
            raise DataError(f"{self.kind} scores must have shape (B, {self.n_outputs}), got {p.shape}")
        if not np.isfinite(p).all():
            raise DataError(f"{self.kind} scores contain NaN or inf; the model diverged or the predictions file is damaged")
        return y, p

    def decide(self, scores: Any) -> np.ndarray:
        """Predicted class of each bag (B,) from (B, K) probabilities: the argmax."""
        return np.asarray(scores, dtype=np.float64).argmax(axis=1)


@dataclass(frozen=True)
class ClassificationTask(_CategoricalTask):
    """Slide classification (subtyping, diagnosis).

    Attributes:
        classes: class names in logit order; the `label` column holds an index
            into it or one of the names. An int `n` means classes "0".."n-1".
        class_weights: None, "balanced" (resolved by `fit` from training labels)
            or one weight per class for the cross-entropy.
        oversample_ratio: None, or majority:minority ratio that `epoch_indices`
            oversamples minority classes to (2.0 = the paper's IDC:ILC 2:1).
        primary_metric: the metric leaderboards sort by.
        threshold: binary operating point on P(class 1) for the threshold-dependent metrics
            (balanced accuracy, F1, accuracy); None = argmax. Chosen on validation
            predictions only (`with_operating_point`), never on the test split.
    """

    kind: ClassVar[str] = "classification"
    metric_names: ClassVar[tuple[str, ...]] = ("auc", "balanced_accuracy", "f1_macro", "accuracy")

    classes: tuple[str, ...] = ("0", "1")
    class_weights: Any = None
    oversample_ratio: float | None = None
    primary_metric: str = "auc"
    threshold: float | None = None

    def __post_init__(self) -> None:
        c = self.classes
        if isinstance(c, (int, np.integer)):
            c = tuple(str(k) for k in range(int(c)))
        c = tuple(str(x) for x in c)
        if len(c) < 2 or len(set(c)) != len(c):
            raise ConfigError(f"classification needs at least 2 distinct class names, got {list(c)}")
        object.__setattr__(self, "classes", c)
        if isinstance(self.class_weights, list):
            object.__setattr__(self, "class_weights", tuple(float(x) for x in self.class_weights))
        self._check_class_weights()
        if self.oversample_ratio is not None:
            _oversample_targets(np.ones(1), float(self.oversample_ratio))  # validates the ratio
        self._check_primary()
        if self.threshold is not None:
            if len(c) != 2:
                raise ConfigError(f"an operating-point threshold needs a binary task, got {len(c)} classes")
            if not (isinstance(self.threshold, (int, float)) and 0.0 <= float(self.threshold) <= 1.0):
                raise ConfigError(f"threshold must be a probability in [0, 1], got {self.threshold!r}")
            object.__setattr__(self, "threshold", float(self.threshold))

    def decide(self, scores: Any) -> np.ndarray:
        """Predicted class (B,): P(class 1) >= `threshold` for a binary task with one, else the argmax."""
        p = np.asarray(scores, dtype=np.float64)
        if self.threshold is None or self.n_outputs != 2:
            return p.argmax(axis=1)
        return (p[:, 1] >= self.threshold).astype(np.int64)

    def with_operating_point(self, val: pd.DataFrame | None) -> tuple[ClassificationTask, dict[str, Any]]:
        """The task with the binary threshold that maximises balanced accuracy on the validation
        predictions `val` (the same threshold maximises Youden's J = TPR + TNR - 1), and what was chosen.

        Candidates are the midpoints between consecutive distinct validation scores (and the ends);
        among equally good ones the closest to 0.5 wins, so a tie does not move the point arbitrarily.
        Falls back to the argmax, visibly (`rule` says why), for a multi-class task, without
        validation predictions, or when the validation part holds one class only.
        """
        dc = dataclasses
        if self.n_outputs != 2:
            return dc.replace(self, threshold=None), {"rule": "argmax", "why": "multi-class: argmax of the scores"}
        if val is None or len(val) == 0:
            return dc.replace(self, threshold=None), {"rule": "argmax", "why": "no validation predictions"}
        targets, p = self.targets_and_scores_from_frame(val)
        y = np.asarray(targets.label)
        if len(np.unique(y)) < 2:
            return dc.replace(self, threshold=None), {
                "rule": "argmax", "why": f"the validation part has one class only ({self.classes[int(y[0])]}): "
                                         "no operating point can be chosen"}
        s = np.unique(p[:, 1])
        candidates = np.concatenate([[0.0], (s[:-1] + s[1:]) / 2, [np.nextafter(s[-1], np.inf)]])
        pos, neg = y == 1, y == 0
        tpr = ((p[:, 1][None, :] >= candidates[:, None]) & pos[None, :]).sum(axis=1) / pos.sum()
        tnr = ((p[:, 1][None, :] < candidates[:, None]) & neg[None, :]).sum(axis=1) / neg.sum()
        bacc = (tpr + tnr) / 2
        best = np.flatnonzero(np.isclose(bacc, bacc.max(), rtol=0, atol=1e-12))
        pick = best[np.argmin(np.abs(candidates[best] - 0.5))]
        threshold = float(min(candidates[pick], 1.0))
        return dc.replace(self, threshold=threshold), {
            "rule": "max validation balanced accuracy (= Youden's J)", "threshold": threshold,
            "val_balanced_accuracy": float(bacc[pick]), "n_val": int(len(y))}

    def epoch_indices(self, train_targets: Targets, seed: int) -> np.ndarray:
        """A shuffled epoch; with `oversample_ratio`, minority classes are repeated (see `oversample_indices`)."""
        if self.oversample_ratio is None:
            return super().epoch_indices(train_targets, seed)
        return oversample_indices(np.asarray(train_targets.label), float(self.oversample_ratio), seed)

    def metrics(self, targets: Targets, scores: Any) -> dict[str, float]:
        """AUC (binary, or unweighted mean of one-vs-rest AUCs), balanced accuracy, macro F1, accuracy.

        Computed with scikit-learn; every class must occur in `targets` (AUC is
        undefined otherwise). The predicted class is `decide(scores)`: the operating point
        when the task has one, else the argmax.
        """
        from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

        y, p = self._labels_and_probs(targets, scores)
        missing = [c for k, c in enumerate(self.classes) if not (y == k).any()]
        if missing:
            raise DataError(
                f"no bag of class(es) {missing} among the {len(y)} evaluated bags; AUC is undefined. "
                "Use a split whose test set holds every class"
            )
        pred = self.decide(p)
        if self.n_outputs == 2:
            auc = roc_auc_score(y, p[:, 1])
        else:  # one-vs-rest per class, then the unweighted mean (sklearn's multi_class="ovr", average="macro")
            auc = np.mean([roc_auc_score(y == k, p[:, k]) for k in range(self.n_outputs)])
        return {
            "auc": float(auc),
            "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
            "f1_macro": float(f1_score(y, pred, average="macro")),
            "accuracy": float(accuracy_score(y, pred)),
        }


@dataclass(frozen=True)
class GradingTask(_CategoricalTask):
    """Ordinal grading (PANDA ISUP 0-5) trained with plain cross-entropy.

    The quadratic weighted kappa uses the grade values 0..K-1 as the scale,
    i.e. scikit-learn's `cohen_kappa_score(..., weights="quadratic",
    labels=range(K))`; without `labels`, scikit-learn would measure distances
    between the grades that happen to occur, not between grade values.
    """

    kind: ClassVar[str] = "grading"
    metric_names: ClassVar[tuple[str, ...]] = ("accuracy", "qwk")

    n_grades: int = 6
    class_weights: Any = None
    # The ABMILX paper reports top-1 accuracy on PANDA; kappa is reported too.
    primary_metric: str = "accuracy"

    def __post_init__(self) -> None:
        if not isinstance(self.n_grades, (int, np.integer)) or self.n_grades < 2:
            raise ConfigError(f"grading needs n_grades >= 2, got {self.n_grades!r}")
        if isinstance(self.class_weights, list):
            object.__setattr__(self, "class_weights", tuple(float(x) for x in self.class_weights))
        self._check_class_weights()
        self._check_primary()

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(str(k) for k in range(int(self.n_grades)))

    def metrics(self, targets: Targets, scores: Any) -> dict[str, float]:
        """Accuracy and quadratic weighted kappa of the argmax grade (scikit-learn)."""
        from sklearn.metrics import accuracy_score, cohen_kappa_score

        y, p = self._labels_and_probs(targets, scores)
        pred = self.decide(p)
        qwk = cohen_kappa_score(y, pred, weights="quadratic", labels=list(range(self.n_outputs)))
        return {"accuracy": float(accuracy_score(y, pred)), "qwk": float(qwk)}


@dataclass(frozen=True)
class SurvivalTask(_TaskBase):
    """Discrete-time survival over patient bags (Zadeh & Schmid NLL loss).

    The logits are per-bin hazards: h = sigmoid(logits) (B, n_bins),
    S(k) = prod_{j<=k} (1 - h_j). For a bag in bin y:

        uncensored (event seen):  -log S(y-1) - log h(y)      (S(-1) = 1)
        censored:                 -log S(y)
        loss = mean((1 - alpha) * (uncensored + censored) + alpha * uncensored)

    as in the CLAM/PORPOISE `nll_loss` (alpha up-weights uncensored bags;
    their later code defaults to 0, which we keep). Departures: the log terms
    are computed in log space (logsigmoid) instead of clamping probabilities at
    1e-7, identical wherever the clamp does not bite; bin edges are the
    quartiles of uncensored times of the *training* split only (PORPOISE uses
    the whole cohort), with open outer bins so validation/test times outside
    the training range fall in the first/last bin. Bins are left-closed like
    PORPOISE's `pd.cut(right=False)`: a time equal to an edge goes to the upper bin.

    Attributes:
        n_bins: number of time bins (4 = quartiles).
        alpha: weight of the uncensored term.
        bin_edges: the n_bins-1 interior edges; None until `fit`.
    """

    kind: ClassVar[str] = "survival"
    metric_names: ClassVar[tuple[str, ...]] = ("c_index",)
    target_columns: ClassVar[tuple[str, ...]] = ("time", "event")
    bag_level: ClassVar[str] = "patient"

    n_bins: int = 4
    alpha: float = 0.0
    bin_edges: tuple[float, ...] | None = None
    primary_metric: str = "c_index"

    def __post_init__(self) -> None:
        if not isinstance(self.n_bins, (int, np.integer)) or self.n_bins < 2:
            raise ConfigError(f"survival needs n_bins >= 2, got {self.n_bins!r}")
        if not (0.0 <= float(self.alpha) <= 1.0):
            raise ConfigError(f"survival alpha must be in [0, 1], got {self.alpha!r}")
        if self.bin_edges is not None:
            edges = tuple(float(x) for x in self.bin_edges)
            if len(edges) != self.n_bins - 1 or any(b < a for a, b in zip(edges, edges[1:])):
                raise ConfigError(f"bin_edges must be {self.n_bins - 1} non-decreasing numbers, got {list(edges)}")
            object.__setattr__(self, "bin_edges", edges)
        self._check_primary()

    @property
    def n_outputs(self) -> int:
        return int(self.n_bins)

    @property
    def score_columns(self) -> tuple[str, ...]:
        return ("risk",)

    def fit(self, train_targets: Targets) -> SurvivalTask:
        """Set `bin_edges` at the quantiles k/n_bins of the uncensored training times."""
        time = np.asarray(train_targets.time, dtype=np.float64)
        event = np.asarray(train_targets.event, dtype=bool)
        seen = time[event]
        if seen.size == 0:
            raise DataError("the training split has no uncensored patient; survival bins cannot be set")
        edges = np.quantile(seen, np.arange(1, self.n_bins) / self.n_bins)
        return dataclasses.replace(self, bin_edges=tuple(float(e) for e in edges))

    def assign_bins(self, time: Any) -> np.ndarray:
        """Bin of each time (int64); needs a fitted task."""
        if self.bin_edges is None:
            raise ConfigError("survival bins are not set; call task = task.fit(train_targets) first")
        return np.searchsorted(np.asarray(self.bin_edges), np.asarray(time, dtype=np.float64), side="right").astype(np.int64)

    def _targets_from_columns(self, df: pd.DataFrame, what: str) -> Targets:
        time = _finite_column(df, "time", what)
        if (time < 0).any():
            raise DataError(f"{what}: negative survival time {time[time < 0][0]!r}; times must be >= 0")
        ev = df["event"]
        if ev.dtype == bool:
            event = ev.to_numpy()
        else:
            raw = _finite_column(df, "event", what)
            bad = ~np.isin(raw, (0.0, 1.0))
            if bad.any():
                raise DataError(f"{what}: event must be 0 (censored) or 1 (event seen), got {raw[bad][0]!r}")
            event = raw.astype(bool)
        bins = self.assign_bins(time) if self.bin_edges is not None else None
        return Targets(time=time, event=event, bin=bins)

    def loss(self, logits: torch.Tensor, targets: Targets) -> torch.Tensor:
        """Mean discrete-time NLL of `logits` (B, n_bins) (see class docstring)."""
        import torch
        import torch.nn.functional as F

        if logits.ndim != 2 or logits.shape[1] != self.n_bins:
            raise DataError(f"survival logits must have shape (B, {self.n_bins}), got {tuple(logits.shape)}")
        if targets.bin is not None:
            y = torch.as_tensor(targets.bin, device=logits.device).long().reshape(-1, 1)  # (B, 1)
        else:
            y = torch.as_tensor(self.assign_bins(_as_numpy(targets.time)), device=logits.device).reshape(-1, 1)
        event = torch.as_tensor(targets.event, device=logits.device).reshape(-1, 1).to(logits.dtype)  # (B, 1)
        log_h = F.logsigmoid(logits)  # (B, K) log hazard
        log_s = torch.cumsum(F.logsigmoid(-logits), dim=1)  # (B, K) log S(k)
        log_s_pad = torch.cat([torch.zeros_like(log_s[:, :1]), log_s], dim=1)  # (B, K+1); column k = log S(k-1)
        uncensored = -event * (log_s_pad.gather(1, y) + log_h.gather(1, y))  # (B, 1)
        censored = -(1.0 - event) * log_s_pad.gather(1, y + 1)  # (B, 1)
        loss = (1.0 - self.alpha) * (uncensored + censored) + self.alpha * uncensored
        return loss.mean()

    def scores(self, logits: Any) -> np.ndarray:
        """Risk (B,) = -sum_k S(k), S = cumprod(1 - sigmoid(logits)), in float64."""
        z = _as_numpy(logits).reshape(-1, self.n_bins)  # (B, K)
        log_s = np.cumsum(-np.logaddexp(0.0, z), axis=1)  # (B, K) log S(k); log(1 - sigmoid(z)) = -log(1 + e^z)
        return -np.exp(log_s).sum(axis=1)

    def metrics(self, targets: Targets, scores: Any) -> dict[str, float]:
        """Harrell's C-index (scikit-survival `concordance_index_censored`, risk ties count 1/2)."""
        from sksurv.exceptions import NoComparablePairException
        from sksurv.metrics import concordance_index_censored

        risk = np.asarray(scores, dtype=np.float64).reshape(-1)
        if not np.isfinite(risk).all():
            raise DataError("survival risks contain NaN or inf; the model diverged or the predictions file is damaged")
        event = np.asarray(targets.event, dtype=bool)
        time = np.asarray(targets.time, dtype=np.float64)
        c = float("nan")
        if event.any() and len(risk) >= 2:  # sksurv raises a bare ValueError for these
            try:
                c = concordance_index_censored(event, time, risk)[0]
            except NoComparablePairException:
                pass
        if not np.isfinite(c):
            raise DataError(
                f"no comparable pair among {len(risk)} patients (an event before another patient's time); "
                "the C-index is undefined"
            )
        return {"c_index": float(c)}


Task = Union[ClassificationTask, GradingTask, SurvivalTask]

TASKS: Registry[type] = Registry("task")
TASKS.register("classification", ClassificationTask)
TASKS.register("grading", GradingTask)
TASKS.register("survival", SurvivalTask)


def make_task(kind: str, **params: Any) -> Task:
    """Build a task by name; unknown parameters are an error that lists the known ones."""
    cls = TASKS.get(kind)
    known = sorted(f.name for f in dataclasses.fields(cls))
    for k in params:
        if k not in known:
            raise ConfigError(f"{kind} task has no parameter {k!r}; known: {known}")
    return cls(**params)
