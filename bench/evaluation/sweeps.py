"""Where a sweep's results live and how they are read back (`bench sweep` writes them).

`sweeps/<suite>/<method>/<dataset>/best.json` holds the best parameters of one study;
the runner (`--params best`) and the leaderboard's sweep section read it here, so neither
needs the sweep machinery (`bench.orchestration.sweep`) that writes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.common.errors import DataError
from bench.data.layout import Layout


def sweep_dir(layout: Layout, suite: str, method: str, dataset: str) -> Path:
    """`sweeps/<suite>/<method>/<dataset>/`: one study per method and dataset."""
    return layout.sweep_dir(suite, f"{method}/{dataset}")


def read_best(layout: Layout, suite: str, method: str, dataset: str) -> dict[str, Any] | None:
    """The `best.json` of a finished sweep, or None when there is none."""
    path = sweep_dir(layout, suite, method, dataset) / "best.json"
    if not path.exists():
        return None
    try:
        best = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"sweep results {path} are damaged ({exc}); rerun `bench sweep` to rewrite them") from None
    if not isinstance(best.get("best_params"), dict):
        return None  # a sweep without a completed trial has no best parameters
    return best


__all__ = ["sweep_dir", "read_best"]
