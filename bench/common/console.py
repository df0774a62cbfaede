"""Console output: one-line messages and progress bars.

Progress bars go to stderr through tqdm; they are hidden when stderr is not a
terminal unless BENCH_PROGRESS=1 (so logs and tests stay clean), and always
hidden with BENCH_PROGRESS=0.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def _progress_disabled() -> bool:
    flag = os.environ.get("BENCH_PROGRESS")
    if flag is not None:
        return flag.strip() in ("0", "false", "no", "")
    return not sys.stderr.isatty()


def progress(iterable: Iterable[T] | None = None, **kwargs: Any) -> Iterator[T]:
    """`tqdm(iterable, **kwargs)` with the project's defaults (stderr, auto-hide)."""
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", _progress_disabled())
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)


def info(message: str) -> None:
    """A line for the user on stderr (stdout is kept for tables and results)."""
    print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)
