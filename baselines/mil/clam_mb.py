"""CLAM-MB: multi-branch CLAM (Lu et al., Nature Biomedical Engineering 2021).

As CLAM-SB (baselines/mil/clam.py: 512 hidden, gated attention with 256 hidden, dropout
0.25, k_sample 8, 0.7 bag + 0.3 instance loss), but the attention network has one output
per class: class c pools its own bag embedding z_c = sum_i softmax(a_c)_i h_i and its own
linear classifier gives logit c (CLAM's `CLAM_MB`: `classifiers[c](M[c])`). The instance
clustering loss of class c samples the top/bottom k instances of branch c's attention.

`head_attention` is the per-class attention (B, C, N); `attention` their mean.
"""

from __future__ import annotations

import torch
from torch import nn

from baselines.mil.abmil import AttentionScorer
from baselines.mil.base import MILOutput, masked_softmax, xavier_init
from baselines.mil.clam import CLAMSB


class CLAMMB(CLAMSB):
    """Gated attention with one branch and one bag classifier per class."""

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        hidden_dim: int = 512,
        attn_dim: int = 256,
        dropout: float = 0.25,
        k_sample: int = 8,
        inst_loss: str = "ce",
        subtyping: bool = False,
    ) -> None:
        super().__init__(in_dim, n_outputs, hidden_dim, attn_dim, dropout, k_sample, inst_loss, subtyping)
        self.scorer = AttentionScorer(hidden_dim, attn_dim, gated=True, dropout=dropout, n_scores=n_outputs)
        del self.classifier
        self.bag_classifiers = nn.ModuleList(nn.Linear(hidden_dim, 1) for _ in range(n_outputs))
        xavier_init(self)

    def aggregate(self, x: torch.Tensor, mask: torch.Tensor | None, label: torch.Tensor | None) -> MILOutput:
        h = self.proj(x)  # (B, N, L)
        scores = self.scorer(h).transpose(1, 2)  # (B, C, N)
        attention = masked_softmax(scores, None if mask is None else mask[:, None, :])  # (B, C, N)
        z = torch.einsum("bcn,bnl->bcl", attention, h)  # (B, C, L)
        logits = torch.cat([clf(z[:, c]) for c, clf in enumerate(self.bag_classifiers)], dim=1)  # (B, C)
        aux = None
        if self.training and label is not None:
            aux = self.instance_loss(h, attention, mask, label)  # per-branch sampling
        return MILOutput(logits=logits, attention=attention.mean(dim=1), head_attention=attention, aux_loss=aux)


__all__ = ["CLAMMB"]
