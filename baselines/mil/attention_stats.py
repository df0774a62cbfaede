"""Attention statistics: sparsity, the MAX-N optimisation-risk proxy, attention AUC.

Pure functions on numpy arrays or torch tensors. Each takes one bag's attention
(N,) and returns a float, or a batch (B, N) (with an optional (B, N) bool mask
of valid instances) and returns an array (B,). Attention is first renormalised
to sum to 1 over the valid instances, so scores of any positive scale work
(MILOutput.attention already sums to 1 for softmax models).

Definitions (ABMILX paper, section 3.3 and appendix A.4):

- **sparsity** (percent). The paper measures "the proportion of activated
  patches" and reports 80 for ABMIL and 13 for TransMIL, so larger means fewer
  activated patches; it gives no threshold. We define: instance i of a bag of n
  valid instances is *activated* when its normalised attention a_i >= tau / n,
  i.e. at least `tau` times what uniform (mean) pooling would give it
  (tau = 1 by default); sparsity = 100 * (1 - #activated / n). Uniform
  attention has sparsity 0; all attention on one instance has 100 * (n - 1) / n.

- **MAX-N** (appendix A.4, verbatim: "the product of the maximum attention score
  of noisy instances for each slide and the total number of instances"):
  MAX-N = n * max_{i in noise} a_i, where `noise` marks the noisy (non-lesion)
  instances. It is 1 when noise gets the uniform share and n when one noisy
  instance takes all attention. Without instance labels, `noise=None` takes the
  maximum over all valid instances, n * max_i a_i: an upper bound of MAX-N (the
  peak-to-uniform ratio). A bag without noisy instances gives NaN.

- **attention AUC**: ROC AUC of the attention scores against binary instance
  labels (1 = lesion), per bag, with scikit-learn; NaN for a bag whose instances
  are all one class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from bench.common.errors import DataError


def _as_numpy(values: Any, dtype: Any = np.float64) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensor, without importing torch here
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def _prepare(attention: Any, mask: Any) -> tuple[np.ndarray, np.ndarray, bool]:
    """(B, N) attention normalised over valid instances, (B, N) valid mask, was-1-D."""
    a = _as_numpy(attention)
    single = a.ndim == 1
    if single:
        a = a[None]
    if a.ndim != 2 or a.shape[1] == 0:
        raise DataError(f"attention must have shape (N,) or (B, N) with N >= 1, got {np.shape(attention)}")
    valid = np.ones(a.shape, dtype=bool) if mask is None else _as_numpy(mask, bool).reshape(a.shape)
    if not np.all(np.isfinite(a[valid])):
        raise DataError("attention contains NaN or inf at valid instances")
    if np.any(a[valid] < 0):
        raise DataError(f"attention must be non-negative, got minimum {a[valid].min():.3g}")
    a = np.where(valid, a, 0.0)
    total = a.sum(axis=1, keepdims=True)
    if np.any(valid.sum(axis=1) == 0) or np.any(total <= 0):
        raise DataError("every bag needs at least one valid instance with positive attention")
    return a / total, valid, single


def _out(values: np.ndarray, single: bool) -> float | np.ndarray:
    return float(values[0]) if single else values


def sparsity(attention: Any, mask: Any = None, tau: float = 1.0) -> float | np.ndarray:
    """Percent of valid instances NOT activated (a_i < tau / n); see the module docstring."""
    if not tau > 0:
        raise DataError(f"tau must be positive, got {tau!r}")
    a, valid, single = _prepare(attention, mask)
    n = valid.sum(axis=1)  # (B,)
    # relative slack so exactly-uniform attention counts as activated despite rounding
    activated = (a * n[:, None] >= tau * (1 - 1e-9)) & valid  # (B, N)
    return _out(100.0 * (1.0 - activated.sum(axis=1) / n), single)


def max_n(attention: Any, noise: Any = None, mask: Any = None) -> float | np.ndarray:
    """MAX-N = n * max attention over noisy instances (all valid ones if `noise` is None)."""
    a, valid, single = _prepare(attention, mask)
    n = valid.sum(axis=1)  # (B,)
    pool = valid if noise is None else valid & _as_numpy(noise, bool).reshape(a.shape)
    peak = np.where(pool, a, -np.inf).max(axis=1)  # (B,)
    return _out(np.where(np.isfinite(peak), n * peak, np.nan), single)


def attention_auc(attention: Any, instance_labels: Any, mask: Any = None) -> float | np.ndarray:
    """ROC AUC of attention vs binary instance labels (1 = lesion), per bag; NaN if one class."""
    a, valid, single = _prepare(attention, mask)
    y = _as_numpy(instance_labels, np.int64).reshape(a.shape)
    if np.any((y[valid] != 0) & (y[valid] != 1)):
        raise DataError(f"instance labels must be 0 or 1, got values {sorted(set(y[valid].tolist()))[:5]}")
    out = np.full(a.shape[0], np.nan)
    for b in range(a.shape[0]):
        yb = y[b][valid[b]]
        if 0 < yb.sum() < yb.size:
            out[b] = roc_auc_score(yb, a[b][valid[b]])
    return _out(out, single)


def summarize_attention(
    attentions: Sequence[Any], instance_labels: Sequence[Any | None] | None = None, tau: float = 1.0
) -> dict[str, float | int | None]:
    """Run-level means over bags (one 1-D attention per bag), for the run record.

    Keys: `sparsity`, `max_n_all` (label-free upper bound), and where instance
    labels exist (1 = lesion): `max_n` (paper's MAX-N, noise = label 0),
    `attention_auc`, and `n_bags_auc` (bags with both classes). Means skip NaN;
    a statistic with no defined value is None.
    """
    if not attentions:
        raise DataError("no bags to summarise")
    labels = list(instance_labels) if instance_labels is not None else [None] * len(attentions)
    if len(labels) != len(attentions):
        raise DataError(f"{len(attentions)} attention vectors but {len(labels)} instance label vectors")
    spars = [sparsity(a, tau=tau) for a in attentions]
    peak = [max_n(a) for a in attentions]
    noisy, aucs = [], []
    for a, y in zip(attentions, labels):
        if y is None:
            continue
        y_arr = _as_numpy(y, np.int64)
        noisy.append(max_n(a, noise=y_arr == 0))
        aucs.append(attention_auc(a, y_arr))

    def mean(values: list[float]) -> float | None:
        finite = [v for v in values if np.isfinite(v)]
        return float(np.mean(finite)) if finite else None

    return {
        "sparsity": mean(spars),
        "max_n_all": mean(peak),
        "max_n": mean(noisy),
        "attention_auc": mean(aucs),
        "n_bags_auc": int(sum(np.isfinite(aucs))),
    }
