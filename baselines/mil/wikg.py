"""WiKG: dynamic graph representation with knowledge-aware attention (Li et al., CVPR 2024).

Plain torch (no torch_geometric). Path of a bag (defaults from the authors' `WiKG`,
WonderLandxD/WiKG model.py: 512 hidden, top-k 6, bi-interaction, dropout 0.3, attention readout):

1. h = LeakyReLU(Linear(in_dim, 512)(x)); h = (h + mean(h)) / 2.
2. head and tail embeddings e_h = W_h h, e_t = W_t h; each instance's k neighbours are the
   top-k of (e_h / sqrt(512)) e_t^T over the bag (itself included, as in the authors' code);
   with p = softmax of those k logits, the neighbour-aware head is
   r_ij = p_ij * e_t[j] + (1 - p_ij) * e_h[i].
3. knowledge-aware attention over the k neighbours: g_ij = tanh(e_h[i] + r_ij) and score
   s_ij = (sum_l e_t[j, l]) * (sum_m g_ij[m]) with `ka_score="code"` (the authors' einsum
   'ijkl,ijkm->ijk', which sums each vector before multiplying), or the dot product
   s_ij = e_t[j] . g_ij with `ka_score="dot"`; e_N[i] = sum_j softmax_j(s_ij) e_t[j].
4. bi-interaction: LeakyReLU(W1 (e_h + e_N)) + LeakyReLU(W2 (e_h * e_N)), dropout 0.3.
5. readout a = softmax(Linear(256, 1)(LeakyReLU(Linear(512, 256)))) over the instances
   (torch_geometric's GlobalAttention), z = sum a_i h_i, LayerNorm, Linear(512, C).

Sizes at scale: the N x N neighbour logits are computed in blocks of `block_rows` rows,
so memory grows with N * block_rows, not N^2; the top-k is exact.
Departure from the authors' code: their unused gate_U/gate_V/gate_W layers are not
created (they never enter the forward), so the parameter count is 0.33M lower.
Padding: neighbours are chosen among each bag's valid instances only (k = min(topk, n)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from baselines.mil.base import MILAggregator, MILOutput, check_choice, check_int, check_prob, masked_softmax

KA_SCORES = ("code", "dot")


class WiKG(MILAggregator):
    """Instances as graph nodes with learned top-k directed edges, knowledge-aware aggregation."""

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        hidden_dim: int = 512,
        topk: int = 6,
        dropout: float = 0.3,
        ka_score: str = "code",
        block_rows: int = 4096,
    ) -> None:
        super().__init__(in_dim, n_outputs, hidden_dim)
        self.topk = check_int("topk", topk)
        self.ka_score = check_choice("ka_score", ka_score, KA_SCORES)
        self.block_rows = check_int("block_rows", block_rows)
        self.fc1 = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.LeakyReLU())
        self.w_head = nn.Linear(hidden_dim, hidden_dim)
        self.w_tail = nn.Linear(hidden_dim, hidden_dim)
        self.scale = hidden_dim ** -0.5
        self.linear1 = nn.Linear(hidden_dim, hidden_dim)
        self.linear2 = nn.Linear(hidden_dim, hidden_dim)
        self.act = nn.LeakyReLU()
        self.message_dropout = nn.Dropout(check_prob("dropout", dropout))
        self.readout = nn.Sequential(nn.Linear(hidden_dim, hidden_dim // 2), nn.LeakyReLU(),
                                     nn.Linear(hidden_dim // 2, 1))
        self.norm = nn.LayerNorm(hidden_dim)
        self.classifier = nn.Linear(hidden_dim, n_outputs)

    def neighbours(self, e_h: torch.Tensor, e_t: torch.Tensor, mask: torch.Tensor | None, k: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k logits and indices of (e_h * scale) @ e_t^T per row, in row blocks. (B, N, k) each."""
        weights, index = [], []
        keys = None if mask is None else ~mask[:, None, :]  # (B, 1, N) True = padding
        for start in range(0, e_h.shape[1], self.block_rows):
            logits = (e_h[:, start:start + self.block_rows] * self.scale) @ e_t.transpose(1, 2)  # (B, rows, N)
            if keys is not None:
                logits = logits.masked_fill(keys, float("-inf"))
            w, i = torch.topk(logits, k, dim=-1)
            weights.append(w)
            index.append(i)
        return torch.cat(weights, dim=1), torch.cat(index, dim=1)

    def aggregate(self, x: torch.Tensor, mask: torch.Tensor | None, label: torch.Tensor | None) -> MILOutput:
        b, n, _ = x.shape
        h = self.fc1(x)  # (B, N, L)
        if mask is None:
            mean = h.mean(dim=1, keepdim=True)
        else:
            m = mask.unsqueeze(-1).to(h.dtype)
            mean = (h * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True)
        h = (h + mean) * 0.5
        e_h, e_t = self.w_head(h), self.w_tail(h)  # (B, N, L)
        k = min(self.topk, n)
        topk_w, topk_i = self.neighbours(e_h, e_t, mask, k)  # (B, N, k)
        missing = torch.isneginf(topk_w)  # bags with fewer than k valid instances: padding picked
        nb = torch.gather(e_t, 1, topk_i.reshape(b, n * k, 1).expand(-1, -1, e_t.shape[-1])).view(b, n, k, -1)
        p = torch.softmax(topk_w, dim=-1).unsqueeze(-1)  # (B, N, k, 1)
        r = p * nb + (1 - p) * e_h.unsqueeze(2)  # (B, N, k, L)
        gate = torch.tanh(e_h.unsqueeze(2) + r)  # (B, N, k, L)
        if self.ka_score == "code":
            score = nb.sum(-1) * gate.sum(-1)  # the authors' einsum 'ijkl,ijkm->ijk'
        else:
            score = (nb * gate).sum(-1)
        if bool(missing.any()):
            score = score.masked_fill(missing, float("-inf"))
        e_n = torch.einsum("bnk,bnkl->bnl", torch.softmax(score, dim=-1), nb)  # (B, N, L)
        emb = self.act(self.linear1(e_h + e_n)) + self.act(self.linear2(e_h * e_n))
        emb = self.message_dropout(emb)
        attention = masked_softmax(self.readout(emb).squeeze(-1), mask)  # (B, N)
        z = self.norm(torch.einsum("bn,bnl->bl", attention, emb))
        return MILOutput(logits=self.classifier(z), attention=attention)


__all__ = ["WiKG", "KA_SCORES"]
