"""CLAM-SB: single-branch CLAM (Lu et al., Nature Biomedical Engineering 2021).

The bag path is gated attention pooling (CLAM "small": 512 hidden, 256 attention,
dropout 0.25). Training adds the instance-level clustering loss: for the bag's
true class c, the k instances with the highest attention are pseudo-labelled
positive and the k lowest negative for the binary instance classifier of class
c; with `subtyping=True` (all classes are tumour subtypes) the top-k instances
are also labelled negative for every other class's classifier and the loss is
averaged over classes. The instance loss is cross-entropy (`inst_loss="ce"`) or
the smooth top-1 SVM of Berrada et al. (`inst_loss="svm"`, CLAM's `--inst_loss svm`).

CLAM trains with 0.7 * bag loss + 0.3 * instance loss: `aux_weight = 0.3`.

Departures from CLAM's code, all for bags CLAM never sees:
- k is capped at n // 2 for bags with fewer than 2 * k_sample instances (CLAM's
  topk fails there), so positives and negatives never overlap; a bag of one
  instance contributes no instance loss;
- padded positions are never selected; a batch of B bags averages their losses.
- The smooth SVM is the smooth formula everywhere; the `topk` package switches
  to the hard hinge when the top score is far ahead, where the two differ by at
  most tau * log(1 + (C - 1) * exp(alpha / tau) / 1000) (C classes; 2.7e-3 for
  the binary instance classifiers at alpha = tau = 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from baselines.mil.abmil import AttentionScorer
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


def smooth_top1_svm_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, tau: float = 1.0) -> torch.Tensor:
    """Smooth top-1 multiclass SVM (Berrada, Zisserman, Kumar, ICLR 2018), mean over rows.

    loss_i = tau * log sum_j exp((s_ij + alpha * [j != y_i] - s_iy_i) / tau)
    logits: (K, C); target: (K,) class indices.
    """
    margin = alpha * (1.0 - F.one_hot(target, logits.shape[-1]).to(logits.dtype))  # (K, C)
    true_score = logits.gather(1, target[:, None])  # (K, 1)
    return (tau * torch.logsumexp((logits + margin - true_score) / tau, dim=1)).mean()


class CLAMSB(MILAggregator):
    """Gated attention pooling + per-class binary instance classifiers (clustering loss)."""

    aux_weight = 0.3

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
        super().__init__(in_dim, n_outputs, hidden_dim)
        dropout = check_prob("dropout", dropout)
        self.k_sample = check_int("k_sample", k_sample)
        self.inst_loss = check_choice("inst_loss", inst_loss, ("ce", "svm"))
        self.subtyping = check_bool("subtyping", subtyping)
        self.proj = input_projection(in_dim, hidden_dim, dropout=dropout)
        self.scorer = AttentionScorer(hidden_dim, check_int("attn_dim", attn_dim), gated=True, dropout=dropout)
        self.classifier = nn.Linear(hidden_dim, n_outputs)
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden_dim, 2) for _ in range(n_outputs))
        xavier_init(self)

    def aggregate(self, x: torch.Tensor, mask: torch.Tensor | None, label: torch.Tensor | None) -> MILOutput:
        h = self.proj(x)  # (B, N, L)
        attention = masked_softmax(self.scorer(h).squeeze(-1), mask)  # (B, N)
        z = torch.einsum("bn,bnl->bl", attention, h)  # (B, L)
        aux = None
        if self.training and label is not None:
            aux = self.instance_loss(h, attention, mask, label)
        return MILOutput(logits=self.classifier(z), attention=attention, aux_loss=aux)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.inst_loss == "svm":
            return smooth_top1_svm_loss(logits, target)
        return F.cross_entropy(logits, target)

    def instance_loss(
        self, h: torch.Tensor, attention: torch.Tensor, mask: torch.Tensor | None, label: torch.Tensor
    ) -> torch.Tensor:
        """CLAM's clustering loss, averaged over the bags of the batch. h: (B, N, L); attention: (B, N), or
        (B, C, N) per class (CLAM-MB: class c samples its top/bottom k by its own branch's attention)."""
        losses = []
        for b in range(h.shape[0]):
            valid = slice(None) if mask is None else mask[b]
            hb = h[b][valid]  # (n, L)
            k = min(self.k_sample, hb.shape[0] // 2)
            if k == 0:
                continue
            true_class = int(label[b])
            bag_loss = h.new_zeros(())
            for c, inst_classifier in enumerate(self.instance_classifiers):
                ab = (attention[b] if attention.dim() == 2 else attention[b, c])[valid]  # (n,)
                top = torch.topk(ab, k).indices  # (k,)
                if c == true_class:
                    bottom = torch.topk(-ab, k).indices  # (k,)
                    inst = torch.cat([hb[top], hb[bottom]])  # (2k, L)
                    target = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(h.device)  # (2k,)
                elif self.subtyping:
                    inst = hb[top]  # (k, L)
                    target = torch.zeros(k, dtype=torch.long, device=h.device)
                else:
                    continue
                bag_loss = bag_loss + self._loss(inst_classifier(inst), target)
            if self.subtyping:
                bag_loss = bag_loss / len(self.instance_classifiers)
            losses.append(bag_loss)
        if not losses:
            return h.new_zeros(())
        return torch.stack(losses).mean()
