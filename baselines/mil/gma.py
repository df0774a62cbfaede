"""GMA: the gated MIL attention aggregator of the GMA paper (Campanella et al.,
"Beyond Multiple Instance Learning", section 2: "gated MIL attention Ilse et al.
[2018]").

It is gated ABMIL at the GMA sizes: instance features -> 512 (Linear + ReLU +
dropout 0.25), gated attention with 384 hidden units and dropout 0.25 on both
branches, a linear classifier on the attention-pooled 512-d vector. The paper's
gradient-equivalence check runs GMA "without dropout": pass `dropout=0`.
"""

from __future__ import annotations

from baselines.mil.abmil import ABMIL


class GMA(ABMIL):
    """Gated attention MIL with the GMA paper's sizes (512 hidden, 384 attention, dropout 0.25)."""

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        hidden_dim: int = 512,
        attn_dim: int = 384,
        dropout: float = 0.25,
    ) -> None:
        super().__init__(in_dim, n_outputs, hidden_dim=hidden_dim, attn_dim=attn_dim, dropout=dropout, gated=True)
