"""TransMIL (Shao et al., NeurIPS 2021): two Nystrom transformer layers with a
pyramid position encoding generator (PPEG) between them, classifying the class token.

Path of a bag of n instances: Linear(in_dim, 512) + ReLU -> pad the sequence to
the next square s^2 by repeating its first instances -> prepend a class token ->
TransLayer -> PPEG (depthwise 7x7, 5x5, 3x3 convolutions on the s x s grid, plus
identity) -> TransLayer -> LayerNorm -> class token -> Linear. A TransLayer is
x + NystromAttention(LayerNorm(x)) with 8 heads of 64, 256 landmarks, dropout 0.1.

TransMIL is not permutation invariant (PPEG and the residual convolution see
instance order). Because the square grid depends on the bag's own size, a
padded batch runs bag by bag on each bag's valid instances, which makes a padded
bag give exactly what it gives alone.

`attention` is the class token's approximate (Nystrom) attention row in the
last layer, averaged over heads, folded back onto the instances (the repeated
grid-filler copies add to their originals), negative values clipped (the
pseudo-inverse can give small negatives) and renormalised to sum to 1;
`head_attention` holds the per-head rows.

Departures from TransMIL's code: the Nystrom front padding is masked (the
reference lets the zero pad tokens act as keys), and see nystrom.py.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from baselines.mil.base import MILAggregator, MILOutput, check_int, check_prob, input_projection
from baselines.mil.nystrom import NystromAttention
from bench.common.errors import ConfigError


class TransLayer(nn.Module):
    def __init__(self, dim: int, heads: int, n_landmarks: int, pinv_iterations: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(
            dim,
            heads=heads,
            dim_head=dim // heads,
            n_landmarks=n_landmarks,
            pinv_iterations=pinv_iterations,
            dropout=dropout,
        )

    def forward(self, x: torch.Tensor, cls_row: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, row = self.attn(self.norm(x), cls_row=cls_row)
        return x + out, row


class PPEG(nn.Module):
    """Pyramid position encoding: depthwise convolutions over the s x s instance grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj7 = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)
        self.proj5 = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.proj3 = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        b, _, dim = x.shape
        cls_token, feat = x[:, :1], x[:, 1:]  # (B, 1, L), (B, s*s, L)
        grid = feat.transpose(1, 2).reshape(b, dim, side, side)  # (B, L, s, s)
        grid = grid + self.proj7(grid) + self.proj5(grid) + self.proj3(grid)
        return torch.cat([cls_token, grid.flatten(2).transpose(1, 2)], dim=1)  # (B, 1+s*s, L)


class TransMIL(MILAggregator):
    """Transformer MIL with Nystrom attention and PPEG."""

    permutation_invariant = False

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        hidden_dim: int = 512,
        n_heads: int = 8,
        n_landmarks: int = 256,
        pinv_iterations: int = 6,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(in_dim, n_outputs, hidden_dim)
        n_heads = check_int("n_heads", n_heads)
        if hidden_dim % n_heads:
            raise ConfigError(f"hidden_dim={hidden_dim} must be divisible by n_heads={n_heads}")
        args = (hidden_dim, n_heads, check_int("n_landmarks", n_landmarks), check_int("pinv_iterations", pinv_iterations))
        dropout = check_prob("dropout", dropout)
        self.proj = input_projection(in_dim, hidden_dim, dropout=0.0)
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden_dim))
        self.layer1 = TransLayer(*args, dropout=dropout)
        self.ppeg = PPEG(hidden_dim)
        self.layer2 = TransLayer(*args, dropout=dropout)
        self.norm = nn.LayerNorm(hidden_dim)
        self.classifier = nn.Linear(hidden_dim, n_outputs)

    def aggregate(self, x: torch.Tensor, mask: torch.Tensor | None, label: torch.Tensor | None) -> MILOutput:
        if mask is None:
            logits, head_attention = self._forward_bags(x)
        else:
            results = [self._forward_bags(x[b : b + 1, mask[b]]) for b in range(x.shape[0])]
            logits = torch.cat([r[0] for r in results])  # (B, C)
            head_attention = x.new_zeros(x.shape[0], results[0][1].shape[1], x.shape[1])  # (B, H, N)
            for b, (_, att) in enumerate(results):
                head_attention[b][:, mask[b]] = att[0]
        return MILOutput(logits=logits, attention=head_attention.mean(dim=1), head_attention=head_attention)

    def _forward_bags(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bags of equal size without padding: logits (B, C), class-token attention (B, H, n)."""
        h = self.proj(x)  # (B, n, L)
        b, n, _ = h.shape
        side = math.ceil(math.sqrt(n))
        filler = torch.arange(side * side - n, device=h.device) % n  # repeats the first instances
        h = torch.cat([self.cls_token.expand(b, -1, -1), h, h[:, filler]], dim=1)  # (B, 1+s*s, L)
        h, _ = self.layer1(h)
        h = self.ppeg(h, side)
        h, row = self.layer2(h, cls_row=0)  # row: (B, H, 1+s*s)
        logits = self.classifier(self.norm(h)[:, 0])  # (B, C)

        with torch.no_grad():
            grid = row[..., 1:].clamp_min(0)  # (B, H, s*s) class token's own weight dropped
            att = grid[..., :n].index_add(-1, filler, grid[..., n:])  # (B, H, n)
            total = att.sum(dim=-1, keepdim=True)
            att = torch.where(total > 0, att / total.clamp_min(torch.finfo(att.dtype).tiny), 1.0 / n)
        return logits, att
