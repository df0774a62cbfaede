"""Shared fixtures. Tests make their own tiny data; nothing is downloaded."""

from __future__ import annotations

import os

import pytest

# No test may reach a hub: the Hub loader is tested against local snapshots.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BENCH_PROGRESS", "0")


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Each test starts from the same torch seed and single-threaded-deterministic settings."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    torch.manual_seed(0)
    yield
