"""RRT-MIL: re-embedded regional transformer + attention pooling (Tang et al., CVPR 2024).

Path of a bag of n instances (defaults from the authors' `RRTMIL`, DearCaat/RRT-MIL modules/rrt.py):

1. Linear(in_dim, 512) + ReLU, dropout 0.25.
2. R-MSA layer: x + RegionMSA(LayerNorm(x)). The n instances are laid row-major on the
   smallest s x s grid with s a multiple of `region_num` (8), the tail filled with zero
   vectors as the authors do; the grid is cut into region_num^2 regions of (s/8)^2
   instances and multi-head self-attention (8 heads of 64, qkv bias) runs inside each
   region. EPEG: a depthwise (epeg_k x 1) = (15 x 1) convolution over each head's
   attention logits is added to them before the softmax.
3. CR-MSA layer: x + CrossRegionMSA(LayerNorm(x)). In each region, k = crmsa_k (3)
   representatives are softmax(phi^T x)-weighted sums of its instances (phi: 512 x k);
   the representatives of all regions attend to each other (8 heads, no EPEG); each
   instance gets back sum_j softmax_j(logits) * minmax_p(logits_j) * rep_j.
4. LayerNorm, then attention pooling: a = softmax(w2^T ReLU(W1 x)) (128 hidden, no
   bias, no dropout, not gated), z = sum a_i x_i, logits = Linear(512, C)(z).
   Dropout 0.1 on the attention outputs.

`attention` is the pooling attention (a distribution over the valid instances).
Not permutation invariant: regions follow the instance order. A padded batch runs bag
by bag on each bag's valid instances (the grid depends on the bag's own size).
Initialisation as the authors': xavier-normal Linear weights, zero biases.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from baselines.mil.base import MILAggregator, MILOutput, check_int, check_prob, input_projection, xavier_init


def grid_side(n: int, region_num: int) -> int:
    """Side of the square instance grid: ceil(sqrt(n)) rounded up to a multiple of region_num."""
    side = math.ceil(math.sqrt(n))
    return side + (-side % region_num)


def to_regions(x: torch.Tensor, region_num: int) -> tuple[torch.Tensor, int, int]:
    """(n, C) -> (region_num^2, r*r, C) zero-padded regions, plus the grid side and the region side r."""
    n, dim = x.shape
    side = grid_side(n, region_num)
    r = side // region_num
    grid = torch.cat([x, x.new_zeros(side * side - n, dim)]) if side * side > n else x
    grid = grid.view(region_num, r, region_num, r, dim).permute(0, 2, 1, 3, 4)  # (R, R, r, r, C)
    return grid.reshape(region_num * region_num, r * r, dim), side, r


def from_regions(regions: torch.Tensor, n: int, region_num: int, r: int) -> torch.Tensor:
    """Inverse of `to_regions`: (R^2, r*r, C) -> (n, C), padding dropped."""
    dim = regions.shape[-1]
    grid = regions.view(region_num, region_num, r, r, dim).permute(0, 2, 1, 3, 4)  # (R, r, R, r, C)
    return grid.reshape(-1, dim)[:n]


class RegionSelfAttention(nn.Module):
    """Multi-head self-attention over (G, T, C) groups, with RRT's EPEG on the attention logits."""

    def __init__(self, dim: int, n_heads: int, dropout: float, epeg_k: int | None) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        # depthwise conv over the query axis of each head's (T, T) logits
        self.pe = (nn.Conv2d(n_heads, n_heads, (epeg_k, 1), padding=(epeg_k // 2, 0), groups=n_heads)
                   if epeg_k else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, t, dim = x.shape
        q, k, v = self.qkv(x).view(g, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (G, H, T, d)
        logits = (q * self.head_dim ** -0.5) @ k.transpose(-1, -2)  # (G, H, T, T)
        if self.pe is not None:
            logits = logits + self.pe(logits)
        out = torch.softmax(logits, dim=-1) @ v  # (G, H, T, d)
        return self.drop(self.proj(out.transpose(1, 2).reshape(g, t, dim)))


class RegionMSA(nn.Module):
    """R-MSA: self-attention inside each region of the instance grid."""

    def __init__(self, dim: int, n_heads: int, region_num: int, dropout: float, epeg_k: int) -> None:
        super().__init__()
        self.region_num = region_num
        self.attn = RegionSelfAttention(dim, n_heads, dropout, epeg_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, C)
        regions, _, r = to_regions(x, self.region_num)
        return from_regions(self.attn(regions), x.shape[0], self.region_num, r)


class CrossRegionMSA(nn.Module):
    """CR-MSA: k representatives per region attend across regions, then are dispatched back."""

    def __init__(self, dim: int, n_heads: int, region_num: int, dropout: float, k: int) -> None:
        super().__init__()
        self.region_num = region_num
        self.attn = RegionSelfAttention(dim, n_heads, dropout, None)
        self.phi = nn.Parameter(torch.empty(dim, k))
        nn.init.kaiming_uniform_(self.phi, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, C)
        regions, _, r = to_regions(x, self.region_num)  # (W, P, C)
        logits = torch.einsum("wpc,ck->wkp", regions, self.phi)  # (W, k, P)
        combine = logits.softmax(dim=-1)  # over the region's instances
        dispatch = logits.softmax(dim=1)  # over the k representatives
        lo, hi = logits.min(dim=-1, keepdim=True).values, logits.max(dim=-1, keepdim=True).values
        scale = (logits - lo) / (hi - lo + 1e-8)  # (W, k, P) min-max over the instances
        reps = torch.einsum("wkp,wpc->kwc", combine, regions)  # (k, W, C): per representative, all regions
        reps = self.attn(reps).transpose(0, 1)  # (W, k, C)
        back = torch.einsum("wkc,wkp->wpc", reps, scale * dispatch)  # (W, P, C)
        return from_regions(back, x.shape[0], self.region_num, r)


class RRTMIL(MILAggregator):
    """R-MSA + CR-MSA re-embedding of the projected instances, then attention pooling."""

    permutation_invariant = False

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        hidden_dim: int = 512,
        dropout: float = 0.25,
        trans_dropout: float = 0.1,
        n_heads: int = 8,
        region_num: int = 8,
        epeg_k: int = 15,
        crmsa_k: int = 3,
        crmsa_heads: int = 8,
        attn_dim: int = 128,
    ) -> None:
        super().__init__(in_dim, n_outputs, hidden_dim)
        trans_dropout = check_prob("trans_dropout", trans_dropout)
        n_heads, crmsa_heads = check_int("n_heads", n_heads), check_int("crmsa_heads", crmsa_heads)
        for heads in (n_heads, crmsa_heads):
            if hidden_dim % heads:
                from bench.common.errors import ConfigError

                raise ConfigError(f"hidden_dim={hidden_dim} must be divisible by n_heads/crmsa_heads={heads}")
        self.proj = input_projection(in_dim, hidden_dim, dropout=check_prob("dropout", dropout))
        self.norm1, self.norm2, self.norm_out = (nn.LayerNorm(hidden_dim) for _ in range(3))
        self.rmsa = RegionMSA(hidden_dim, n_heads, check_int("region_num", region_num), trans_dropout,
                              check_int("epeg_k", epeg_k))
        self.crmsa = CrossRegionMSA(hidden_dim, crmsa_heads, region_num, trans_dropout, check_int("crmsa_k", crmsa_k))
        self.attention = nn.Sequential(nn.Linear(hidden_dim, check_int("attn_dim", attn_dim), bias=False), nn.ReLU(),
                                       nn.Linear(attn_dim, 1, bias=False))
        self.classifier = nn.Linear(hidden_dim, n_outputs)
        xavier_init(self)

    def reembed(self, h: torch.Tensor) -> torch.Tensor:
        """(n, L) projected instances of one bag -> (n, L) re-embedded."""
        h = h + self.rmsa(self.norm1(h))
        h = h + self.crmsa(self.norm2(h))
        return self.norm_out(h)

    def aggregate(self, x: torch.Tensor, mask: torch.Tensor | None, label: torch.Tensor | None) -> MILOutput:
        b, n, _ = x.shape
        logits, attention = [], x.new_zeros(b, n)
        for i in range(b):
            valid = slice(None) if mask is None else mask[i]
            h = self.reembed(self.proj(x[i][valid]))  # (n_i, L)
            a = torch.softmax(self.attention(h).squeeze(-1), dim=0)  # (n_i,)
            logits.append(self.classifier(a @ h))
            if mask is None:
                attention[i] = a
            else:
                attention[i, mask[i]] = a
        return MILOutput(logits=torch.stack(logits), attention=attention)


__all__ = ["RRTMIL", "grid_side"]
