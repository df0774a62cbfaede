"""ABMILX against the paper's equations, and the scalable A+ against the naive N x N formula."""

from __future__ import annotations

import math
import time

import pytest
import torch

from baselines.mil import build_aggregator
from baselines.mil.abmilx import attention_plus
from bench.evaluation.costs import PeakMemory, peak_memory_mb


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs().max() / b.abs().max()).detach())


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("d", [1, 8, 64])
def test_scalable_attention_plus_equals_naive_in_float64(with_mask, d):
    g = torch.Generator().manual_seed(3)
    b, h, n = 2, 3, 257
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    a = torch.randn(b, h, n, 1, generator=g, dtype=torch.float64)
    mask = None
    if with_mask:
        mask = torch.rand(b, n, generator=g) > 0.3
    scale = 1 / math.sqrt(d)
    naive = attention_plus(q, k, a, mask, scale, impl="naive")
    fast = attention_plus(q, k, a, mask, scale, impl="sdpa")
    assert fast.shape == naive.shape == (b, h, n, 1)
    assert rel_err(fast, naive) <= 1e-10
    # and the naive path is the formula itself: U = softmax(QK^T / sqrt(d)) over valid keys
    sim = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if mask is not None:
        sim = sim.masked_fill(~mask[:, None, None, :], -math.inf)
    explicit = torch.softmax(sim, dim=-1) @ a
    assert rel_err(naive, explicit) <= 1e-12


def test_model_with_scalable_and_naive_attention_plus_agree_in_float64():
    x = torch.randn(2, 300, 20, dtype=torch.float64)
    mask = torch.ones(2, 300, dtype=torch.bool)
    mask[1, 170:] = False
    fast = build_aggregator("abmilx", 20, 3, seed=0, hidden_dim=32, n_heads=4).double().eval()
    naive = build_aggregator("abmilx", 20, 3, seed=0, hidden_dim=32, n_heads=4, attn_plus_impl="naive").double().eval()
    out_fast, out_naive = fast(x, mask), naive(x, mask)
    assert rel_err(out_fast.logits, out_naive.logits) <= 1e-10
    assert rel_err(out_fast.head_attention, out_naive.head_attention) <= 1e-10


def paper_abmilx(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 3-4 of the paper, one head at a time with explicit matrices (one bag, (N, D))."""
    e = model.proj(x[None])[0]  # (N, 512): LayerNorm -> Linear -> GELU
    m, dh = model.n_heads, model.head_dim
    z_heads, attn = [], []
    for j in range(m):
        hj = e[:, j * dh : (j + 1) * dh]  # H^j: (N, D/m)
        aj = model.attention_mlp(hj)  # A^j = MLP(H^j): (N, 1), the same MLP for every head
        qj, kj = hj @ model.w_q.weight.T, hj @ model.w_k.weight.T  # (N, ceil(D'/m))
        uj = torch.softmax(qj @ kj.T / math.sqrt(math.ceil(model.hidden_dim / m)), dim=1)  # (N, N)
        gj = aj + model.alpha * (uj @ aj)  # G(A^j)
        pj = torch.softmax(gj[:, 0], dim=0)  # (N,)
        z_heads.append(pj @ hj)  # Z^j: (D/m,)
        attn.append(pj)
    z = torch.cat(z_heads)  # Concat(Z^1..Z^m)
    logits = model.classifier(model.out_proj(z))
    return logits, torch.stack(attn)


def test_abmilx_follows_the_paper_equations():
    model = build_aggregator("abmilx", 24, 2, seed=0, hidden_dim=32, n_heads=4, alpha=0.7).double().eval()
    x = torch.randn(1, 40, 24, dtype=torch.float64)
    logits, attn = paper_abmilx(model, x[0])
    out = model(x)
    torch.testing.assert_close(out.logits[0], logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.head_attention[0], attn, rtol=1e-10, atol=1e-12)


def test_abmilx_structure_is_bias_free_with_input_layernorm():
    model = build_aggregator("abmilx", 1024, 2)
    layernorm = model.proj[0]
    assert isinstance(layernorm, torch.nn.LayerNorm) and layernorm.bias is None
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.bias is None for m in linears)
    assert model.proj[1].out_features == 512 and model.n_heads == 8
    assert isinstance(model.alpha, torch.nn.Parameter) and model.alpha.item() == 1.0
    fixed = build_aggregator("abmilx", 1024, 2, learn_alpha=False)
    assert "alpha" not in dict(fixed.named_parameters())


def test_alpha_zero_is_plain_multi_head_local_attention():
    x = torch.randn(1, 30, 16, dtype=torch.float64)
    with_plus = build_aggregator("abmilx", 16, 2, seed=0, hidden_dim=16, n_heads=2, alpha=0.0).double().eval()
    without = build_aggregator("abmilx", 16, 2, seed=0, hidden_dim=16, n_heads=2, attn_plus=False).double().eval()
    # same seed, but attn_plus=True creates W^q/W^k: copy the shared weights over
    without.load_state_dict({k: v for k, v in with_plus.state_dict().items() if k in without.state_dict()})
    torch.testing.assert_close(with_plus(x).logits, without(x).logits)


def test_thirty_thousand_instance_bag_runs_without_n_squared_memory():
    n = 30_000
    model = build_aggregator("abmilx", 8, 2, seed=0, hidden_dim=16, n_heads=2).eval()
    x = torch.randn(1, n, 8)
    with PeakMemory() as peak, torch.no_grad():
        if peak.kind != "peak_rss_since_reset":
            pytest.skip("cannot reset the peak RSS on this system")
        before = peak_memory_mb()  # the reset set the peak to the current RSS
        start = time.perf_counter()
        out = model(x)
        seconds = time.perf_counter() - start
    grew = peak.mb - before
    assert out.logits.shape == (1, 2) and torch.isfinite(out.logits).all()
    torch.testing.assert_close(out.attention.sum(), torch.tensor(1.0))
    one_n_by_n = n * n * 4 / 2**20  # a single float32 N x N matrix: ~3.4 GiB
    assert grew < one_n_by_n / 4, f"forward grew RSS by {grew:.0f} MiB"
    assert seconds < 30  # typically 1-3 s on 2 cores; generous for loaded CI machines
