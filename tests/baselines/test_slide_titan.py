"""TITAN slide encoder: tiny random-init instances in float64, the published size on the meta device, a
checkpoint written by the test with the authors' key names, and the forward written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from baselines.encoders_slide import SLIDE_ENCODERS
from baselines.slide import build_slide_arch
from baselines.slide.titan import alibi_bias, alibi_slopes
from bench.common.errors import ConfigError

# published sizes (config.json vision_config: dim 768, depth 6, 12 heads, mlp 4, 8 pooler heads), counted
# from the authors' build_vision_tower: 48,539,904 in all, less the 128-query attn_pool (2,463,744) and
# proj (589,824), which the slide embedding does not use (see baselines/slide/titan.py)
PUBLISHED_PARAMS = 45_486_336


def _tiny(seed: int = 0, **overrides) -> torch.nn.Module:
    """Tiny TITAN in float64 with weights redrawn at a scale where every part of the forward matters
    (the authors' init gives near-constant outputs at this size)."""
    torch.manual_seed(seed)
    enc = build_slide_arch("titan", config="tiny", **overrides).double().eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(0.5 * torch.randn_like(p))
    return enc


def _slide(n: int, d: int = 16, seed: int = 1, side: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, n, d) features and (1, n, 2) distinct grid positions (column, row) on a side x side grid, offset."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randperm(side * side, generator=g)[:n]
    coords = torch.stack([cells // side, cells % side], dim=1).double() + torch.tensor([7.0, 3.0])
    return torch.randn(1, n, d, generator=g, dtype=torch.float64), coords[None]


def test_output_shape_in_dim_override_and_needs_coords():
    enc = build_slide_arch("titan", config="tiny", in_dim=12).eval()
    assert enc.uses_coords is True
    x, coords = _slide(7, d=12)
    z = enc(x.float().expand(3, -1, -1), coords=coords.float().expand(3, -1, -1))
    assert z.shape == (3, enc.embed_dim) == (3, 12)
    assert torch.isfinite(z).all()
    with pytest.raises(ConfigError, match="coords=None"):
        enc(x.float())


def test_padded_bag_equals_unpadded_bag():
    enc = _tiny()
    x, coords = _slide(5)
    pad_x = torch.cat([x, 100.0 * torch.randn(1, 3, 16, dtype=torch.float64)], dim=1)  # loud padding
    pad_c = torch.cat([coords, torch.tensor([[[float("nan"), 0.0], [1e6, -1e6], [7.0, 3.0]]],
                                            dtype=torch.float64)], dim=1)  # garbage coords too
    mask = torch.tensor([[True] * 5 + [False] * 3])
    with torch.no_grad():
        ref = enc(x, coords=coords)
        out = enc(pad_x, coords=pad_c, mask=mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert torch.all(enc.attention()[0, 5:] == 0)


def test_batch_of_two_bags_equals_each_bag_alone():
    enc = _tiny()
    (xa, ca), (xb, cb) = _slide(4, seed=2), _slide(9, seed=3, side=5)
    x = torch.zeros(2, 9, 16, dtype=torch.float64)
    c = torch.zeros(2, 9, 2, dtype=torch.float64)
    x[0, :4], c[0, :4], x[1], c[1] = xa[0], ca[0], xb[0], cb[0]
    mask = torch.tensor([[True] * 4 + [False] * 5, [True] * 9])
    with torch.no_grad():
        out = enc(x, coords=c, mask=mask)
        att = enc.attention()
        alone_a, att_a = enc(xa, coords=ca), enc.attention()
        alone_b, att_b = enc(xb, coords=cb), enc.attention()
    torch.testing.assert_close(out[0], alone_a[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[1], alone_b[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(att[0, :4], att_a[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(att[1], att_b[0], rtol=0, atol=1e-12)


def test_patch_order_does_not_matter_given_the_coords():
    """Grid placement: tokens follow the grid cells, not the order the patches come in."""
    enc = _tiny()
    x, coords = _slide(11)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref, att = enc(x, coords=coords), enc.attention()
        out = enc(x[:, perm], coords=coords[:, perm])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(enc.attention(), att[:, perm], rtol=0, atol=1e-12)


def test_positions_matter_but_only_relative_ones():
    enc = _tiny()
    x, coords = _slide(8)
    moved = coords.clone()
    moved[0, 2] = torch.tensor([30.0, 30.0])  # one patch far away
    with torch.no_grad():
        ref = enc(x, coords=coords)
        assert not torch.allclose(enc(x, coords=moved), ref, rtol=1e-6, atol=1e-8)
        # the authors subtract the smallest coordinate: shifting the whole slide changes nothing
        torch.testing.assert_close(enc(x, coords=coords + 13.0), ref, rtol=0, atol=1e-12)
        # round-off of pixel / side (2.99999 for 3) falls in the intended cell
        torch.testing.assert_close(enc(x, coords=coords - 3e-6 * (coords > 8)), ref, rtol=0, atol=1e-12)


def test_a_shared_cell_sums_its_patches_and_an_all_zero_cell_is_background():
    """The authors' index_add_ placement adds patches that fall in one cell; their bg_mask drops cells
    whose features are all zero."""
    enc = _tiny()
    x, coords = _slide(6)
    twin = torch.randn(1, 1, 16, dtype=torch.float64)
    dup_x = torch.cat([x, twin], dim=1)
    dup_c = torch.cat([coords, coords[:, :1]], dim=1)  # same cell as patch 0
    summed = x.clone()
    summed[0, 0] += twin[0, 0]
    zero_x = torch.cat([x, torch.zeros(1, 1, 16, dtype=torch.float64)], dim=1)
    zero_c = torch.cat([coords, torch.tensor([[[40.0, 40.0]]], dtype=torch.float64)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(enc(dup_x, coords=dup_c), enc(summed, coords=coords), rtol=0, atol=1e-12)
        att = enc.attention()
        enc(dup_x, coords=dup_c)
        # the twins split their cell's weight evenly; the other cells keep theirs
        torch.testing.assert_close(enc.attention()[0, 0], att[0, 0] / 2, rtol=0, atol=1e-12)
        assert enc.attention()[0, 0] == enc.attention()[0, 6]
        torch.testing.assert_close(enc.attention()[0, 1:6], att[0, 1:6], rtol=0, atol=1e-12)
        with_zero = enc(zero_x, coords=zero_c)
        assert enc.attention()[0, 6] == 0
        torch.testing.assert_close(with_zero, enc(x, coords=coords), rtol=0, atol=1e-12)


def test_attention_is_the_pooling_weights_on_the_patch_tokens():
    enc = _tiny()
    x, coords = _slide(7)
    mask = torch.tensor([[True] * 5 + [False] * 2])
    with torch.no_grad():
        enc(x, coords=coords, mask=mask)
    a = enc.attention()
    assert a.shape == (1, 7)
    assert torch.all(a[0, :5] > 0) and torch.all(a[0, 5:] == 0)
    # the pooling query's weights on the 5 cell tokens, CLS left out, renormalised over the patches
    with torch.no_grad():
        feats, cells, token_of_patch = enc._place(x[0], coords[0], mask[0])  # row-major cell tokens
        tokens = enc.norm(enc.blocks(torch.cat([enc.cls_token, enc.patch_embed(feats[None])], dim=1),
                                     alibi_bias(cells[None], enc.slopes.double())))
        _, weights = enc.attn_pool_contrastive(tokens, torch.ones(1, 6, dtype=torch.bool))
    on_cells = weights[0, 0, 1:]
    expected = on_cells[token_of_patch[:5]] / on_cells.sum()
    torch.testing.assert_close(a[0, :5], expected.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(a.sum(), torch.tensor(1.0, dtype=a.dtype), rtol=0, atol=1e-12)


def test_invalid_inputs_are_config_errors_naming_the_problem():
    enc = _tiny()
    x, coords = _slide(4)
    with pytest.raises(ConfigError, match=r"coords must be \(B, N, 2\)"):
        enc(x, coords=coords[..., :1])
    with pytest.raises(ConfigError, match="no valid patch"):
        enc(x, coords=coords, mask=torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ConfigError, match="finite"):
        enc(x, coords=torch.full_like(coords, float("nan")))
    with pytest.raises(ConfigError, match=r"features must be \(B, N, 16\)"):
        enc(x[..., :8], coords=coords)


# ---- ALiBi and the forward written out ---------------------------------------------------------------


def test_alibi_slopes_are_the_standard_ones():
    assert alibi_slopes(8) == pytest.approx([2.0 ** -i for i in range(1, 9)], rel=1e-15)
    # 12 heads (published): the 8 slopes, then every other one of the 16-head series
    assert alibi_slopes(12) == pytest.approx([2.0 ** -i for i in range(1, 9)] + [2.0 ** -(i + 0.5) for i in range(4)],
                                             rel=1e-15)
    assert alibi_slopes(3) == pytest.approx([2.0 ** -4, 2.0 ** -8, 2.0 ** -2], rel=1e-15)


def test_alibi_bias_of_a_2x2_grid_by_hand():
    cells = torch.tensor([[[0, 0], [0, 1], [1, 0], [1, 1]]])
    slopes = torch.tensor([0.5, 0.25], dtype=torch.float64)
    r2 = math.sqrt(2.0)
    dist = torch.tensor([[0, 1, 1, r2], [1, 0, r2, 1], [1, r2, 0, 1], [r2, 1, 1, 0]], dtype=torch.float64)
    bias = alibi_bias(cells, slopes)
    assert bias.shape == (1, 2, 5, 5)
    for h, s in enumerate((0.5, 0.25)):
        expected = torch.zeros(5, 5, dtype=torch.float64)
        expected[1:, 1:] = -s * dist  # CLS row and column stay 0
        torch.testing.assert_close(bias[0, h], expected, rtol=0, atol=1e-15)


def _ln(x, p, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], p[prefix + "weight"], p[prefix + "bias"], eps)


def _lin(x, p, prefix):
    return x @ p[prefix + "weight"].T + p[prefix + "bias"]


def _heads(t, h):
    return t.view(t.shape[0], h, -1).transpose(0, 1)  # (T, D) -> (h, T, D/h)


def test_forward_matches_a_written_out_vit_with_alibi_on_a_2x2_grid():
    """The authors' B == 1 path for a 2x2 slide given in scrambled order: row-major cell tokens after a
    CLS token, 3-head ALiBi attention, final norm, single-query 2-head pooling of all tokens."""
    enc = _tiny()
    p = enc.state_dict()
    x = torch.randn(4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    coords = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]) + 4.0  # (col, row)
    order = [1, 3, 2, 0]  # cells (0,0), (0,1), (1,0), (1,1): the authors' grid_x * W + grid_y order
    r2 = math.sqrt(2.0)
    dist = torch.tensor([[0, 1, 1, r2], [1, 0, r2, 1], [1, r2, 0, 1], [r2, 1, 1, 0]], dtype=torch.float64)
    slopes = [2.0 ** -4, 2.0 ** -8, 2.0 ** -2]
    bias = torch.zeros(3, 5, 5, dtype=torch.float64)
    for h, s in enumerate(slopes):
        bias[h, 1:, 1:] = -s * dist

    t = torch.cat([p["cls_token"][0], F.gelu(_lin(x[order], p, "patch_embed.0."))])  # (5, 12)
    for i in range(2):
        b = f"blocks.modules_list.{i}."
        q, k, v = _lin(_ln(t, p, b + "norm1.", 1e-6), p, b + "attn.qkv.").chunk(3, dim=-1)
        q, k, v = _heads(q, 3), _heads(k, 3), _heads(v, 3)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(4) + bias, dim=-1) @ v  # (3, 5, 4)
        t = t + _lin(att.transpose(0, 1).reshape(5, 12), p, b + "attn.proj.")
        t = t + _lin(F.gelu(_lin(_ln(t, p, b + "norm2.", 1e-6), p, b + "mlp.fc1.")), p, b + "mlp.fc2.")
    t = _ln(t, p, "norm.", 1e-6)
    pool = "attn_pool_contrastive."
    kv = _ln(t, p, pool + "ln_k.", 1e-5)
    q0 = _ln(p[pool + "query"], p, pool + "ln_q.", 1e-5)  # (1, 12)
    wq, wk, wv = p[pool + "attn.in_proj_weight"].chunk(3)
    bq, bk, bv = p[pool + "attn.in_proj_bias"].chunk(3)
    qh, kh, vh = _heads(q0 @ wq.T + bq, 2), _heads(kv @ wk.T + bk, 2), _heads(kv @ wv.T + bv, 2)
    weights = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(6), dim=-1)  # (2, 1, 5)
    pooled = (weights @ vh).transpose(0, 1).reshape(1, 12)
    expected = _lin(pooled, p, pool + "attn.out_proj.")[0]

    with torch.no_grad():
        z = enc(x[None], coords=coords[None].double())
    torch.testing.assert_close(z[0], expected, rtol=0, atol=1e-12)
    per_cell = weights.mean(dim=0)[0, 1:]  # tokens in cell order
    per_cell = per_cell / per_cell.sum()  # the CLS share left out, renormalised over the patches
    torch.testing.assert_close(enc.attention()[0, order], per_cell, rtol=0, atol=1e-12)


# ---- loading the authors' checkpoint and the published size --------------------------------------------


def _authors_checkpoint(enc: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`enc`'s weights as the Hub model saves them: under vision_encoder., with the 128-query attn_pool,
    proj and the text tower, which this port leaves out."""
    sd = {"vision_encoder." + k: v.clone() for k, v in enc.state_dict().items()}
    d = enc.embed_dim
    sd.update({"vision_encoder.attn_pool.query": torch.zeros(128, d),
               "vision_encoder.attn_pool.attn.in_proj_weight": torch.zeros(3 * d, d),
               "vision_encoder.attn_pool.ln_k.weight": torch.zeros(d),
               "vision_encoder.proj": torch.zeros(d, d),
               "text_encoder.token_embedding.weight": torch.zeros(5, d)})
    return sd


def test_load_published_round_trips_the_authors_keys():
    src, dst = _tiny(seed=0), _tiny(seed=1)
    x, coords = _slide(6)
    with torch.no_grad():
        assert not torch.allclose(src(x, coords=coords), dst(x, coords=coords))
        dst.load_published(_authors_checkpoint(src))
        torch.testing.assert_close(dst(x, coords=coords), src(x, coords=coords), rtol=0, atol=0)


def test_load_published_names_a_missing_or_unexpected_key():
    enc = _tiny()
    sd = _authors_checkpoint(enc)
    missing = "vision_encoder.attn_pool_contrastive.ln_q.bias"
    with pytest.raises(ConfigError, match="missing.*attn_pool_contrastive.ln_q.bias"):
        enc.load_published({k: v for k, v in sd.items() if k != missing})
    with pytest.raises(ConfigError, match="unexpected.*masked_embed"):
        enc.load_published({**sd, "vision_encoder.masked_embed": torch.zeros(1, enc.embed_dim)})


def test_published_config_on_meta_has_the_authors_sizes():
    with torch.device("meta"):
        enc = build_slide_arch("titan")
    spec = SLIDE_ENCODERS.get("titan")
    assert (enc.in_dim, enc.embed_dim) == (spec.patch_dim, spec.embed_dim) == (768, 768)
    assert sum(p.numel() for p in enc.parameters()) == PUBLISHED_PARAMS
    assert len(enc.blocks.modules_list) == 6 and enc.num_heads == 12
    assert enc.blocks.modules_list[0].mlp.fc1.out_features == 3072
    assert enc.attn_pool_contrastive.attn.num_heads == 8
    assert all(p.device.type == "meta" for p in enc.parameters())


def test_unknown_override_and_config_are_errors_naming_them():
    with pytest.raises(ConfigError, match="depthh"):
        build_slide_arch("titan", config="tiny", depthh=3)
    with pytest.raises(ConfigError, match="'huge'"):
        build_slide_arch("titan", config="huge")
    with pytest.raises(ConfigError, match="embed_dim 12 must divide by num_heads 5"):
        build_slide_arch("titan", config="tiny", num_heads=5)
