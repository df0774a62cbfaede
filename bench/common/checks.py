"""Parameter checks shared by every config (aggregators, E2E, GMA): a ConfigError names the parameter and the bad value.

    >>> check_int("E2E samples", 512)
    512
    >>> check_choice("GMA mode", "chunked", ("distributed", "chunked"))
    'chunked'
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from bench.common.errors import ConfigError


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """An integer >= `minimum` (numpy integers accepted, booleans refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_positive(name: str, value: Any) -> float:
    """A finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def check_prob(name: str, value: Any) -> float:
    """A number in [0, 1) (dropout rates)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) < 1.0:
        raise ConfigError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """One of `choices`."""
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """True or False (not 0/1)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


__all__ = ["check_int", "check_positive", "check_prob", "check_choice", "check_bool"]
