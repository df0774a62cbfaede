"""Prov-GigaPath slide encoder (`gigapath-slide`, baselines/slide/gigapath.py): LongNet dilated attention,
end padding, grid positions, published parameter count on the meta device, and a checkpoint written here
with the authors' key names.

Equivalence with the authors' code (measured once, not part of this suite, which downloads nothing):
prov-gigapath/prov-gigapath@09d8e876afb98a1dda01cc531b1087c58fffc9f7 (`gigapath/slide_encoder.py`
LongNetViT with global_pool=True, vendored torchscale), run from /tmp with a plain-softmax stand-in for
`flash_attn_func` (natural-log lse, shape (B, H, L)) and no-op fairscale wrappers; this module's random
weights (perturbed so LayerNorms and biases are not trivial) copied into it, float64, bags of 1-40 tiles
plus a batch of two, coords in pixels = grid * 256 + a sub-tile offset, compared against
`model(x, coords, all_layer_embed=True)[embed_layer]`. Four configs: the tiny one (8-d, 4 heads, segments
(4, 8), dilations (1, 2)); 24-d 6 heads with five branches (3, 5, 8, 16, 32) x (1, 2, 4, 8, 16) (head
padding, segments not a multiple of the dilation); 32-d 16 heads, slide_ngrids 1000, (4, 6, 12, 24, 40) x
(1, 2, 4, 8, 16); 16-d with dilations (2, 3) and embed_layer = depth. Max abs difference of the slide
embedding over all of them: 8.9e-16 (embeddings of magnitude ~2).
"""

from __future__ import annotations

import math

import pytest
import torch

from baselines.slide import build_slide_arch
from baselines.slide.gigapath import (
    GigaPathSlide,
    combine_branches,
    dilated_attention,
    optimal_segment_lengths,
)
from bench.common.errors import ConfigError

TINY = {"in_dim": 16, "embed_dim": 8, "depth": 3, "embed_layer": 2, "num_heads": 4, "ffn_dim": 12,
        "slide_ngrids": 64}  # the module's "tiny" config (segments (4, 8), dilations (1, 2))


def _tiny(seed: int = 0, **overrides) -> GigaPathSlide:
    torch.manual_seed(seed)
    return build_slide_arch("gigapath-slide", config="tiny", **overrides).double().eval()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bag(n: int, d: int = 16, b: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, n, d, generator=_gen(seed), dtype=torch.float64)


def _grid(n: int, b: int = 1, seed: int = 2, side: int = 64) -> torch.Tensor:
    return torch.randint(0, side, (b, n, 2), generator=_gen(seed)).to(torch.float64)


def _full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention, (B, L, H, d) -> (B, L, H, d), scale d^-0.5."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v)


def test_output_shape_in_dim_override_and_uses_coords():
    enc = _tiny(in_dim=12)
    z = enc(_bag(21, d=12, b=3), coords=_grid(21, b=3))
    assert z.shape == (3, enc.embed_dim) == (3, 8)
    assert torch.isfinite(z).all()
    assert enc.uses_coords is True


@pytest.mark.parametrize("segment_length", (20, 23, 1000))
def test_one_branch_covering_the_bag_without_dilation_is_full_attention(segment_length):
    g = _gen(3)
    q, k, v = (torch.randn(2, 20, 4, 6, generator=g, dtype=torch.float64) for _ in range(3))
    out = dilated_attention(q, k, v, [segment_length], [1])
    torch.testing.assert_close(out, _full_attention(q, k, v), rtol=0, atol=1e-12)


def test_combine_branches_weights_by_softmax_of_lse():
    # two branches, one token, one head: lse log 1 and log 3 -> weights 1/4 and 3/4
    outs = [torch.full((1, 1, 1, 2), 1.0, dtype=torch.float64), torch.full((1, 1, 1, 2), 5.0, dtype=torch.float64)]
    lses = [torch.zeros(1, 1, 1, dtype=torch.float64), torch.full((1, 1, 1), math.log(3.0), dtype=torch.float64)]
    torch.testing.assert_close(combine_branches(outs, lses), torch.full((1, 1, 1, 2), 4.0, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    # a branch that skips the token (lse -1e8) gets weight 0
    lses = [torch.zeros(1, 1, 1, dtype=torch.float64), torch.full((1, 1, 1), -1e8, dtype=torch.float64)]
    torch.testing.assert_close(combine_branches(outs, lses), outs[0], rtol=0, atol=1e-12)


def test_two_branch_dilated_attention_by_hand():
    """L = 4 tokens, H = 4 heads, head_dim 1 (scale 1), branches (w=2, r=1) and (w=4, r=2).

    Branch A (w=2, r=1): segments {0, 1} and {2, 3}, every head sees its token's whole segment.
    Branch B (w=4, r=2): one segment of 4; heads 0, 1 keep positions 0, 2 and heads 2, 3 keep 1, 3
    (head j keeps position p with p = j // ceil(H / r) mod r, the authors' `(r2 h)` head layout).
    A token a head skips gets nothing from B.
    Per (token i, head h): out = (e^lA oA + e^lB oB) / (e^lA + e^lB), lse = log sum_j e^(q_i k_j).
    """
    q = torch.tensor([[0.3, -1.2, 0.6, 0.1], [0.9, 0.4, -0.2, 1.4], [-0.5, 0.8, 1.0, -0.9],
                      [1.1, -0.7, 0.35, 0.5]], dtype=torch.float64)  # (L, H)
    k = torch.tensor([[0.2, 0.5, -0.8, 0.3], [-1.0, 0.1, 0.45, -0.6], [0.7, -0.3, 1.2, 0.9],
                      [0.4, 1.3, -0.1, -1.1]], dtype=torch.float64)
    v = torch.tensor([[1.0, -2.0, 0.5, 1.5], [3.0, 0.5, -1.0, 2.0], [-1.5, 2.5, 0.75, -0.5],
                      [0.25, -0.75, 2.25, 1.25]], dtype=torch.float64)

    def att(i: int, h: int, keys: list[int]) -> tuple[float, float]:
        s = [float(q[i, h] * k[j, h]) for j in keys]
        lse = math.log(sum(math.exp(x) for x in s))
        return sum(math.exp(x - lse) * float(v[j, h]) for x, j in zip(s, keys)), lse

    segment_a = {0: [0, 1], 1: [0, 1], 2: [2, 3], 3: [2, 3]}
    kept_b = {0: [0, 2], 1: [0, 2], 2: [1, 3], 3: [1, 3]}  # head -> positions it keeps in branch B
    expected = torch.zeros(4, 4, dtype=torch.float64)
    for i in range(4):
        for h in range(4):
            o_a, l_a = att(i, h, segment_a[i])
            if i in kept_b[h]:
                o_b, l_b = att(i, h, kept_b[h])
                expected[i, h] = (math.exp(l_a) * o_a + math.exp(l_b) * o_b) / (math.exp(l_a) + math.exp(l_b))
            else:
                expected[i, h] = o_a
    out = dilated_attention(q[None, :, :, None], k[None, :, :, None], v[None, :, :, None], [2, 4], [1, 2])
    torch.testing.assert_close(out[0, :, :, 0], expected, rtol=0, atol=1e-12)


def test_a_branch_lse_of_exactly_zero_counts_as_skipped():
    # the authors' sparse_to_dense masks lse == 0 to -1e8: with q = 0 each one-token segment of the
    # (w=1, r=1) branch has lse log(1) = 0, so that branch gets weight 0 and only the full branch remains
    g = _gen(6)
    k, v = (torch.randn(1, 5, 2, 3, generator=g, dtype=torch.float64) for _ in range(2))
    q = torch.zeros_like(k)
    out = dilated_attention(q, k, v, [1, 5], [1, 1])
    torch.testing.assert_close(out, v.mean(dim=1, keepdim=True).expand_as(v), rtol=0, atol=1e-12)


def test_end_padding_does_not_change_the_output():
    enc = _tiny()
    x, grid = _bag(13), _grid(13)
    padded_x = torch.cat([x, 100.0 * _bag(7, seed=9)], dim=1)  # loud values in the padding
    padded_grid = torch.cat([grid, torch.full((1, 7, 2), -5e6, dtype=torch.float64)], dim=1)  # off the table too
    mask = torch.tensor([[True] * 13 + [False] * 7])
    with torch.no_grad():
        ref, out = enc(x, grid), enc(padded_x, padded_grid, mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_batch_of_two_bags_equals_each_bag_alone():
    enc = _tiny()
    a, b = _bag(9, seed=2), _bag(17, seed=3)  # 10 and 18 tokens with CLS: different segmentings
    ga, gb = _grid(9, seed=4), _grid(17, seed=5)
    x = torch.zeros(2, 17, 16, dtype=torch.float64)
    coords = torch.zeros(2, 17, 2, dtype=torch.float64)
    x[0, :9], x[1], coords[0, :9], coords[1] = a[0], b[0], ga[0], gb[0]
    mask = torch.tensor([[True] * 9 + [False] * 8, [True] * 17])
    with torch.no_grad():
        out = enc(x, coords, mask)
        torch.testing.assert_close(out[0], enc(a, ga)[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(out[1], enc(b, gb)[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("valid", ([True, False, True, True], [False, True, True, True], [False] * 4))
def test_mask_that_is_not_a_valid_prefix_is_a_config_error(valid):
    enc = _tiny()
    with pytest.raises(ConfigError, match="padding must sit at the end|no valid tile"):
        enc(_bag(4), _grid(4), torch.tensor([valid]))


def test_coords_none_or_outside_the_grid_table_is_a_config_error():
    enc = _tiny()
    x = _bag(5)
    with pytest.raises(ConfigError, match="coord"):
        enc(x)
    with pytest.raises(ConfigError, match="coords must be"):
        enc.encode(x, None, None)
    with pytest.raises(ConfigError, match="coords must be"):
        enc(x, _grid(4))  # one position short
    for bad in (-1.0, 64.0, 256.0 * 3):  # the tiny table is 64 x 64; pixel coords are a typical mistake
        coords = _grid(5)
        coords[0, 2, 1] = bad
        with pytest.raises(ConfigError, match=r"outside .*64 x 64 position table"):
            enc(x, coords)


def test_positions_matter_and_only_the_grid_cell_counts():
    enc = _tiny()
    x, grid = _bag(11), _grid(11)
    moved = grid.clone()
    moved[0, 4] = torch.tensor([(grid[0, 4, 0] + 7) % 64, grid[0, 4, 1]])
    swapped = grid.flip(-1)  # (column, row) -> (row, column)
    with torch.no_grad():
        ref = enc(x, grid)
        assert (enc(x, moved) - ref).abs().max() > 1e-6
        assert (enc(x, swapped) - ref).abs().max() > 1e-6
        # the authors take floor(pixels / 256): anywhere inside the tile's cell is the same position
        torch.testing.assert_close(enc(x, grid + 0.75), ref, rtol=0, atol=1e-12)


def test_published_config_on_meta_device():
    # Counted from prov-gigapath@09d8e87 (torchscale EncoderLayer / MultiheadAttention / FeedForwardNetwork,
    # subln on, LongNet_12_layers_768_dim: 768-d, ffn 3072), and checked by building the authors'
    # gigapath_slide_enc12l768d on the meta device:
    #   one layer = q/k/v/out_proj 4 * (768 * 768 + 768) = 2,362,368 + inner_attn_ln 1,536
    #             + self_attn_layer_norm 1,536 + fc1 768 * 3072 + 3072 = 2,362,368
    #             + fc2 3072 * 768 + 768 = 2,360,064 + ffn_layernorm 6,144 + final_layer_norm 1,536 = 7,095,552
    #   encoder   = 12 layers + encoder.layer_norm 1,536 = 85,148,160 (the notebook's "trainable LongNet parameters")
    #   rest      = patch_embed.proj 1536 * 768 + 768 = 1,180,416 + cls_token 768 + norm 1,536 = 1,182,720
    #   authors   = 86,330,880 (demo/run_gigapath.ipynb "Slide encoder param #")
    # The embedding is encoder_states[11] (before layer 12 and encoder.layer_norm), which this module stops at:
    #   86,330,880 - 7,095,552 - 1,536 = 79,233,792.
    assert optimal_segment_lengths(262144, 256) == (1024, 5792, 32768, 185363, 1048576)
    with torch.device("meta"):
        enc = build_slide_arch("gigapath-slide", config="published")
    assert sum(p.numel() for p in enc.parameters()) == 79_233_792
    assert (enc.in_dim, enc.embed_dim, len(enc.encoder.layers)) == (1536, 768, 11)
    attn = enc.encoder.layers[0].self_attn
    assert attn.segment_lengths == (1024, 5792, 32768, 185363, 1048576)
    assert attn.dilated_ratios == (1, 2, 4, 8, 16) and attn.num_heads == 16
    z = enc(torch.empty(2, 30, 1536, device="meta"), torch.empty(2, 30, 2, device="meta"))
    assert z.shape == (2, 768)


def _authors_checkpoint(c: dict, seed: int = 5) -> dict[str, torch.Tensor]:
    """A `slide_encoder.pth`-style {"model": ...} dict with the authors' key names at tiny sizes, all
    `depth` layers and `encoder.layer_norm` included (the embedding does not use them)."""
    g = _gen(seed)
    d, f = c["embed_dim"], c["ffn_dim"]
    shapes = {"cls_token": (1, 1, d), "patch_embed.proj.weight": (d, c["in_dim"]), "patch_embed.proj.bias": (d,),
              "norm.weight": (d,), "norm.bias": (d,), "encoder.layer_norm.weight": (d,), "encoder.layer_norm.bias": (d,)}
    for i in range(c["depth"]):
        p = f"encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes[p + f"self_attn.{proj}.weight"], shapes[p + f"self_attn.{proj}.bias"] = (d, d), (d,)
        for ln, n in (("self_attn.inner_attn_ln", d), ("self_attn_layer_norm", d), ("ffn.ffn_layernorm", f),
                      ("final_layer_norm", d)):
            shapes[p + ln + ".weight"], shapes[p + ln + ".bias"] = (n,), (n,)
        shapes[p + "ffn.fc1.weight"], shapes[p + "ffn.fc1.bias"] = (f, d), (f,)
        shapes[p + "ffn.fc2.weight"], shapes[p + "ffn.fc2.bias"] = (d, f), (d,)
    return {"model": {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}}


def test_checkpoint_with_the_authors_key_names_loads():
    ckpt = _authors_checkpoint(TINY)
    enc = _tiny(seed=11)
    enc.load_published(ckpt)
    state = enc.state_dict()
    dropped = sorted(set(ckpt["model"]) - set(state))
    assert dropped and all(k.startswith(("encoder.layers.2.", "encoder.layer_norm.")) for k in dropped)
    assert len(dropped) == 20 + 2  # layer 3 of 3 (20 tensors) and the encoder's final layer_norm
    for key, value in state.items():
        torch.testing.assert_close(value, ckpt["model"][key], rtol=0, atol=0)
    # the bare dict (without "model") and a stray `pos_embed` buffer load too
    other = _tiny(seed=12)
    other.load_published({**ckpt["model"], "pos_embed": torch.zeros(1, 64 * 64 + 1, 8)})
    with torch.no_grad():
        torch.testing.assert_close(other(_bag(10), _grid(10)), enc(_bag(10), _grid(10)), rtol=0, atol=0)


def test_checkpoint_with_a_missing_or_unexpected_key_is_a_config_error():
    enc = _tiny()
    missing = dict(_authors_checkpoint(TINY)["model"])
    del missing["encoder.layers.1.ffn.fc2.weight"]
    with pytest.raises(ConfigError, match=r"missing \['encoder.layers.1.ffn.fc2.weight'\]"):
        enc.load_published(missing)
    unexpected = {**_authors_checkpoint(TINY)["model"], "encoder.embed_positions.weight": torch.zeros(3)}
    with pytest.raises(ConfigError, match=r"unexpected \['encoder.embed_positions.weight'\]"):
        enc.load_published(unexpected)
