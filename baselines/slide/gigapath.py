"""Prov-GigaPath's slide encoder (registry name `gigapath-slide`): a LongNet over GigaPath tile features.

Prov-GigaPath (Xu et al., Nature 2024) encodes a slide from its GigaPath tile embeddings (1536-d,
256 px tiles at 20x) and their positions with a 12-layer, 768-d LongNet (dilated attention), pretrained
as a masked autoencoder. The slide embedding is the layer-normed mean of the non-CLS tokens.

Source (read, not copied): prov-gigapath/prov-gigapath at commit 09d8e876afb98a1dda01cc531b1087c58fffc9f7,
`gigapath/slide_encoder.py` (LongNetViT, `gigapath_slide_enc12l768d`: embed_dim 768, depth 12,
norm LayerNorm eps 1e-6; defaults slide_ngrids 1000, tile_size 256, max_wsi_size 262144, dropout 0.25,
drop_path_rate 0.1; `get_optimal_segment_length`; `coords_to_pos`; `global_pool`), `gigapath/pos_embed.py`
(2D sin-cos table), and the vendored torchscale: `model/LongNetConfig.py` (LongNet_12_layers_768_dim:
ffn 3072, 16 heads, dilated_ratio [1, 2, 4, 8, 16]), `model/LongNet.py` (`make_longnet_from_name`),
`architecture/config.py` (EncoderConfig defaults: subln True -> pre-norm, normalize_output True,
no_scale_embedding True, layernorm_eps 1e-5, gelu, attention/activation dropout 0), `architecture/encoder.py`
(Encoder, EncoderLayer), `component/dilated_attention.py` (DilatedAttention), `component/multihead_attention.py`
(q/k/v/out projections with biases, `inner_attn_ln`) and `component/feedforward_network.py` (fc1 -> gelu ->
`ffn_layernorm` -> fc2). The demo notebook `demo/run_gigapath.ipynb` prints the segment lengths
[1024, 5792, 32768, 185363, 1048576], "Number of trainable LongNet parameters: 85148160" and
"Slide encoder param # 86330880". TRIDENT (mahmoodlab/TRIDENT a91fa84, `trident/slide_encoder_models/load.py`,
GigaPathSlideEncoder) builds `create_model(..., "gigapath_slide_enc12l768d", 1536, global_pool=True)`, sets
`tile_size` to the patch's level-0 size (so coords / tile_size is the grid position), and returns
`model(features, coords, all_layer_embed=True)[11]`, 768-d, fp16; the authors' fine-tuning
(`finetune/params.py`, `--feat_layer` default "11"; `gigapath/classification_head.py`) takes the same entry.

Architecture (the authors' module names, so `slide_encoder.pth` loads unchanged)::

    h = patch_embed.proj(x) + sincos(grid)                        (B, N, 768)
    h = [cls_token + 0; h]                                        (B, 1 + N, 768)  (CLS row of the table is 0)
    h = dropout(h)                                                (Encoder.forward_embedding; scale 1)
    for layer in encoder.layers[:11]:                             (pre-norm, subln)
        a = self_attn(self_attn_layer_norm(h))                    (dilated attention -> inner_attn_ln -> out_proj)
        h = h + drop_path(dropout(a))
        f = ffn.fc2(ffn.ffn_layernorm(gelu(ffn.fc1(final_layer_norm(h)))))
        h = h + drop_path(dropout(f))
    slide embedding = norm(mean(h[:, 1:]))                        (B, 768)

`encoder_states[11]` (what TRIDENT and the fine-tuning code use) is the output of the first 11 layers,
before the encoder's final `layer_norm` (return_all_hiddens collects the states before it); so the 12th
layer and `encoder.layer_norm` never enter the embedding. They are not built here, and their checkpoint
keys (`encoder.layers.11.*`, `encoder.layer_norm.*`) are dropped on load, as is a `pos_embed` entry (the
authors' is a non-persistent buffer, so their checkpoint has none). `embed_layer` (default 11) picks
another entry of `encoder_states`; the CLS token is built (its key loads) but, with global pooling, only
shapes the other tokens through attention (the authors' demo notes the CLS token is not trained).

Positions: the authors index a `slide_ngrids` x `slide_ngrids` (1000 x 1000) sin-cos table at
floor(coords / tile_size), row = x * 1000 + y, + 1 for the CLS row. Here `coords` are already grid
positions (column, row), so the index is floor(coords) directly. The table row of (x, y) is
[sin(y w), cos(y w), sin(x w), cos(x w)], w_k = 10000^(-k / 192), k = 0..191 (first half encodes the
row index y, second half the column x, as `np.meshgrid(grid_w, grid_h)` lays it out); it is computed on
the fly in float64 and rounded to float32 like the authors' table, instead of holding the authors'
(1e6 + 1) x 768 buffer (3 GB). A grid position outside [0, slide_ngrids) is a ConfigError (the authors'
lookup would alias y >= 1000 into the next column, wrap negative indices, and fail on x >= 1000).

Dilated attention (`dilated_attention`): for each branch (segment length w, dilation r), the sequence of
length L is cut into segments of s = min(w, L) tokens (the last zero-padded to s), each segment is
zero-padded to a multiple of r, and head j keeps the tokens whose position in the segment is
= j // ceil(H / r) (mod r) (heads padded to a multiple of r, as the authors' `dense_to_sparse`). Softmax
attention (scale head_dim^-0.5) runs within each (segment, head) over the kept tokens, zero-padded keys
included (flash attention gets no key mask: such a key scores 0 with value 0). Outputs and log-sum-exps
are scattered back (segment n at positions n * S .. n * S + S - 1, S the padded segment length, then
cut to L, as `sparse_to_dense` + `scattering`; a token a branch skips gets output 0 and lse -1e8, and
so does an lse of exactly 0, as the authors' masked_fill), and the branches are summed weighted by
softmax over branches of their lse, computed without gradient (the authors' `torch.no_grad()`). The
published branches are (1024, 1), (5792, 2), (32768, 4), (185363, 8), (1048576, 16) (segment lengths
from `get_optimal_segment_length(262144, 256)`: 2 ** linspace(10, 20, 5), truncated).

Padding: positions matter (segments are cut by sequence position; the model is not permutation
invariant, and the tile order is the caller's). The authors' forward has no padding mask (flash attention
ignores `key_padding_mask`), and the segmenting depends on each bag's own length (s = min(w, L)), so one
padded batch cannot reproduce it in a single pass. Here `mask` must mark a valid prefix (padding at the
end; otherwise ConfigError), and each layer's dilated attention runs once per distinct bag length on the
valid prefix only; every other step is token-wise. A padded bag therefore gives exactly the output of the
authors' model on the unpadded bag, and a batch equals each bag alone.

Departures: fp32 (or whatever dtype the module has) instead of the authors' fp16 autocast with flash
attention 2.5.8; plain torch einsum softmax attention (chunked over segments and heads to bound memory)
instead of flash-attn / xformers; batches with end padding (above). Dropout 0.25 and drop-path
linspace(0, 0.1, 12)[i] are `create_model`'s defaults, used in training mode only (the authors'
fine-tuning passes dropout 0.1 via `finetune/params.py`; override `dropout=`). Random init follows the
authors' final state: xavier-uniform Linear weights, zero biases, unit LayerNorms, cls_token N(0, 0.02)
(the subln rescaling in torchscale's Encoder is overwritten by LongNetViT's `initialize_vit_weights`).

Equivalence: compared once in float64 against the authors' LongNetViT at the commit above (their
`slide_encoder.py`, `pos_embed.py` and vendored torchscale run from a scratch folder, with a plain softmax
stand-in for `flash_attn_func` that returns the natural-log lse (B, H, L), no-op fairscale wrappers and
einops 0.8.2), this module's random weights (perturbed off the init) copied in, and the slide embedding
`model(x, coords_px, all_layer_embed=True)[embed_layer]` with coords_px = grid * 256 (+ a sub-tile offset)
compared to `encode(x, coords_px / 256)`: bags of 1-40 tiles and a batch of two, in four small configs
(the tiny one; 24-d, 6 heads, five branches (3, 5, 8, 16, 32) x (1, 2, 4, 8, 16), so head padding and
segments not a multiple of the dilation occur; 32-d, 16 heads, slide_ngrids 1000, (4, 6, 12, 24, 40) x
(1, 2, 4, 8, 16); 16-d, dilations (2, 3), embed_layer = depth). Max abs difference: 8.9e-16 (embeddings of
magnitude ~2). The authors' module built at published sizes on the meta device has 86,330,880 parameters,
and its state-dict keys are this module's plus the 22 dropped ones named above (20 of
`encoder.layers.11`, 2 of `encoder.layer_norm`). (With numpy >= 2 the authors'
`get_optimal_segment_length` string reads "[np.int64(1024), ...]" and their config's eval() needs `np` in
scope; this module takes the integers directly.)

Parameter count (published sizes): the authors' full module has 86,330,880 parameters (their notebook's
"Slide encoder param #"); this module, without layer 12 and `encoder.layer_norm`, has 79,233,792
(86,330,880 - 7,095,552 for one layer - 1,536); both counts measured on the meta device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from baselines.slide.base import SLIDE_ARCHS, SlideEncoder, config_kwargs, run_layer
from bench.common.errors import ConfigError

_NEG = -1e8  # the authors' log-sum-exp of a token a branch skips


def optimal_segment_lengths(max_wsi_size: int = 262144, tile_size: int = 256) -> tuple[int, ...]:
    """The authors' five segment lengths: 2 ** linspace(log2 1024, floor(log2 max_seq_len), 5), truncated,
    max_seq_len = (max_wsi_size // tile_size) ** 2 (LongNetViT.get_optimal_segment_length)."""
    max_seq_len = (max_wsi_size // tile_size) ** 2
    exponents = np.linspace(np.log2(1024), int(np.log2(max_seq_len)), 5)
    return tuple(int(v) for v in np.power(2, exponents).astype(int))


_CONFIGS: dict[str, dict[str, Any]] = {
    "published": {"in_dim": 1536, "embed_dim": 768, "depth": 12, "embed_layer": 11, "num_heads": 16,
                  "ffn_dim": 3072, "segment_lengths": optimal_segment_lengths(262144, 256),
                  "dilated_ratios": (1, 2, 4, 8, 16), "slide_ngrids": 1000, "dropout": 0.25,
                  "drop_path_rate": 0.1},
    "tiny": {"in_dim": 16, "embed_dim": 8, "depth": 3, "embed_layer": 2, "num_heads": 4, "ffn_dim": 12,
             "segment_lengths": (4, 8), "dilated_ratios": (1, 2), "slide_ngrids": 64, "dropout": 0.25,
             "drop_path_rate": 0.1},
}
_ATTN_CHUNK = 1 << 26  # score entries per attention chunk (256 MB in fp32)


def _attention_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.einsum("gqd,gkd->gqk", q, k) * scale
    lse = torch.logsumexp(scores, dim=-1)
    return torch.einsum("gqk,gkd->gqd", torch.exp(scores - lse[..., None]), v), lse


def _softmax_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                           checkpointed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention per group. q, k, v: (G, T, d); returns out (G, T, d) and lse (G, T) (natural log
    of the softmax normaliser of scale * q k^T), computed in chunks of groups to bound memory. With
    `checkpointed` (fine-tuning) each chunk's score matrices are recomputed in backward instead of kept,
    the memory flash-attn saves in the authors' code."""
    g, t, _ = q.shape
    step = max(1, _ATTN_CHUNK // max(1, t * t))
    outs, lses = [], []
    for i in range(0, g, step):
        out, lse = run_layer(checkpointed, _attention_chunk, q[i:i + step], k[i:i + step], v[i:i + step], scale)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def dilated_branch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_length: int,
                   dilated_ratio: int, checkpointed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One (segment length, dilation) branch of LongNet's dilated attention on unpadded sequences.

    q, k, v: (B, L, H, d). Returns out (B, L, H, d) and lse (B, L, H); a token the branch does not give to
    a head has out 0 and lse -1e8 there.
    """
    b, length, heads, dim = q.shape
    r = int(dilated_ratio)
    s = min(int(segment_length), length)
    n_seg = -(-length // s)
    seg_pad = -(-s // r) * r  # segment zero-padded to a multiple of r
    group = -(-heads // r)  # heads per offset (heads padded to a multiple of r)
    offsets = torch.arange(heads, device=q.device) // group  # (H,) head j keeps positions = j // group mod r
    head_idx = torch.arange(heads, device=q.device)

    def sparse(x: torch.Tensor) -> torch.Tensor:  # (B, L, H, d) -> (B * n_seg * H, seg_pad / r, d)
        x = F.pad(x, (0, 0, 0, 0, 0, n_seg * s - length)).view(b, n_seg, s, heads, dim)
        x = F.pad(x, (0, 0, 0, 0, 0, seg_pad - s)).view(b, n_seg, seg_pad // r, r, heads, dim)
        x = x[:, :, :, offsets, head_idx]  # (B, n_seg, seg_pad / r, H, d)
        return x.permute(0, 1, 3, 2, 4).reshape(b * n_seg * heads, seg_pad // r, dim)

    out, lse = _softmax_attention_lse(sparse(q), sparse(k), sparse(v), dim ** -0.5, checkpointed)
    out = out.view(b, n_seg, heads, seg_pad // r, dim).permute(0, 1, 3, 2, 4)  # (B, n_seg, S/r, H, d)
    lse = lse.view(b, n_seg, heads, seg_pad // r).permute(0, 1, 3, 2)  # (B, n_seg, S/r, H)
    onehot = torch.zeros(r, heads, dtype=torch.bool, device=q.device)
    onehot[offsets, head_idx] = True  # (r, H): position residue x head
    dense = out[:, :, :, None] * onehot[:, :, None].to(out.dtype)  # (B, n_seg, S/r, r, H, d)
    dense_lse = torch.where(onehot & (lse[:, :, :, None] != 0), lse[:, :, :, None], _NEG)
    dense = dense.reshape(b, n_seg * seg_pad, heads, dim)[:, :length]  # segment n at n * seg_pad, as the authors
    dense_lse = dense_lse.reshape(b, n_seg * seg_pad, heads)[:, :length]
    return dense, dense_lse


def combine_branches(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of branch outputs (B, L, H, d) weighted by softmax over branches of their lse (B, L, H), the
    weights taken without gradient as in the authors' `scattering`."""
    with torch.no_grad():
        weights = torch.softmax(torch.stack(list(lses)), dim=0)  # (n_branch, B, L, H)
    return sum(o * w[..., None].to(o.dtype) for o, w in zip(outs, weights))


def dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_lengths: Sequence[int],
                      dilated_ratios: Sequence[int], checkpointed: bool = False) -> torch.Tensor:
    """LongNet's dilated attention on unpadded sequences. q, k, v: (B, L, H, d) -> (B, L, H, d)."""
    if len(segment_lengths) != len(dilated_ratios) or not segment_lengths:
        raise ConfigError(f"dilated attention: segment_lengths {list(segment_lengths)} and dilated_ratios "
                          f"{list(dilated_ratios)} must be non-empty and of the same length")
    branches = [dilated_branch(q, k, v, w, r, checkpointed) for w, r in zip(segment_lengths, dilated_ratios)]
    return combine_branches([o for o, _ in branches], [lse for _, lse in branches])


class DilatedAttention(nn.Module):
    """Self-attention with LongNet's dilated branches, then `inner_attn_ln` and `out_proj` (subln)."""

    checkpoint_layers = False  # SlideEncoder.set_checkpointing: score matrices recomputed in backward

    def __init__(self, embed_dim: int, num_heads: int, segment_lengths: Sequence[int],
                 dilated_ratios: Sequence[int], eps: float = 1e-5) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ConfigError(f"gigapath-slide: embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.segment_lengths = tuple(int(w) for w in segment_lengths)
        self.dilated_ratios = tuple(int(r) for r in dilated_ratios)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.inner_attn_ln = nn.LayerNorm(embed_dim, eps=eps)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """x: (B, L, D); lengths: (B,) valid prefix lengths or None (all L). Rows past a bag's length
        come back 0 (before `out_proj`'s bias)."""
        b, length, dim = x.shape
        split = lambda t: t.view(b, length, self.num_heads, dim // self.num_heads)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        if lengths is None or bool((lengths == length).all()):
            attn = dilated_attention(q, k, v, self.segment_lengths, self.dilated_ratios, self.checkpoint_layers)
        else:  # one pass per distinct bag length, on the valid prefix: the authors' segmenting of that bag
            attn = q.new_zeros(q.shape)
            for n in torch.unique(lengths).tolist():
                idx = (lengths == n).nonzero(as_tuple=True)[0]
                attn[idx, :n] = dilated_attention(q[idx, :n], k[idx, :n], v[idx, :n],
                                                  self.segment_lengths, self.dilated_ratios, self.checkpoint_layers)
        return self.out_proj(self.inner_attn_ln(attn.reshape(b, length, dim)))


class FeedForwardNetwork(nn.Module):
    """fc1 -> GELU (in float32) -> ffn_layernorm -> fc2 -> dropout (torchscale's subln feed-forward)."""

    def __init__(self, embed_dim: int, ffn_dim: int, dropout: float, eps: float = 1e-5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)
        self.ffn_layernorm = nn.LayerNorm(ffn_dim, eps=eps)
        self.dropout_module = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = F.gelu(h.float()).type_as(h)  # the authors take GELU in float32 whatever the dtype
        return self.dropout_module(self.fc2(self.ffn_layernorm(h)))


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample: zero a bag's residual branch with probability p, else scale by 1/(1-p)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class EncoderLayer(nn.Module):
    """Pre-norm LongNet layer: x + attn(LN(x)), then x + ffn(LN(x)), each with dropout and drop-path."""

    def __init__(self, embed_dim: int, num_heads: int, ffn_dim: int, segment_lengths: Sequence[int],
                 dilated_ratios: Sequence[int], dropout: float, drop_path: float) -> None:
        super().__init__()
        self.self_attn = DilatedAttention(embed_dim, num_heads, segment_lengths, dilated_ratios)
        self.self_attn_layer_norm = nn.LayerNorm(embed_dim, eps=1e-5)
        self.dropout_module = nn.Dropout(dropout)
        self.drop_path = float(drop_path)
        self.ffn = FeedForwardNetwork(embed_dim, ffn_dim, dropout)
        self.final_layer_norm = nn.LayerNorm(embed_dim, eps=1e-5)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        a = self.dropout_module(self.self_attn(self.self_attn_layer_norm(x), lengths))
        x = x + _drop_path(a, self.drop_path, self.training)
        return x + _drop_path(self.ffn(self.final_layer_norm(x)), self.drop_path, self.training)


class LongNetEncoder(nn.Module):
    """The first `n_layers` of the authors' LongNet encoder (`encoder.layers.*`)."""

    checkpoint_layers = False  # SlideEncoder.set_checkpointing

    def __init__(self, n_layers: int, depth: int, embed_dim: int, num_heads: int, ffn_dim: int,
                 segment_lengths: Sequence[int], dilated_ratios: Sequence[int], dropout: float,
                 drop_path_rate: float) -> None:
        super().__init__()
        rates = np.linspace(0, drop_path_rate, depth) if drop_path_rate > 0 else np.zeros(depth)
        self.layers = nn.ModuleList(
            EncoderLayer(embed_dim, num_heads, ffn_dim, segment_lengths, dilated_ratios, dropout, float(rates[i]))
            for i in range(n_layers)
        )

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            x = run_layer(self.checkpoint_layers, layer, x, lengths)
        return x


class PatchEmbed(nn.Module):
    """Linear projection of the tile features (`patch_embed.proj`; the authors' norm is Identity)."""

    def __init__(self, in_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def sincos_grid_embedding(cells: torch.Tensor, dim: int) -> torch.Tensor:
    """The authors' 2D sin-cos table row for integer grid cells (..., 2) = (column x, row y) -> (..., dim):
    [sin(y w), cos(y w), sin(x w), cos(x w)], w_k = 10000^(-k / (dim / 4)); float64 rounded to float32."""
    if dim % 4:
        raise ConfigError(f"gigapath-slide: embed_dim {dim} must be a multiple of 4 for the 2D sin-cos table")
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64, device=cells.device) / quarter)
    parts = []
    for axis in (1, 0):  # first half: the row index (y), second half: the column (x)
        angle = cells[..., axis].to(torch.float64)[..., None] * omega
        parts += [torch.sin(angle), torch.cos(angle)]
    return torch.cat(parts, dim=-1).to(torch.float32)


class GigaPathSlide(SlideEncoder):
    """Prov-GigaPath's LongNetViT with global pooling; (B, N, in_dim) tile features + (B, N, 2) grid
    positions -> (B, embed_dim)."""

    uses_coords = True

    def __init__(self, in_dim: int = 1536, embed_dim: int = 768, depth: int = 12, embed_layer: int = 11,
                 num_heads: int = 16, ffn_dim: int = 3072,
                 segment_lengths: Sequence[int] = _CONFIGS["published"]["segment_lengths"],
                 dilated_ratios: Sequence[int] = (1, 2, 4, 8, 16), slide_ngrids: int = 1000,
                 dropout: float = 0.25, drop_path_rate: float = 0.1) -> None:
        super().__init__(in_dim, embed_dim)
        if not 1 <= embed_layer <= depth:
            raise ConfigError(f"gigapath-slide: embed_layer {embed_layer} must lie in 1..depth ({depth}); "
                              "the authors' slide embedding is encoder_states[11] of 12 layers")
        if len(segment_lengths) != len(dilated_ratios) or not segment_lengths:
            raise ConfigError(f"gigapath-slide: segment_lengths {list(segment_lengths)} and dilated_ratios "
                              f"{list(dilated_ratios)} must be non-empty and of the same length")
        self.depth, self.embed_layer, self.slide_ngrids = int(depth), int(embed_layer), int(slide_ngrids)
        self.patch_embed = PatchEmbed(in_dim, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dropout_module = nn.Dropout(dropout)  # Encoder.forward_embedding's dropout
        self.encoder = LongNetEncoder(embed_layer, depth, embed_dim, num_heads, ffn_dim, segment_lengths,
                                      dilated_ratios, dropout, drop_path_rate)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=0.02)

    def _lengths(self, mask: torch.Tensor | None, b: int, n: int, device: torch.device) -> torch.Tensor | None:
        if mask is None:
            return None
        if mask.shape != (b, n):
            raise ConfigError(f"gigapath-slide: mask shape {tuple(mask.shape)} does not match the bag ({b}, {n})")
        mask = mask.to(device=device, dtype=torch.bool)
        lengths = mask.sum(dim=1)
        if mask.device.type != "meta":
            prefix = torch.arange(n, device=device)[None, :] < lengths[:, None]
            if not bool((prefix == mask).all()):
                raise ConfigError("gigapath-slide: padding must sit at the end of each bag (mask = a valid prefix); "
                                  "LongNet cuts segments by sequence position, so put the valid tiles first")
            if bool((lengths == 0).any()):
                raise ConfigError("gigapath-slide: a bag in the batch has no valid tile (mask all False)")
        return lengths

    def positions(self, coords: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """coords (B, N, 2) grid positions (column, row) -> sin-cos embedding (B, N, embed_dim)."""
        cells = torch.floor(coords.to(torch.float64))
        if cells.device.type != "meta":
            inside = ((cells >= 0) & (cells < self.slide_ngrids)).all(dim=-1)
            if valid is not None:
                inside = inside | ~valid
            if not bool(inside.all()):
                bad = cells[~inside][0].tolist()
                raise ConfigError(f"gigapath-slide: grid position {bad} lies outside the authors' "
                                  f"{self.slide_ngrids} x {self.slide_ngrids} position table (0..{self.slide_ngrids - 1}); "
                                  "coords must be patch-grid positions (level-0 pixels / the patch's level-0 side)")
        return sincos_grid_embedding(cells, self.embed_dim)

    def encode(self, x: torch.Tensor, coords: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, _ = x.shape
        if coords is None or coords.shape != (b, n, 2):
            raise ConfigError(f"gigapath-slide: coords must be (B, N, 2) grid positions for x of shape "
                              f"{tuple(x.shape)}, got {None if coords is None else tuple(coords.shape)}")
        lengths = self._lengths(mask, b, n, x.device)
        valid = None if lengths is None else torch.arange(n, device=x.device)[None, :] < lengths[:, None]
        h = self.patch_embed(x) + self.positions(coords, valid).to(x.dtype)
        if valid is not None:
            h = h.masked_fill(~valid[..., None], 0.0)
        h = torch.cat([self.cls_token.expand(b, -1, -1).to(h.dtype), h], dim=1)  # CLS row of the table is 0
        if x.device.type == "meta":  # no per-length passes on the meta device (shapes only)
            lengths = None
        h = self.encoder(self.dropout_module(h), None if lengths is None else lengths + 1)
        tokens = h[:, 1:]
        if valid is None:
            pooled = tokens.mean(dim=1)
        else:
            weight = valid[..., None].to(tokens.dtype)
            pooled = (tokens * weight).sum(dim=1) / weight.sum(dim=1)
        return self.norm(pooled)

    def load_published(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load `slide_encoder.pth`'s "model" dict (or the dict holding it); drops the layers after
        `embed_layer`, `encoder.layer_norm` and any `pos_embed`, which the embedding does not use."""
        if "model" in state_dict and isinstance(state_dict["model"], Mapping):
            state_dict = state_dict["model"]
        unused = tuple(f"encoder.layers.{i}." for i in range(self.embed_layer, self.depth))
        unused += ("encoder.layer_norm.",)
        super().load_published({k: v for k, v in state_dict.items() if k != "pos_embed" and not k.startswith(unused)})


@SLIDE_ARCHS.decorator("gigapath-slide")
def build_gigapath_slide(config: str = "published", **overrides: Any) -> SlideEncoder:
    """Prov-GigaPath's slide encoder on GigaPath tile features (1536-d in, 768-d out)."""
    return GigaPathSlide(**config_kwargs("gigapath-slide", _CONFIGS, config, overrides))


__all__ = ["GigaPathSlide", "build_gigapath_slide", "dilated_attention", "dilated_branch", "combine_branches",
           "optimal_segment_lengths", "sincos_grid_embedding"]
