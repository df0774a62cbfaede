"""Mean and max pooling: the non-parametric MIL baselines.

Both project instances to `hidden_dim` (Linear + ReLU + dropout, as the other
aggregators do), pool over the valid instances and classify the pooled vector.

Their `attention` is defined so heatmaps and attention statistics work for them:
- mean: 1/n for every valid instance (what the pooling actually weighs);
- max: the share of hidden dimensions whose maximum the instance supplies, ties
  split evenly (so it sums to 1 and does not depend on instance order);
- maxmil (max over per-instance logits): the share of classes whose maximum it supplies.
"""

from __future__ import annotations

import torch
from torch import nn

from baselines.mil.base import MILAggregator, MILOutput, check_choice, check_prob, input_projection, xavier_init


class MeanPoolMIL(MILAggregator):
    """Mean of the projected instance features, then a linear classifier."""

    def __init__(self, in_dim: int, n_outputs: int, hidden_dim: int = 512, dropout: float = 0.25) -> None:
        super().__init__(in_dim, n_outputs, hidden_dim)
        self.proj = input_projection(in_dim, hidden_dim, dropout=check_prob("dropout", dropout))
        self.classifier = nn.Linear(hidden_dim, n_outputs)
        xavier_init(self)

    def aggregate(self, x: torch.Tensor, mask: torch.Tensor | None, label: torch.Tensor | None) -> MILOutput:
        h = self.proj(x)  # (B, N, L)
        b, n, _ = h.shape
        if mask is None:
            weights = h.new_full((b, n), 1.0 / n)  # (B, N)
        else:
            m = mask.to(h.dtype)
            weights = m / m.sum(dim=1, keepdim=True)  # (B, N)
        z = torch.einsum("bn,bnl->bl", weights, h)  # (B, L)
        return MILOutput(logits=self.classifier(z), attention=weights)


class MaxPoolMIL(MILAggregator):
    """Max pooling. `pool="features"` (`max`): element-wise max of the projected instance features,
    then a linear classifier. `pool="logits"` (`maxmil`, the ABMILX authors' MaxMIL): the classifier
    scores every instance and the bag logit of each class is the max over instances."""

    def __init__(self, in_dim: int, n_outputs: int, hidden_dim: int = 512, dropout: float = 0.25,
                 pool: str = "features") -> None:
        super().__init__(in_dim, n_outputs, hidden_dim)
        self.pool = check_choice("pool", pool, ("features", "logits"))
        self.proj = input_projection(in_dim, hidden_dim, dropout=check_prob("dropout", dropout))
        self.classifier = nn.Linear(hidden_dim, n_outputs)
        xavier_init(self)

    def aggregate(self, x: torch.Tensor, mask: torch.Tensor | None, label: torch.Tensor | None) -> MILOutput:
        h = self.proj(x)  # (B, N, L)
        if self.pool == "logits":
            h = self.classifier(h)  # (B, N, C) per-instance logits; the max below is then the bag logit
        if mask is not None:
            h = h.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        z = h.max(dim=1).values  # (B, L)
        with torch.no_grad():
            winners = h == z.unsqueeze(1)  # (B, N, L) ties all count
            share = winners.to(z.dtype) / winners.sum(dim=1, keepdim=True)  # (B, N, L)
            attention = share.mean(dim=-1)  # (B, N), sums to 1
        return MILOutput(logits=z if self.pool == "logits" else self.classifier(z), attention=attention)
