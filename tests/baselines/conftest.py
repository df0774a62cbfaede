"""Fixtures shared by the baselines tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def registry_guard():
    """Remove encoders a test registers, so tests stay independent."""
    from baselines.encoders import ENCODERS

    before = set(ENCODERS.names())
    yield
    for name in set(ENCODERS.names()) - before:
        del ENCODERS._items[name]
