"""ABMIL: attention-based deep MIL (Ilse, Tomczak and Welling, ICML 2018).

Registered twice:
- `abmil`: the gated attention (eq. 9 of Ilse et al.), as CLAM and the ABMILX
  paper's tables use it;
- `abmil-plain`: the same model with `gated=False` (eq. 8, tanh attention only).

Sizes follow the ABMILX paper's two-stage setup: features projected to 512 by
a linear layer (+ ReLU, dropout 0.25 as in CLAM), attention hidden size 128 as in
Ilse et al.; at in_dim=1024 that is the paper's 0.66M parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from baselines.mil.base import (
    MILAggregator,
    MILOutput,
    check_bool,
    check_int,
    check_prob,
    input_projection,
    masked_softmax,
    xavier_init,
)


class AttentionScorer(nn.Module):
    """a_i = w^T (tanh(V h_i) [* sigmoid(U h_i)]): one raw score per instance and output.

    Dropout sits after each branch, as in CLAM's `Attn_Net_Gated`.
    """

    def __init__(self, dim: int, attn_dim: int, *, gated: bool, dropout: float, n_scores: int = 1) -> None:
        super().__init__()
        self.gated = gated
        self.v = nn.Linear(dim, attn_dim)
        self.u = nn.Linear(dim, attn_dim) if gated else None
        self.w = nn.Linear(attn_dim, n_scores)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.drop(torch.tanh(self.v(h)))  # (B, N, A)
        if self.u is not None:
            a = a * self.drop(torch.sigmoid(self.u(h)))  # (B, N, A)
        return self.w(a)  # (B, N, K)


class ABMIL(MILAggregator):
    """Attention pooling: z = sum_i softmax(a)_i h_i, logits = W z."""

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        hidden_dim: int = 512,
        attn_dim: int = 128,
        dropout: float = 0.25,
        gated: bool = True,
    ) -> None:
        super().__init__(in_dim, n_outputs, hidden_dim)
        dropout = check_prob("dropout", dropout)
        self.proj = input_projection(in_dim, hidden_dim, dropout=dropout)
        self.scorer = AttentionScorer(
            hidden_dim, check_int("attn_dim", attn_dim), gated=check_bool("gated", gated), dropout=dropout
        )
        self.classifier = nn.Linear(hidden_dim, n_outputs)
        xavier_init(self)

    def attend(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected instances (B, N, L) and their attention (B, N), summing to 1 per bag."""
        h = self.proj(x)  # (B, N, L)
        scores = self.scorer(h).squeeze(-1)  # (B, N)
        return h, masked_softmax(scores, mask)

    def aggregate(self, x: torch.Tensor, mask: torch.Tensor | None, label: torch.Tensor | None) -> MILOutput:
        h, attention = self.attend(x, mask)
        z = torch.einsum("bn,bnl->bl", attention, h)  # (B, L)
        return MILOutput(logits=self.classifier(z), attention=attention)
