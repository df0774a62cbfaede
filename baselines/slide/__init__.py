"""Slide-encoder architectures (plain torch) behind one interface; see `baselines.slide.base`.

Importing this package registers every architecture module below in `SLIDE_ARCHS`.
"""

from __future__ import annotations

import importlib

from baselines.slide.base import SLIDE_ARCHS, SlideEncoder, build_slide_arch

# one module per architecture; a module that is not written yet is skipped
for _module in ("feather", "chief", "titan", "prism", "gigapath"):
    try:
        importlib.import_module(f"baselines.slide.{_module}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"baselines.slide.{_module}":
            raise
del _module

__all__ = ["SLIDE_ARCHS", "SlideEncoder", "build_slide_arch"]
