"""Small tensor operations shared by the MIL aggregators (baselines/mil) and the slide encoders
(baselines/slide), in a module of their own so that the slide architectures never import the
aggregator package (whose registry wraps them)."""

from __future__ import annotations

import torch
from torch import nn


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None, dim: int = -1) -> torch.Tensor:
    """Softmax over `dim` that gives padded positions exactly zero weight.

    `mask` broadcasts against `scores` (True = valid). Every bag has at least one
    valid instance (check_bag), so no row is all -inf.
    """
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=dim)


def xavier_init(module: nn.Module) -> None:
    """CLAM's initialisation (xavier-normal weights, zero biases) for every Linear."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


__all__ = ["masked_softmax", "xavier_init"]
