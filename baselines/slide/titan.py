"""TITAN's slide (vision) encoder (registry name `titan`): a ViT with 2D ALiBi over the CONCH v1.5 feature grid.

TITAN (Ding et al., 2024) encodes a whole slide from CONCH v1.5 patch features (768-d, 512-px patches at
20x). The patches are placed on a 2D grid by their level-0 coordinates; each occupied grid cell becomes
one token, a learned CLS token is prepended, and a 6-layer pre-norm ViT attends over the tokens with a
2D ALiBi bias (minus a per-head slope times the Euclidean distance between grid cells; zero for the CLS
row and column). The slide embedding, as `encode_slide_from_patch_features` returns it (`no_proj=True`),
is the output of the single-query attentional pooler `attn_pool_contrastive` over all final tokens
(CLS included), 768-d.

Source (read, not copied): the MahmoodLab/TITAN Hub remote code (`modeling_titan.py`,
`vision_transformer.py`, `configuration_titan.py`, `config.json`), as vendored in
DIAGNijmegen/unicorn_baseline at commit dec380918e3bc344c403d85a69960befa76ad473
(`src/unicorn_baseline/vision/pathology/titan/`): `preprocess_features` (grid placement),
`VisionTransformer.forward_features` / `get_alibi` / `forward`, `Attention`, `Block`, `AttentionalPooler`,
`build_vision_tower`. The Hub's earlier `modeling_titan.py` (in the code index, repository not named)
also builds `text_encoder` and applies `vision_encoder.proj` only in `zero_shot`; its
`encode_slide_from_patch_features` is the same call (`vision_encoder(..., no_proj=True)`).
Published `vision_config` (config.json): embed_dim 768, depth 6, num_heads 12, mlp_ratio 4.0,
qkv_bias true, mlp_patch_embed_dim 768, pos_encode_type "alibi", global_pool "token",
attentional_pool "parallel" (also forced by TitanConfig), attn_pooler_queries 128, attn_pooler_heads 8;
no dropout, no drop-path, no layer scale, no qk-norm, LayerNorm eps 1e-6 in the blocks and the final
norm, eps 1e-5 (torch's default) in the poolers' ln_q / ln_k.

Forward, for one slide (the authors' B == 1 evaluation path)::

    cell  = floor((coords - min coords) / patch_size_lv0)            # (N, 2) integer grid cells
    grid  = sum of the features of the patches in each cell           # index_add_, so duplicates add up
    cells kept: those whose summed feature vector is not all zero     # the authors' bg_mask
    tokens = [cls_token] + GELU(Linear(768, 768)(grid[kept]))         # (1 + M, 768), row-major cell order
    bias[h, i, j] = -slope_h * ||cell_i - cell_j||_2, 0 on the CLS row and column   # (12, 1+M, 1+M)
    6 x (x += proj(softmax(q k^T / sqrt(64) + bias) v) of LN(x);  x += fc2(GELU(fc1(LN(x)))))
    x = norm(x)
    embedding = MHA(ln_q(query), ln_k(x), ln_k(x))                    # 1 query, 8 heads -> (768,)

The ALiBi slopes are the standard ones (Press et al.) for 12 heads: 2^-1 ... 2^-8, then 2^-0.5, 2^-1.5,
2^-2.5, 2^-3.5.

Coordinates: the harness passes grid positions (column, row) = level-0 pixel coordinates / patch
level-0 side. The authors' cell, floor((x - x_min) / side), is floor(g - g_min) of those; a tolerance of
1e-4 grid units absorbs the round-off of the division (so 2.99999 is cell 3). Column is the authors'
first coordinate (h5 `coords[:, 0]` = x).

Left out: the 128-query `attn_pool` (CoCa's token pooler for the text side; with "parallel" pooling the
slide embedding never reads it), `proj` (the contrastive projection, applied only for zero-shot, not by
`encode_slide_from_patch_features`), the text tower, and the training-only paths (iBOT masked
modelling, the cached 6x6 / 14x14 ALiBi tensors of batched crops, absolute position embeddings).
Their checkpoint keys (`vision_encoder.attn_pool.*`, `vision_encoder.proj`, `text_encoder.*`) are
dropped on load; `vision_encoder.` is stripped from the rest, which load with the authors' names
(`patch_embed.0`, `cls_token`, `blocks.modules_list.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`,
`norm`, `attn_pool_contrastive.{query,attn.in_proj_*,attn.out_proj.*,ln_q,ln_k}`).

Departures: the authors encode one slide per call (B == 1; their B > 1 path is for fixed-size training
crops with a shared grid); this module takes a padded batch (B, N, D) with a mask (True = valid),
builds each slide's tokens separately, pads the token sequences and masks padded keys with -inf in the
blocks and the pooler, so a slide's embedding does not depend on its batch or its padding. The ALiBi
bias is computed in the input's dtype (the authors build it in float32 and cast it); float64 inputs
therefore get a float64 bias. The grid of cell features is built in the features' dtype (the authors'
is `torch.zeros` in the default dtype, float32, whose `index_add_` refuses fp16 features). TRIDENT
(encoders.toml's source_note) and the Hub card's example run TITAN under fp16 autocast; this module runs
in whatever dtype it is given (fp32 by default). Grid coordinates come in as the harness's
(column, row) grid positions instead of level-0 pixels plus `patch_size_lv0` (see above).

Equivalence (measured once, not a test): the authors' `VisionTransformer` (the vendored file above, run
from a throw-away folder with stub `einops.repeat` and `transformers.PretrainedConfig` modules and the
venv's timm 1.0.31 for `Mlp`), with this module's random weights copied in (random `attn_pool` / `proj`
added), in float64, on slides of 40-300 patches on irregular grids (holes, one duplicate cell, one
all-zero patch; level-0 coordinates = grid * 512 + 37, patch_size_lv0 512): max abs difference
1.8e-15 (12 slides, dim 24, depth 2, 3 heads, 2 pooler heads) and 8.3e-17 (2 slides, published sizes)
with their ALiBi tensor built in float64 (their `get_alibi` with float32 -> float64 in its two
`torch.tensor` calls); 9.9e-11 and 5.9e-12 with their file unchanged (the float32 rounding of their bias).

Parameter count (published sizes): 45,486,336 for this module (patch embed 590,592; 6 blocks of
7,087,872; final norm 1,536; contrastive pooler 2,366,208; CLS 768). The authors' vision tower
(`build_vision_tower` of the published config, counted) has 48,539,904: the 128-query `attn_pool`
(2,463,744) and `proj` (589,824) on top. No card states the slide encoder's own count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from baselines.slide.base import SLIDE_ARCHS, SlideEncoder, config_kwargs, run_layer
from baselines.slide.feather import drop_prefixed
from bench.common.errors import ConfigError

_CONFIGS: dict[str, dict[str, Any]] = {
    "published": {"in_dim": 768, "embed_dim": 768, "depth": 6, "num_heads": 12, "mlp_ratio": 4.0,
                  "qkv_bias": True, "attn_pooler_heads": 8},  # the Hub config.json vision_config
    "tiny": {"in_dim": 16, "embed_dim": 12, "depth": 2, "num_heads": 3, "mlp_ratio": 2.0,
             "qkv_bias": True, "attn_pooler_heads": 2},  # 3 heads: the non-power-of-two slope rule
}
# checkpoint entries that do not enter the slide embedding (prefixes after `vision_encoder.` is stripped;
# "attn_pool." does not match "attn_pool_contrastive.")
_NOT_EMBEDDING = ("text_encoder.", "attn_pool.")
_NOT_EMBEDDING_KEYS = ("proj",)
_CELL_TOLERANCE = 1e-4  # grid units: floor(g - g_min + tol) absorbs round-off of pixel / side


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi's per-head slopes: a geometric series from 2^(-8/n) for n a power of two; otherwise the
    slopes of the largest power of two below n, then every other slope of twice that number."""
    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    base = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(base) + alibi_slopes(2 * base)[0::2][: num_heads - base]


def alibi_bias(cells: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """2D ALiBi bias with a leading CLS token.

    cells: (B, M, 2) grid positions; slopes: (H,). Returns (B, H, 1 + M, 1 + M) with
    bias[b, h, i, j] = -slopes[h] * ||cells[b, i-1] - cells[b, j-1]|| for i, j >= 1 and 0 on row / column 0.
    """
    b, m, _ = cells.shape
    c = cells.to(torch.float64)
    dist = ((c[:, :, None, 0] - c[:, None, :, 0]) ** 2 + (c[:, :, None, 1] - c[:, None, :, 1]) ** 2).sqrt()
    dist = dist.to(slopes.dtype)  # (B, M, M)
    bias = slopes.new_zeros(b, slopes.numel(), m + 1, m + 1)
    bias[:, :, 1:, 1:] = dist[:, None] * -slopes.view(1, -1, 1, 1)
    return bias


class Attention(nn.Module):
    """Multi-head self-attention with an additive bias (`qkv`, `proj` as in the authors' Attention)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x: (B, T, dim); bias: (B, H, T, T) additive (-inf at padded keys)."""
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, T, head_dim)
        return self.proj(out.transpose(1, 2).reshape(b, t, c))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (timm's Mlp names)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x += attn(norm1(x)); x += mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), bias)
        return x + self.mlp(self.norm2(x))


class Blocks(nn.Module):
    """The block stack under `modules_list`, the name of the authors' CustomSequential."""

    checkpoint_layers = False  # SlideEncoder.set_checkpointing

    def __init__(self, blocks: list[Block]) -> None:
        super().__init__()
        self.modules_list = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        for block in self.modules_list:
            x = run_layer(self.checkpoint_layers, block, x, bias)
        return x


class AttentionalPooler(nn.Module):
    """Learned queries attend to layer-normed tokens (`query`, `attn`, `ln_q`, `ln_k` as the authors')."""

    def __init__(self, dim: int, n_head: int, n_queries: int = 1) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, dim))
        self.attn = nn.MultiheadAttention(dim, n_head, kdim=dim, vdim=dim)
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, dim); valid: (B, T) bool. Pooled (B, n_queries, dim) and the queries' attention over
        the tokens averaged over heads (B, n_queries, T), zero at padded tokens."""
        k = self.ln_k(x).transpose(0, 1)  # (T, B, dim): the module is sequence-first, as the authors'
        q = self.ln_q(self.query).unsqueeze(1).expand(-1, x.shape[0], -1)  # (n_queries, B, dim)
        out, weights = self.attn(q, k, k, key_padding_mask=~valid, need_weights=True, average_attn_weights=True)
        return out.transpose(0, 1), weights


class Titan(SlideEncoder):
    """TITAN's slide encoder; (B, N, 768) CONCH v1.5 features + (B, N, 2) grid positions -> (B, 768)."""

    uses_coords = True

    def __init__(self, in_dim: int = 768, embed_dim: int = 768, depth: int = 6, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, attn_pooler_heads: int = 8) -> None:
        super().__init__(in_dim, embed_dim)
        for name, value in (("in_dim", in_dim), ("embed_dim", embed_dim), ("depth", depth),
                            ("num_heads", num_heads), ("attn_pooler_heads", attn_pooler_heads)):
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"TITAN: {name} must be a positive integer, got {value!r}")
        if embed_dim % num_heads or embed_dim % attn_pooler_heads:
            raise ConfigError(f"TITAN: embed_dim {embed_dim} must divide by num_heads {num_heads} and "
                              f"attn_pooler_heads {attn_pooler_heads}")
        if mlp_ratio <= 0:
            raise ConfigError(f"TITAN: mlp_ratio must be positive, got {mlp_ratio!r}")
        self.num_heads = num_heads
        self.patch_embed = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.GELU())
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = Blocks([Block(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.attn_pool_contrastive = AttentionalPooler(embed_dim, attn_pooler_heads, n_queries=1)
        self.register_buffer("slopes", torch.tensor(alibi_slopes(num_heads), dtype=torch.float64), persistent=False)
        self._attention: torch.Tensor | None = None
        self._init_weights()

    def _init_weights(self) -> None:
        """The authors' init (timm's ViT init, mode ''): truncated-normal(0.02) Linear weights and zero
        biases in the patch embedding and the blocks, CLS ~ N(0, 1e-6); the pooler keeps torch's default
        init and a standard-normal query (it is built after their init_weights)."""
        for module in (self.patch_embed, self.blocks):
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=1e-6)

    # ---- grid placement ---------------------------------------------------------------------------

    def _check(self, x: torch.Tensor, coords: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Validate the inputs; return the (B, N) bool mask (all True when `mask` is None)."""
        if x.dim() != 3 or x.shape[-1] != self.in_dim:
            raise ConfigError(f"TITAN: features must be (B, N, {self.in_dim}), got {tuple(x.shape)}")
        if coords.shape != (*x.shape[:2], 2):
            raise ConfigError(f"TITAN: coords must be (B, N, 2) = {(*x.shape[:2], 2)} grid positions, "
                              f"got {tuple(coords.shape)}")
        if mask is None:
            return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if mask.shape != x.shape[:2] or mask.dtype != torch.bool:
            raise ConfigError(f"TITAN: mask must be a (B, N) = {tuple(x.shape[:2])} bool tensor (True = valid), "
                              f"got {tuple(mask.shape)} {mask.dtype}")
        return mask

    def _place(self, x: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One slide's grid tokens (the authors' preprocess_features + bg_mask selection).

        x: (N, D); coords: (N, 2) grid positions; valid: (N,) bool. Returns the summed features of the
        occupied cells (M, D) in row-major cell order, their cells (M, 2), and for each of the N patches
        its token index, or -1 (padded, or in a cell whose features sum to zero).
        """
        idx = valid.nonzero().squeeze(1)
        if idx.numel() == 0:
            raise ConfigError("TITAN: a slide in the batch has no valid patch (its mask is all False)")
        g = coords[idx].to(torch.float64)
        if not torch.isfinite(g).all():
            raise ConfigError("TITAN: coords of valid patches must be finite grid positions, got NaN or inf")
        cell = torch.floor(g - g.min(dim=0).values + _CELL_TOLERANCE).long()  # (n, 2)
        width = int(cell[:, 1].max()) + 1
        linear = cell[:, 0] * width + cell[:, 1]
        uniq, inverse = torch.unique(linear, sorted=True, return_inverse=True)  # row-major, as the authors'
        grid = x.new_zeros(uniq.numel(), x.shape[-1]).index_add_(0, inverse, x[idx])  # duplicates add up
        occupied = grid.ne(0).any(dim=-1)  # the authors' bg_mask: all-zero cells are background
        token_of_cell = torch.cumsum(occupied.long(), 0) - 1
        token_of_cell[~occupied] = -1
        token_of_patch = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        token_of_patch[idx] = token_of_cell[inverse]
        kept = uniq[occupied]
        cells = torch.stack([kept // width, kept % width], dim=1)
        return grid[occupied], cells, token_of_patch

    # ---- forward ----------------------------------------------------------------------------------

    def encode(self, x: torch.Tensor, coords: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        assert coords is not None  # SlideEncoder.forward refuses None
        valid_patch = self._check(x, coords, mask)
        placed = [self._place(x[b], coords[b], valid_patch[b]) for b in range(x.shape[0])]
        m = max(p[0].shape[0] for p in placed)
        b = x.shape[0]
        grid = x.new_zeros(b, m, self.in_dim)  # (B, M, D) cell features, padded
        cells = torch.zeros(b, m, 2, dtype=torch.long, device=x.device)
        valid = torch.zeros(b, m + 1, dtype=torch.bool, device=x.device)  # (B, 1 + M), CLS first
        valid[:, 0] = True
        for i, (feats, pos, _) in enumerate(placed):
            grid[i, : feats.shape[0]] = feats
            cells[i, : pos.shape[0]] = pos
            valid[i, 1 : 1 + feats.shape[0]] = True

        tokens = torch.cat([self.cls_token.expand(b, -1, -1), self.patch_embed(grid)], dim=1)
        bias = alibi_bias(cells, self.slopes.to(tokens.dtype))  # (B, H, 1 + M, 1 + M)
        bias = bias.masked_fill(~valid[:, None, None, :], float("-inf"))  # padded keys get no weight
        tokens = self.norm(self.blocks(tokens, bias))
        pooled, weights = self.attn_pool_contrastive(tokens, valid)  # (B, 1, E), (B, 1, 1 + M)

        scores = weights[:, 0, 1:].detach()  # (B, M): the pooling query's weight on each cell token
        attention = x.new_zeros(x.shape[:2])
        for i, (_, _, token_of_patch) in enumerate(placed):
            has = token_of_patch >= 0
            tokens_of = token_of_patch[has]
            share = torch.bincount(tokens_of, minlength=scores.shape[1]).clamp(min=1)[tokens_of]
            attention[i, has] = (scores[i, tokens_of] / share).to(x.dtype)  # a cell's weight split among its patches
        total = attention.sum(dim=1, keepdim=True)
        self._attention = torch.where(total > 0, attention / total.clamp(min=torch.finfo(x.dtype).tiny), attention)
        return pooled[:, 0]

    def attention(self) -> torch.Tensor | None:
        """(B, N) of the last forward: the weight the embedding's pooling query (attn_pool_contrastive,
        mean of its heads) gives each patch's grid-cell token, split evenly among the patches sharing a
        cell; padded patches and all-zero cells get 0. The pooling query's weight on the CLS token is
        left out and each row renormalised to sum to 1 over the patches (the harness's heatmaps take
        attention as a distribution over a bag's patches)."""
        return self._attention

    def key_map(self) -> Mapping[str, str]:
        return {"vision_encoder.": ""}

    def load_published(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load the Hub checkpoint (`vision_encoder.*`, `text_encoder.*`); the text tower, the 128-query
        `attn_pool` and `proj` are dropped, the rest must match exactly."""
        stripped = {k.removeprefix("vision_encoder."): v for k, v in state_dict.items()}
        kept = {k: v for k, v in drop_prefixed(stripped, _NOT_EMBEDDING).items() if k not in _NOT_EMBEDDING_KEYS}
        super().load_published(kept)


@SLIDE_ARCHS.decorator("titan")
def build_titan(config: str = "published", **overrides: Any) -> SlideEncoder:
    """TITAN's slide encoder on CONCH v1.5 features (768-d in, 768-d out); needs the patch grid positions."""
    return Titan(**config_kwargs("titan", _CONFIGS, config, overrides))


__all__ = ["Titan", "alibi_bias", "alibi_slopes", "build_titan"]
