"""What every MIL aggregator shares: the output type, the input checks, the base class.

One interface for all aggregators (two-stage and end-to-end alike)::

    out = model(x, mask=None, label=None)   # x: (B, N, D) float, mask: (B, N) bool
    out = model(x, coords=grid)             # aggregators with `uses_coords` (TITAN, GigaPath's slide
                                            # encoder): grid (B, N, 2) = (column, row) in patch units
    out.logits          # (B, C)
    out.attention       # (B, N) per-instance scores, 0 at padding
    out.head_attention  # (B, H, N) for multi-head models, else None
    out.aux_loss        # scalar tensor or None

`MILAggregator.forward` runs `check_bag` (and `check_label`) before the model's
own `aggregate`, so every aggregator refuses bad input the same way and no model
copies the checks.

How a trainer combines the losses: ``loss = (1 - w) * task_loss + w * aux_loss``
with ``w = model.aux_weight`` whenever ``out.aux_loss`` is not None (CLAM-SB:
w = 0.3, i.e. CLAM's 0.7 bag + 0.3 instance; DSMIL: w = 0.5). `aux_loss` is only
produced in training mode and only when `label` (class indices, (B,)) is given;
pass ``label=None`` for survival tasks, whose targets are not classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from baselines.layers import masked_softmax, xavier_init  # noqa: F401 (re-exported for the aggregators)
from bench.common.checks import check_bool, check_choice, check_int, check_prob  # noqa: F401 (re-exported)
from bench.common.errors import DataError


@dataclass
class MILOutput:
    """What every aggregator returns.

    Attributes:
        logits: (B, C) raw outputs for the task head's loss.
        attention: (B, N) per-instance scores for heatmaps and attention statistics;
            exactly 0 at padded positions. Where the model has a softmax over
            instances it is a distribution over the valid instances (sums to 1);
            for multi-head models it is the mean over heads.
        head_attention: (B, H, N) per-head (or per-class) scores, or None.
        aux_loss: scalar auxiliary loss (CLAM-SB instance clustering, DSMIL
            max-instance loss), or None; see the module docstring for the weight.
    """

    logits: torch.Tensor
    attention: torch.Tensor
    head_attention: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


# ---------------------------------------------------------------------------
# Input checks: one place, used by every aggregator through MILAggregator.forward
# ---------------------------------------------------------------------------


def square_grid(n: int, device: Any = None) -> torch.Tensor:
    """(1, n, 2) float32 grid positions (column, row) of n patches laid row-major on a ceil(sqrt(n))-wide
    square: the stand-in bag layout of FLOP counts and benchmarks for aggregators with `uses_coords`."""
    side = max(1, math.ceil(math.sqrt(n)))
    i = torch.arange(n, device=device, dtype=torch.float32)
    return torch.stack([i % side, torch.div(i, side, rounding_mode="floor")], dim=1)[None]


def check_coords(coords: Any, x: torch.Tensor) -> torch.Tensor:
    """Validate patch-grid positions for the bag batch `x` (B, N, D); returns them in x's dtype.

    Raises:
        DataError: not a tensor of shape (B, N, 2), or NaN/inf in it.
    """
    b, n = x.shape[:2]
    if not isinstance(coords, torch.Tensor):
        raise DataError(f"coords must be a torch.Tensor of shape (B, N, 2) = ({b}, {n}, 2), got {type(coords).__name__}")
    if tuple(coords.shape) != (b, n, 2):
        raise DataError(f"coords shape {tuple(coords.shape)} does not match the bag batch: expected (B, N, 2) = ({b}, {n}, 2)")
    coords = coords.to(x.dtype)
    if not bool(torch.isfinite(coords).all()):
        bad = torch.nonzero(~torch.isfinite(coords).all(dim=2))[0].tolist()
        raise DataError(f"coords hold NaN or inf at bag {bad[0]}, instance {bad[1]}")
    return coords


def check_bag(x: Any, mask: Any, in_dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate a bag batch; return `(x, mask)` ready for an aggregator.

    The returned mask is None when every instance is valid (the fast path);
    otherwise padded positions of `x` are zeroed, so whatever the collate wrote
    there (zeros, garbage, NaN) cannot reach the outputs.

    Raises:
        DataError: not a 3-D float tensor, feature dimension != `in_dim`, an empty
            bag, a malformed mask, or NaN/inf in a valid instance.
    """
    if not isinstance(x, torch.Tensor):
        raise DataError(f"bag features must be a torch.Tensor of shape (B, N, D), got {type(x).__name__}")
    if x.ndim != 3:
        hint = " (a single bag (N, D) needs a batch dimension: x.unsqueeze(0))" if x.ndim == 2 else ""
        raise DataError(f"bag features must have shape (B, N, D), got shape {tuple(x.shape)}{hint}")
    if not x.is_floating_point():
        raise DataError(f"bag features must be a float tensor, got dtype {x.dtype}")
    b, n, d = x.shape
    if d != in_dim:
        raise DataError(
            f"feature dimension {d} does not match the aggregator's in_dim={in_dim}; "
            f"build the aggregator with in_dim={d} or use features from the encoder it was built for"
        )
    if b == 0 or n == 0:
        raise DataError(f"empty bag: features have shape {tuple(x.shape)}; a bag needs at least one instance")

    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise DataError(f"mask must be a bool tensor of shape (B, N) = ({b}, {n}), got {getattr(mask, 'dtype', type(mask).__name__)}")
        if tuple(mask.shape) != (b, n):
            raise DataError(f"mask shape {tuple(mask.shape)} does not match the bag batch (B, N) = ({b}, {n})")
        counts = mask.sum(dim=1)  # (B,)
        if bool((counts == 0).any()):
            empty = int(torch.nonzero(counts == 0)[0, 0])
            raise DataError(f"empty bag: bag {empty} of the batch has no valid instance in its mask")
        if bool(mask.all()):
            mask = None

    # An instance's feature sum is finite iff its features are (barring overflow of
    # huge values, which the exact check below then clears); the sum is ~30x faster
    # than torch.isfinite on a 10,000 x 1024 bag, which matters once per step.
    with torch.no_grad():
        suspect = ~torch.isfinite(x.sum(dim=-1))  # (B, N)
        if mask is not None:
            suspect &= mask
        bad = (suspect & ~torch.isfinite(x).all(dim=-1)) if bool(suspect.any()) else suspect  # (B, N)
    if bool(bad.any()):
        bag, inst = (int(v) for v in torch.nonzero(bad)[0])
        raise DataError(
            f"NaN or inf in the features of bag {bag}, instance {inst} "
            f"({int(bad.sum())} bad instance(s) in the batch); re-extract the features of that slide"
        )
    if mask is not None:
        x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
    return x, mask


def check_label(label: Any, batch_size: int, n_classes: int) -> torch.Tensor:
    """Validate class-index labels (B,) in [0, n_classes); used for auxiliary losses."""
    if not isinstance(label, torch.Tensor) or label.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise DataError(f"label must be an integer tensor of class indices, shape ({batch_size},), got {label!r}")
    label = label.reshape(-1).long()
    if label.numel() != batch_size:
        raise DataError(f"label has {label.numel()} entries for a batch of {batch_size} bags")
    if bool(((label < 0) | (label >= n_classes)).any()):
        raise DataError(f"label values {label.tolist()} outside the classes 0..{n_classes - 1} of this aggregator")
    return label


# ---------------------------------------------------------------------------
# Parameter checks (ConfigError names the parameter and the bad value)
# ---------------------------------------------------------------------------


# The checks live in bench.common.checks (one set for every config) and are re-exported here for the aggregators.


# ---------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


def activation(name: str) -> nn.Module:
    check_choice("act", name, tuple(_ACTIVATIONS))
    return _ACTIVATIONS[name]()


def input_projection(
    in_dim: int,
    hidden_dim: int,
    *,
    dropout: float,
    act: str = "relu",
    bias: bool = True,
    input_norm: bool = False,
) -> nn.Sequential:
    """Instance features `in_dim` -> `hidden_dim` (512 in the paper's two-stage setup).

    `input_norm` adds a LayerNorm on the raw features first (ABMILX, appendix B.3);
    with `bias=False` the LayerNorm and the linear layer carry no bias.
    """
    layers: list[nn.Module] = []
    if input_norm:
        layers.append(nn.LayerNorm(in_dim, bias=bias))
    layers += [nn.Linear(in_dim, hidden_dim, bias=bias), activation(act)]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class MILAggregator(nn.Module):
    """Base class: validates input once, then calls the model's `aggregate`.

    Subclasses set `permutation_invariant` (whether the bag prediction ignores
    instance order) and `aux_weight` (share of `aux_loss` in the training loss).
    """

    permutation_invariant: bool = True
    aux_weight: float = 0.0
    uses_coords: bool = False  # True: `aggregate` takes the patch grid positions as a 4th argument

    def __init__(self, in_dim: int, n_outputs: int, hidden_dim: int) -> None:
        super().__init__()
        self.in_dim = check_int("in_dim", in_dim)
        self.n_outputs = check_int("n_outputs", n_outputs)
        self.hidden_dim = check_int("hidden_dim", hidden_dim)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, label: torch.Tensor | None = None,
        coords: torch.Tensor | None = None,
    ) -> MILOutput:
        """`coords`: (B, N, 2) patch grid positions (column, row), level-0 pixels / patch level-0 side.
        Needed by aggregators with `uses_coords`; the others ignore them."""
        x, mask = check_bag(x, mask, self.in_dim)
        if label is not None:
            label = check_label(label, x.shape[0], self.n_outputs)
        if not self.uses_coords:
            return self.aggregate(x, mask, label)
        if coords is None:
            raise DataError(f"{type(self).__name__} needs the patches' grid positions: call it with "
                            "coords=(B, N, 2) (column, row) in patch units")
        return self.aggregate(x, mask, label, check_coords(coords, x))

    def aggregate(self, x: torch.Tensor, mask: torch.Tensor | None, label: torch.Tensor | None) -> MILOutput:
        """x: (B, N, D) checked; mask: (B, N) bool or None when all valid."""
        raise NotImplementedError

