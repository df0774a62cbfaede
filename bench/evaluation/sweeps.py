"""Where a sweep's results live and how they are read back (`bench sweep` writes them).

`sweeps/<suite>/<method>/<dataset>/<split>/best.json` holds the best parameters of the study of
one split (e.g. `kfold-seed0-fold2`: tuning is nested, one study per split);
the runner (`--params best`) and the leaderboard's sweep section read it here, so neither
needs the sweep machinery (`bench.orchestration.sweep`) that writes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.common.errors import DataError
from bench.data.layout import Layout


def sweep_dir(layout: Layout, suite: str, method: str, dataset: str, split: str) -> Path:
    """`sweeps/<suite>/<method>/<dataset>/<split>/`: one study per method, dataset and split."""
    return layout.sweep_dir(suite, f"{method}/{dataset}/{split}")


def sweep_splits(layout: Layout, suite: str, method: str, dataset: str) -> list[str]:
    """Split tags that have a sweep folder for (suite, method, dataset), sorted."""
    root = layout.sweep_dir(suite, f"{method}/{dataset}")
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def read_best(layout: Layout, suite: str, method: str, dataset: str, split: str) -> dict[str, Any] | None:
    """The `best.json` of a split's finished sweep, or None when there is none."""
    path = sweep_dir(layout, suite, method, dataset, split) / "best.json"
    if not path.exists():
        return None
    try:
        best = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"sweep results {path} are damaged ({exc}); rerun `bench sweep` to rewrite them") from None
    if not isinstance(best.get("best_params"), dict):
        return None  # a sweep without a completed trial has no best parameters
    return best


__all__ = ["sweep_dir", "sweep_splits", "read_best"]
