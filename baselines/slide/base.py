"""The interface every slide-encoder architecture implements, and its registry.

A slide encoder maps one bag of patch features (and where the patches lie) to one slide embedding::

    enc = build_slide_arch("titan", config="tiny", in_dim=16)   # random init, small sizes, for tests
    z = enc(x, coords=grid, mask=None)   # x: (B, N, D) float; grid: (B, N, 2) float; z: (B, E)

`coords` are patch-grid positions (column, row) in units of one patch at the patch encoder's
magnification, i.e. level-0 pixel coordinates divided by the patch's level-0 side; encoders that
need pixel units (GigaPath's sin-cos grid, TITAN's ALiBi distances) derive them from the grid.
Encoders whose `uses_coords` is False ignore them (None is accepted).

Each architecture module registers a builder under the slide encoder's registry name (the
`[slide_encoders.<name>]` table of baselines/encoders.toml)::

    @SLIDE_ARCHS.decorator("feather")
    def build(config: str = "published", **overrides) -> SlideEncoder: ...

`config="published"` gives the sizes of the released checkpoint; `config="tiny"` a few-thousand
parameter instance of the same architecture for tests (no test builds a published-size model
except on the meta device). `load_published(state_dict)` takes the authors' checkpoint keys
(mapping them to this module's names where they differ) and raises a ConfigError naming missing
or unexpected keys.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from bench.common.errors import ConfigError
from bench.common.registry import Registry


class SlideEncoder(nn.Module):
    """Base class of slide-encoder architectures.

    Attributes:
        in_dim: patch-feature size it takes (its patch encoder's embed_dim).
        embed_dim: size of the slide embedding it returns.
        uses_coords: whether `forward` needs the patch grid positions.
    """

    uses_coords: bool = False

    def __init__(self, in_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.in_dim = int(in_dim)
        self.embed_dim = int(embed_dim)

    def forward(self, x: torch.Tensor, coords: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, in_dim); coords: (B, N, 2) grid positions or None; mask: (B, N) bool (True = valid)
        or None; returns (B, embed_dim)."""
        if self.uses_coords and coords is None:
            raise ConfigError(f"{type(self).__name__} needs the patch coordinates (coords=None was given)")
        return self.encode(x, coords, mask)

    def encode(self, x: torch.Tensor, coords: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def set_checkpointing(self, enabled: bool = True) -> SlideEncoder:
        """Activation checkpointing of the repeated layers (those that hold a `checkpoint_layers` flag): their
        activations are recomputed in backward instead of kept, so fine-tuning memory grows with one layer's
        activations, not all of them (GigaPath's 11 LongNet layers, PRISM's 8 cross-attention layers, TITAN's
        blocks); the same numbers, ~1 extra forward of time. No effect without autograd (probe, eval)."""
        for module in self.modules():
            if hasattr(module, "checkpoint_layers"):
                module.checkpoint_layers = bool(enabled)
        return self

    def attention(self) -> torch.Tensor | None:
        """(B, N) per-patch scores of the last forward where the architecture has them (heatmaps), else None."""
        return None

    def key_map(self) -> Mapping[str, str]:
        """Authors' checkpoint key prefix -> this module's prefix, where they differ (default: none)."""
        return {}

    def load_published(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load the authors' checkpoint (after `key_map`); missing or unexpected keys are a ConfigError."""
        renamed = {}
        for key, value in state_dict.items():
            for old, new in self.key_map().items():
                if key.startswith(old):
                    key = new + key[len(old):]
                    break
            renamed[key] = value
        result = self.load_state_dict(renamed, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ConfigError(
                f"{type(self).__name__}: the checkpoint does not match the architecture: "
                f"missing {result.missing_keys[:5]}{' ...' if len(result.missing_keys) > 5 else ''}, "
                f"unexpected {result.unexpected_keys[:5]}{' ...' if len(result.unexpected_keys) > 5 else ''}"
            )


def run_layer(checkpointed: bool, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), under activation checkpointing where `checkpointed` and autograd is recording (the RNG state
    is replayed, so dropout masks are the same in the recomputation)."""
    if checkpointed and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


SLIDE_ARCHS: Registry[Callable[..., SlideEncoder]] = Registry("slide-encoder architecture")


def config_kwargs(name: str, configs: Mapping[str, Mapping[str, Any]], config: str,
                  overrides: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The constructor kwargs of slide encoder `name` at `config` (`base` first, then `configs[config]`,
    then `overrides`); an unknown config or override is a ConfigError naming it and the known ones."""
    if config not in configs:
        raise ConfigError(f"slide encoder {name!r}: config must be 'published' or 'tiny', got {config!r}")
    kwargs = {**(base or {}), **configs[config]}
    unknown = sorted(set(overrides) - set(kwargs))
    if unknown:
        raise ConfigError(f"slide encoder {name!r}: unknown override(s) {unknown}; known: {sorted(kwargs)}")
    return {**kwargs, **overrides}


def build_slide_arch(name: str, config: str = "published", **overrides: Any) -> SlideEncoder:
    """Build the registered architecture `name` at `config` ("published" or "tiny")."""
    if config not in ("published", "tiny"):
        raise ConfigError(f"slide encoder {name!r}: config must be 'published' or 'tiny', got {config!r}")
    return SLIDE_ARCHS.get(name)(config=config, **overrides)


__all__ = ["SlideEncoder", "SLIDE_ARCHS", "build_slide_arch", "config_kwargs", "run_layer"]
