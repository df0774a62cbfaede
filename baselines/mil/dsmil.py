"""DSMIL: dual-stream MIL (Li, Li and Eliceiri, CVPR 2021).

Stream 1 scores every instance with a linear instance classifier; its max over
the bag is the max-pooling prediction. Stream 2 takes, per class, the critical
instance (highest instance score), and weighs every instance by the softmax of
its query's similarity to the critical instance's query: A = softmax(Q q_m^T /
sqrt(d_q)) over instances; the bag embedding per class is A^T V and a 1-D
convolution over it (kernel = embedding size, equivalently a linear layer on the
flattened (C, L) matrix) gives the bag logits.

`logits` are the bag-stream logits; `aux_loss` is the loss of the max-instance
prediction (training mode, class labels given): cross-entropy by default
(`max_loss="ce"`, a departure), or dsmil-wsi's BCEWithLogits against the one-hot
label (`max_loss="bce"`). DSMIL trains with
0.5 * bag loss + 0.5 * max loss: `aux_weight = 0.5`. The instance classifier only
learns through that auxiliary loss (the critical-instance choice is an argmax).

Sizes: 512-d projection (two-stage setup), query size 128 with the non-linear
query MLP, `passing_v=True` (V = ReLU(Linear(h))), which is the configuration
whose size matches the ABMILX paper's 0.87M parameters at in_dim=1024.

Departure from DSMIL's code: DSMIL's test-time score averages the bag and max
predictions; here the bag logits are the prediction (as the MIL benchmarks the
ABMILX paper compares with do), and the max prediction only trains.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from baselines.mil.base import (
    MILAggregator,
    MILOutput,
    check_bool,
    check_choice,
    check_int,
    check_prob,
    input_projection,
    masked_softmax,
    xavier_init,
)


class DSMIL(MILAggregator):
    """Instance-classifier stream + critical-instance attention stream."""

    aux_weight = 0.5

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        hidden_dim: int = 512,
        q_dim: int = 128,
        dropout: float = 0.25,
        dropout_v: float = 0.0,
        nonlinear_q: bool = True,
        passing_v: bool = True,
        max_loss: str = "ce",
    ) -> None:
        super().__init__(in_dim, n_outputs, hidden_dim)
        self.max_loss = check_choice("max_loss", max_loss, ("ce", "bce"))
        self.proj = input_projection(in_dim, hidden_dim, dropout=check_prob("dropout", dropout))
        self.instance_classifier = nn.Linear(hidden_dim, n_outputs)
        q_dim = check_int("q_dim", q_dim)
        if check_bool("nonlinear_q", nonlinear_q):
            self.q = nn.Sequential(nn.Linear(hidden_dim, q_dim), nn.ReLU(), nn.Linear(q_dim, q_dim), nn.Tanh())
        else:
            self.q = nn.Linear(hidden_dim, q_dim)
        if check_bool("passing_v", passing_v):
            self.v = nn.Sequential(nn.Dropout(check_prob("dropout_v", dropout_v)), nn.Linear(hidden_dim, hidden_dim), nn.ReLU())
        else:
            self.v = nn.Identity()
        self.scale = 1.0 / math.sqrt(q_dim)
        self.bag_classifier = nn.Linear(n_outputs * hidden_dim, n_outputs)  # DSMIL's Conv1d(C, C, kernel=L)
        xavier_init(self)

    def aggregate(self, x: torch.Tensor, mask: torch.Tensor | None, label: torch.Tensor | None) -> MILOutput:
        h = self.proj(x)  # (B, N, L)
        b, _, dim = h.shape
        scores = self.instance_classifier(h)  # (B, N, C)
        if mask is not None:
            scores = scores.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        max_scores, critical = scores.max(dim=1)  # (B, C), (B, C)
        critical_h = torch.gather(h, 1, critical.unsqueeze(-1).expand(-1, -1, dim))  # (B, C, L)
        q = self.q(h)  # (B, N, Q)
        q_critical = self.q(critical_h)  # (B, C, Q)
        sim = torch.einsum("bnq,bcq->bcn", q, q_critical) * self.scale  # (B, C, N)
        class_attention = masked_softmax(sim, None if mask is None else mask.unsqueeze(1))  # (B, C, N)
        bag = torch.einsum("bcn,bnl->bcl", class_attention, self.v(h))  # (B, C, L)
        logits = self.bag_classifier(bag.reshape(b, -1))  # (B, C)
        aux = None
        if self.training and label is not None:
            if self.max_loss == "bce":  # dsmil-wsi: BCEWithLogits of the max scores against one-hot labels
                aux = F.binary_cross_entropy_with_logits(max_scores, F.one_hot(label, self.n_outputs).to(max_scores.dtype))
            else:
                aux = F.cross_entropy(max_scores, label)
        return MILOutput(
            logits=logits,
            attention=class_attention.mean(dim=1),  # (B, N)
            head_attention=class_attention,
            aux_loss=aux,
        )
