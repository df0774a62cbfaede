"""ABMILX (ABMILX paper, section 3.2, eqs. 3-4; appendix B.3).

Path of a bag E (N instances, D features):

1. input: LayerNorm(D) then Linear(D, 512) then GELU, dropout 0.25; the
   LayerNorm and every linear layer of the model carry no bias (appendix B.3:
   "added a LayerNorm layer at its input", "disabled the bias of all fully
   connected layers in MIL").
2. multi-head local attention (MHLA): the 512 features are split into m = 8 head
   features H^j (N, 512/m); ONE attention MLP shared by all heads gives the local
   attention A^j = MLP(H^j) (N, 1) (Linear -> GELU -> Linear).
3. attention plus (A+), shared across heads:
       G(A^j) = A^j + alpha * softmax(Q^j K^jT / sqrt(ceil(D'/m))) A^j,
       Q^j = H^j W^q, K^j = H^j W^k, W^q, W^k: (512/m) x ceil(D'/m), alpha learnable.
4. Z^j = softmax(G(A^j))^T H^j per head; Z = Concat(Z^1..Z^m) (1, 512); a linear
   projection (512 x 512) and the linear classifier follow.

A+ at scale. The paper's A+ builds the N x N matrix softmax(QK^T/sqrt(d)), which
it names as a limitation. softmax(QK^T/sqrt(d)) @ A is exactly an attention op
with value = A, so `attn_plus_impl="sdpa"` (the default) computes it with
torch.nn.functional.scaled_dot_product_attention; the value is zero-padded from
1 to d columns because the fused CPU (flash) and CUDA kernels need equal q/v head
sizes, and with unequal sizes PyTorch silently falls back to the math kernel,
which materialises N x N. The fused kernels never hold N x N, so a 30,000- or
50,000-instance bag fits. `attn_plus_impl="naive"` keeps the explicit formula for
the benchmark and the equivalence test. In float64 the two agree to ~1e-15.

Choices where the paper is silent (all from the authors' code, DearCaat/E2E-WSI-ABMILX):
- the attention MLP's hidden size is the head size (512/m = 64), GELU activation;
- D' = 512 (Q/K head size 64);
- alpha is one scalar shared by the heads; the authors implement it as a
  bias-free Linear(1, 1) on the value, we keep a scalar parameter initialised to
  `alpha` (1.0; the paper's fixed-alpha ablation uses 1);
- the 512 x 512 bias-free projection after the concatenation: the paper's eq. 3
  does not show it, but its parameter count (0.80M at D = 1024) includes it.
Two configurations: `abmilx` is appendix B.3's (input LayerNorm, no biases, GELU), the one
the E2E trainer uses; `abmilx-feat` is the authors' two-stage feature configs
(config/feat/fm_*.yaml: no input LayerNorm, biases, ReLU; GELU for survival via act="gelu").
Departures from the authors' code (we follow the paper's equations): no
LayerNorm on H^j before W^q/W^k, and no LayerNorm before the classifier.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from baselines.mil.base import (
    MILAggregator,
    MILOutput,
    activation,
    check_bool,
    check_choice,
    check_int,
    check_prob,
    input_projection,
    masked_softmax,
    xavier_init,
)
from bench.common.errors import ConfigError

ATTN_PLUS_IMPLS = ("sdpa", "naive")


def attention_plus(
    q: torch.Tensor,
    k: torch.Tensor,
    a: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    impl: str = "sdpa",
) -> torch.Tensor:
    """softmax(q k^T * scale) @ a over the valid keys, without N x N memory for "sdpa".

    q, k: (B, H, N, d); a: (B, H, N, 1); mask: (B, N) bool (True = valid) or None.
    Returns (B, H, N, 1). Rows of padded queries are computed but meaningless.
    """
    if impl == "naive":
        sim = (q @ k.transpose(-1, -2)) * scale  # (B, H, N, N)
        keys = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, N)
        return masked_softmax(sim, keys) @ a  # (B, H, N, 1)
    check_choice("attn_plus_impl", impl, ATTN_PLUS_IMPLS)
    d = q.shape[-1]
    value = F.pad(a, (0, d - 1)) if d > 1 else a  # (B, H, N, d), column 0 holds a
    attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, N)
    out = F.scaled_dot_product_attention(q, k, value, attn_mask=attn_mask, scale=scale)  # (B, H, N, d)
    return out[..., :1]


class ABMILX(MILAggregator):
    """Multi-head local attention with the global attention-plus correction."""

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        hidden_dim: int = 512,
        n_heads: int = 8,
        attn_dim: int | None = None,
        qk_dim: int | None = None,
        dropout: float = 0.25,
        act: str = "gelu",
        attn_plus: bool = True,
        alpha: float = 1.0,
        learn_alpha: bool = True,
        attn_plus_impl: str = "sdpa",
        input_norm: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__(in_dim, n_outputs, hidden_dim)
        self.n_heads = check_int("n_heads", n_heads)
        if hidden_dim % n_heads:
            raise ConfigError(f"hidden_dim={hidden_dim} must be divisible by n_heads={n_heads}")
        self.head_dim = hidden_dim // n_heads
        attn_dim = self.head_dim if attn_dim is None else check_int("attn_dim", attn_dim)
        qk_dim = hidden_dim if qk_dim is None else check_int("qk_dim", qk_dim)
        self.qk_head_dim = math.ceil(qk_dim / n_heads)  # ceil(D'/m) of eq. 4
        self.attn_plus = check_bool("attn_plus", attn_plus)
        self.attn_plus_impl = check_choice("attn_plus_impl", attn_plus_impl, ATTN_PLUS_IMPLS)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ConfigError(f"alpha must be a finite number, got {alpha!r}")

        bias = check_bool("bias", bias)
        self.proj = input_projection(
            in_dim, hidden_dim, dropout=check_prob("dropout", dropout), act=act, bias=bias,
            input_norm=check_bool("input_norm", input_norm),
        )
        # One MLP for every head: A^j = MLP(H^j).
        self.attention_mlp = nn.Sequential(
            nn.Linear(self.head_dim, attn_dim, bias=bias), activation(act), nn.Linear(attn_dim, 1, bias=bias)
        )
        if self.attn_plus:
            self.w_q = nn.Linear(self.head_dim, self.qk_head_dim, bias=bias)
            self.w_k = nn.Linear(self.head_dim, self.qk_head_dim, bias=bias)
            alpha_t = torch.tensor(float(alpha))
            if check_bool("learn_alpha", learn_alpha):
                self.alpha = nn.Parameter(alpha_t)
            else:
                self.register_buffer("alpha", alpha_t)
        self.out_proj = nn.Linear(hidden_dim, hidden_dim, bias=bias)
        self.classifier = nn.Linear(hidden_dim, n_outputs, bias=bias)
        xavier_init(self)

    def aggregate(self, x: torch.Tensor, mask: torch.Tensor | None, label: torch.Tensor | None) -> MILOutput:
        b, n, _ = x.shape
        h = self.proj(x)  # (B, N, L)
        heads = h.reshape(b, n, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, N, L/H)
        a = self.attention_mlp(heads)  # (B, H, N, 1) local attention A^j
        if self.attn_plus:
            q, k = self.w_q(heads), self.w_k(heads)  # (B, H, N, d')
            scale = 1.0 / math.sqrt(self.qk_head_dim)
            a = a + self.alpha * attention_plus(q, k, a, mask, scale, self.attn_plus_impl)  # (B, H, N, 1) G(A^j)
        head_attention = masked_softmax(a.squeeze(-1), None if mask is None else mask[:, None, :])  # (B, H, N)
        z = torch.einsum("bhn,bhnd->bhd", head_attention, heads).reshape(b, self.hidden_dim)  # (B, L) concat heads
        logits = self.classifier(self.out_proj(z))  # (B, C)
        return MILOutput(logits=logits, attention=head_attention.mean(dim=1), head_attention=head_attention)
