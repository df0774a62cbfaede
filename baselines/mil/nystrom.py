"""Nystrom self-attention (Xiong et al., AAAI 2021), as TransMIL uses it.

softmax(Q K^T) is approximated by softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T),
where Q~, K~ are m landmarks: means of consecutive groups of l = ceil(n / m)
queries/keys. The sequence is zero-padded at the front to m * l tokens; the pad
tokens are masked out of every softmax and every landmark mean. The
Moore-Penrose pseudo-inverse uses 6 iterations of the cubic Newton-Schulz scheme
of the paper. A depthwise convolution over the sequence of values (kernel 33) is
added as a residual, as in the reference implementation TransMIL imports.

Departures from that reference (lucidrains/nystrom-attention):
- the pseudo-inverse's initial scale 1 / (max row sum * max column sum) is taken
  per bag and head, not over the whole batch, so bags in a batch stay independent;
- `cls_row` returns the approximate attention row of one query (TransMIL's
  class token) for heatmaps, computed in O(n m) without the n x n matrix;
- a sequence of at most m tokens (`exact_short`, on by default) gets exact
  softmax attention. There every token is its own landmark (the pad landmarks
  are masked), and with an exact pseudo-inverse the formula *is* softmax(Q K^T)
  (A A^+ A = A; `tests/baselines/test_mil_parts.py` checks the landmark path
  converges to it as the iterations grow). The reference pads such a sequence
  to m tokens and runs 6 Newton-Schulz iterations on m x m matrices, which made
  a TransMIL training step on a 64-instance bag cost ~1.7 s on one CPU core
  against ~0.13 s here; on real slides (n >> 256) nothing changes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def iterative_pinv(x: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Approximate Moore-Penrose inverse of a batch of square matrices (..., m, m).

    z <- 1/4 z (13 I - xz (15 I - xz (7 I - xz))), written with fused
    batched multiply-adds because separate elementwise passes over (B*H, m, m)
    tensors dominated its time on CPU.
    """
    shape, m = x.shape, x.shape[-1]
    x3 = x.reshape(-1, m, m)  # (B*H, m, m)
    abs_x = x3.abs()
    col = abs_x.sum(dim=-1).amax(dim=-1)  # (B*H,)
    row = abs_x.sum(dim=-2).amax(dim=-1)  # (B*H,)
    z = x3.transpose(1, 2) / (col * row)[:, None, None]  # (B*H, m, m)
    eye = torch.eye(m, dtype=x.dtype, device=x.device)
    eye7, eye13, eye15 = 7 * eye, 13 * eye, 15 * eye
    for _ in range(iters):
        xz = torch.bmm(x3, z)
        t = torch.baddbmm(eye15, xz, eye7 - xz, alpha=-1)  # 15 I - xz (7 I - xz)
        t = torch.baddbmm(eye13, xz, t, alpha=-1)  # 13 I - xz (...)
        z = torch.bmm(z, t).mul_(0.25)
    return z.reshape(shape)


class NystromAttention(nn.Module):
    """Multi-head Nystrom self-attention on (B, n, dim) with m landmarks."""

    def __init__(
        self,
        dim: int,
        *,
        heads: int = 8,
        dim_head: int = 64,
        n_landmarks: int = 256,
        pinv_iterations: int = 6,
        residual_kernel: int = 33,
        dropout: float = 0.1,
        exact_short: bool = True,
    ) -> None:
        super().__init__()
        self.exact_short = exact_short
        self.heads = heads
        self.dim_head = dim_head
        self.n_landmarks = n_landmarks
        self.pinv_iterations = pinv_iterations
        self.scale = dim_head**-0.5
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.res_conv = nn.Conv2d(
            heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0), groups=heads, bias=False
        )

    def forward(self, x: torch.Tensor, cls_row: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the attended sequence (B, n, dim) and, if `cls_row` is given, that
        query's approximate attention over the n tokens, (B, heads, n)."""
        b, n, _ = x.shape
        m = self.n_landmarks
        if self.exact_short and n <= m:
            return self._exact(x, cls_row)
        pad = (m - n % m) % m
        group = math.ceil(n / m)
        x = F.pad(x, (0, 0, pad, 0))  # (B, n', dim), n' = m * group
        qkv = self.to_qkv(x).reshape(b, n + pad, 3, self.heads, self.dim_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, n', d)

        valid = None
        if pad:  # the pad rows of q, k, v are already 0: zero input, bias-free to_qkv
            valid = torch.ones(n + pad, dtype=torch.bool, device=x.device)
            valid[:pad] = False
        q = q * self.scale

        q_land = q.reshape(b, self.heads, m, group, self.dim_head).sum(dim=3)  # (B, H, m, d)
        k_land = k.reshape(b, self.heads, m, group, self.dim_head).sum(dim=3)  # (B, H, m, d)
        if valid is None:
            q_land, k_land = q_land / group, k_land / group
            land_valid = None
        else:
            counts = valid.reshape(m, group).sum(dim=1)  # (m,)
            land_valid = counts > 0
            divisor = counts.clamp_min(1).to(q.dtype)[:, None]  # (m, 1)
            q_land, k_land = q_land / divisor, k_land / divisor

        sim1 = q @ k_land.transpose(-1, -2)  # (B, H, n', m)
        sim2 = q_land @ k_land.transpose(-1, -2)  # (B, H, m, m)
        sim3 = q_land @ k.transpose(-1, -2)  # (B, H, m, n')
        if valid is not None:
            fill = -torch.finfo(q.dtype).max
            sim1 = sim1.masked_fill(~(valid[:, None] & land_valid[None, :]), fill)
            sim2 = sim2.masked_fill(~(land_valid[:, None] & land_valid[None, :]), fill)
            sim3 = sim3.masked_fill(~(land_valid[:, None] & valid[None, :]), fill)
        attn1, attn2, attn3 = (t.softmax(dim=-1) for t in (sim1, sim2, sim3))
        attn2_inv = iterative_pinv(attn2, self.pinv_iterations)  # (B, H, m, m)

        out = (attn1 @ attn2_inv) @ (attn3 @ v)  # (B, H, n', d)
        out = out + self.res_conv(v)
        out = out.transpose(1, 2).reshape(b, n + pad, self.heads * self.dim_head)  # (B, n', H*d)
        out = self.to_out(out)[:, pad:]  # (B, n, dim)

        row = None
        if cls_row is not None:
            r = attn1[:, :, pad + cls_row, :].unsqueeze(-2)  # (B, H, 1, m)
            row = ((r @ attn2_inv) @ attn3).squeeze(-2)[..., pad:]  # (B, H, n)
        return out, row

    def _exact(self, x: torch.Tensor, cls_row: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Softmax attention for n <= m tokens: the Nystrom formula's value with an exact pseudo-inverse."""
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).reshape(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * self.scale) @ k.transpose(-1, -2)).softmax(dim=-1)  # (B, H, n, n), n <= m
        # the residual convolution sees the same zeros the padded path puts in front (bias-free to_qkv)
        out = attn @ v + self.res_conv(v)  # (B, H, n, d)
        out = self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))  # (B, n, dim)
        return out, (attn[:, :, cls_row, :] if cls_row is not None else None)
