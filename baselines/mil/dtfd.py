"""DTFD-MIL: double-tier feature distillation (Zhang et al., CVPR 2022).

Defaults from the authors' Main_DTFD_MIL.py (hrzhang1123/DTFD-MIL): 512-d reduction
(Linear without bias + ReLU, no residual blocks), 4 pseudo-bags, AFS distillation,
dropout 0 in both classifiers.

Tier 1: the bag's instances are shuffled into `n_groups` pseudo-bags (numpy's
array_split sizes); in each, gated attention (128 hidden, softmax over the pseudo-bag)
pools the reduced features and a linear classifier predicts the bag label from it.
Distillation turns each pseudo-bag into tier-2 instances: "AFS" its attention-pooled
feature; "MaxMinS"/"MaxS" the instances with the highest (and lowest) probability of the
last class under the tier-1 classifier's per-instance CAM (W a_i h_i, no bias).
Tier 2: gated attention over the distilled features + a linear classifier: `logits`.

Training, as the authors': tier 1 learns from the pseudo-bag loss only (mean
cross-entropy over the pseudo-bags, `aux_loss`) and tier 2 from the bag loss only (the
distilled features are detached). The authors step two Adam optimisers on the two
losses; with disjoint parameters and the trainer's (1 - w) * task + w * aux at w = 0.5,
one AdamW step on both is the same update up to Adam's epsilon (AdamW is invariant to
the common factor 0.5), and gradient clipping is the trainer's, not per tier.

Pseudo-bags in eval mode come from a fixed-seed permutation (the authors shuffle at
test time too, with one draw), so a prediction is deterministic; it depends on the
instance order, so DTFD is not marked permutation invariant. A bag with fewer instances
than pseudo-bags uses one pseudo-bag per instance. `attention` is each instance's tier-1
attention divided by the number of pseudo-bags (a distribution over the bag).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from baselines.mil.abmil import AttentionScorer
from baselines.mil.base import MILAggregator, MILOutput, check_choice, check_int, check_prob

DISTILL = ("AFS", "MaxMinS", "MaxS")
EVAL_SEED = 32  # the authors' random seed


def pseudo_bag_indices(n: int, n_groups: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """A random split of range(n) into min(n_groups, n) parts of np.array_split sizes."""
    order = torch.randperm(n, generator=generator)
    sizes = [len(part) for part in np.array_split(np.arange(n), min(n_groups, n))]
    return list(torch.split(order, sizes))


class DTFDMIL(MILAggregator):
    """Two tiers of gated attention: pseudo-bags, then the bag of distilled pseudo-bag features."""

    aux_weight = 0.5
    permutation_invariant = False

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        hidden_dim: int = 512,
        attn_dim: int = 128,
        n_groups: int = 4,
        distill: str = "AFS",
        instances_per_group: int = 1,
        dropout: float = 0.0,
        dropout_tier2: float = 0.0,
    ) -> None:
        super().__init__(in_dim, n_outputs, hidden_dim)
        self.n_groups = check_int("n_groups", n_groups)
        self.distill = check_choice("distill", distill, DISTILL)
        self.instances_per_group = check_int("instances_per_group", instances_per_group)
        attn_dim = check_int("attn_dim", attn_dim)
        self.reduce = nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=False), nn.ReLU())
        self.attention1 = AttentionScorer(hidden_dim, attn_dim, gated=True, dropout=0.0)
        self.drop1 = nn.Dropout(check_prob("dropout", dropout))
        self.classifier1 = nn.Linear(hidden_dim, n_outputs)
        self.attention2 = AttentionScorer(hidden_dim, attn_dim, gated=True, dropout=0.0)
        self.drop2 = nn.Dropout(check_prob("dropout_tier2", dropout_tier2))
        self.classifier2 = nn.Linear(hidden_dim, n_outputs)

    def one_bag(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (n, D) -> tier-2 logits (C,), pseudo-bag logits (G, C), attention (n,)."""
        generator = None if self.training else torch.Generator().manual_seed(EVAL_SEED)
        groups = pseudo_bag_indices(x.shape[0], self.n_groups, generator)
        h = self.reduce(x)  # (n, L)
        attention = h.new_zeros(x.shape[0])
        sub_logits, distilled = [], []
        for idx in groups:
            idx = idx.to(x.device)
            hg = h[idx]  # (m, L)
            a = torch.softmax(self.attention1(hg).squeeze(-1), dim=0)  # (m,)
            attention[idx] = a / len(groups)
            weighted = a[:, None] * hg  # (m, L)
            pooled = weighted.sum(dim=0)  # (L,)
            sub_logits.append(self.classifier1(self.drop1(pooled)))
            if self.distill == "AFS":
                distilled.append(pooled[None])
            else:
                cam = weighted @ self.classifier1.weight.T  # (m, C): per-instance logits without bias
                order = torch.sort(torch.softmax(cam, dim=1)[:, -1], descending=True).indices
                k = min(self.instances_per_group, hg.shape[0])
                pick = order[:k] if self.distill == "MaxS" else torch.cat([order[:k], order[-k:]])
                distilled.append(hg[pick])
        pseudo = torch.cat(distilled).detach()  # tier 2 does not train tier 1 (the authors' two optimisers)
        a2 = torch.softmax(self.attention2(pseudo).squeeze(-1), dim=0)  # (G',)
        logits = self.classifier2(self.drop2(a2 @ pseudo))  # (C,)
        return logits, torch.stack(sub_logits), attention

    def aggregate(self, x: torch.Tensor, mask: torch.Tensor | None, label: torch.Tensor | None) -> MILOutput:
        b, n, _ = x.shape
        logits, attention, aux_terms = [], x.new_zeros(b, n), []
        for i in range(b):
            valid = slice(None) if mask is None else mask[i]
            bag_logits, sub_logits, a = self.one_bag(x[i][valid])
            logits.append(bag_logits)
            if mask is None:
                attention[i] = a
            else:
                attention[i, mask[i]] = a
            if self.training and label is not None:
                target = label[i].expand(sub_logits.shape[0])
                aux_terms.append(F.cross_entropy(sub_logits, target))
        aux = torch.stack(aux_terms).mean() if aux_terms else None
        return MILOutput(logits=torch.stack(logits), attention=attention, aux_loss=aux)


__all__ = ["DTFDMIL", "DISTILL", "pseudo_bag_indices"]
