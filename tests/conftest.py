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


@pytest.fixture(scope="session")
def synthetic_cohort(tmp_path_factory):
    """Factory for small synthetic cohorts shared by the whole session (made once per setting).

    Usage: `root = synthetic_cohort("subtyping", n_slides=6)` -> folder with labels.csv, slides/, masks/.
    Treat the folder as read-only; copy it to modify it.
    """
    from bench.data.synthetic import SyntheticSpec, make_cohort

    made: dict[tuple, object] = {}

    def make(kind: str = "subtyping", n_slides: int = 6, width: int = 1024, height: int = 768, seed: int = 0):
        key = (kind, n_slides, width, height, seed)
        if key not in made:
            out = tmp_path_factory.mktemp(f"cohort-{kind}-{n_slides}-{seed}") / f"synthetic-{kind}"
            made[key] = make_cohort(SyntheticSpec(kind=kind, n_slides=n_slides, width=width, height=height,
                                                  seed=seed), out)
        return made[key]

    return make


@pytest.fixture
def one_torch_thread():
    """Run a test with one torch thread (restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
