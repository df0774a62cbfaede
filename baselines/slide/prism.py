"""PRISM's slide aggregator (registry name `prism`): a Perceiver resampler over Virchow tile embeddings.

PRISM (Shaikovski et al., 2024) is a CoCa-style vision-language model; its slide encoder is a
Perceiver whose 1 + 512 learned latents cross-attend to the tile embeddings (Virchow class token
concatenated with the mean patch token, 2560-d). The first latent, layer-normed, is the 1280-d
`image_embedding`; the other 512 are the `image_latents` the text decoder reads.

Source (read, not copied): the paige-ai/Prism Hub remote code (`perceiver.py`, `configuring_prism.py`,
`modeling_prism.py`, `config.json`), as vendored in DIAGNijmegen/unicorn_baseline at commit
dec380918e3bc344c403d85a69960befa76ad473 (`src/unicorn_baseline/vision_language/prism/`); the
published `perceiver_config` is latent_seq 512, latent_dim 1280, context_dim 2560, mhsa_heads 8,
perceiver_depth 8, transformer_depth 6, share_xattn_start_layer 1, share_tf_start_layer 0,
xattn_heads 1, mlp_mult 1, mlp_activation geglu. TRIDENT (mahmoodlab/TRIDENT a91fa84,
`trident/slide_encoder_models/load.py`, PRISMSlideEncoder) sets `text_decoder = None` and returns
`slide_representations(x)['image_embedding']`, 1280-d, fp16.

Architecture (module names follow the authors' `image_resampler`, so checkpoint keys load after
dropping that prefix)::

    latents (513, 1280)
    for layer i in 0..7:
        latents += xattn(LN(latents), tiles)      # single-head cross-attention, no bias, no context norm
        latents += ff(latents)                    # LN -> Linear(1280, 2560) -> GEGLU -> Linear(1280, 1280)
        for j in 0..5:                            # latent self-attention block
            latents += mhsa(LN(latents)); latents += ff(latents)
    image_embedding = cls_norm(latents[:, 0])                                   (B, 1280)

Weight sharing as in the authors' code: layers 0 and 1 have their own cross-attention blocks and
layers 2-7 reuse layer 1's; all 8 layers reuse layer 0's self-attention stack. The same module
object sits under every alias, so `state_dict()` lists each alias (as the authors' does) and
`load_published` accepts a checkpoint holding any one of them (a Hub save may keep only one copy of
a shared tensor); aliases given twice must be equal.

Left out: the BioGPT text decoder, the contrastive projections (`img_to_latents`, `text_to_latents`)
and `temperature`; they do not enter `image_embedding`, and their checkpoint keys are dropped on
load. `image_latents` (`img_norm` of latents 1..512) is kept as `forward_latents` for completeness, and
`attention()` gives the image-embedding latent's last cross-attention over the tiles (for heatmaps).

Departures: plain `F.scaled_dot_product_attention` with whichever kernel torch picks (the authors
force its math kernel, or use xformers' memory-efficient attention behind PERCEIVER_MEM_EFF_ATTN;
all compute the same softmax attention). The mask here is boolean (True = valid) and padded tiles get zero weight. The authors' docstring
suggests a float 0/1 `tile_mask`; `scaled_dot_product_attention` adds a float mask to the scores
instead of masking, so with that mask padded tiles would still be attended (weight e^-1 relative to
valid ones); this module does not reproduce that. `mask=None` means every tile is valid for any
batch size (the authors refuse `tile_mask=None` when the batch has more than one slide).

Parameter count (published sizes): 99,037,440 (shared modules counted once; derived from the config:
no card states the encoder's own count; the card's 558M is the whole vision-language model).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from baselines.layers import masked_softmax
from baselines.slide.base import SLIDE_ARCHS, SlideEncoder, config_kwargs, run_layer
from baselines.slide.feather import drop_prefixed
from bench.common.errors import ConfigError

_CONFIGS: dict[str, dict[str, Any]] = {
    "published": {"in_dim": 2560, "latent_seq": 512, "latent_dim": 1280, "mhsa_heads": 8, "perceiver_depth": 8,
                  "transformer_depth": 6, "share_xattn_start_layer": 1, "share_tf_start_layer": 0,
                  "xattn_heads": 1, "mlp_mult": 1},
    "tiny": {"in_dim": 16, "latent_seq": 3, "latent_dim": 8, "mhsa_heads": 2, "perceiver_depth": 3,
             "transformer_depth": 2, "share_xattn_start_layer": 1, "share_tf_start_layer": 0,
             "xattn_heads": 1, "mlp_mult": 1},
}
# checkpoint entries outside the slide encoder (text decoder, contrastive head)
_NOT_IMAGE = ("text_decoder.", "img_to_latents.", "text_to_latents.", "temperature")


class CrossAttention(nn.Module):
    """Latent queries attend to the tiles; pre-norm on the queries only, no biases."""

    def __init__(self, query_dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = query_dim // heads
        inner = self.head_dim * heads
        self.x_norm = nn.LayerNorm(query_dim)
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, query_dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None,
                record: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Updated queries (B, M, query_dim), and with `record` the first query's attention over the
        tiles, averaged over heads (B, N); else None."""
        b, m, _ = x.shape
        n = context.shape[1]
        q = self.to_q(self.x_norm(x)).view(b, m, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.to_kv(context).view(b, n, 2, self.heads, self.head_dim).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, N, head_dim)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, N) bool, True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        weights = None
        if record:  # one extra (1 x N) score row per head: the image-embedding latent's weights
            scores = (q[:, :, :1] @ k.transpose(-2, -1)).squeeze(2) * self.head_dim ** -0.5  # (B, heads, N)
            weights = masked_softmax(scores, None if mask is None else mask[:, None, :]).mean(dim=1)
        return self.to_out(out.transpose(1, 2).reshape(b, m, -1)), weights


class GEGLU(nn.Module):
    """Half the features gated by GELU of the other half."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = x.chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """Pre-norm GEGLU MLP (`net.0`, `net.2` as in the authors' Sequential; dropout 0 is left out)."""

    def __init__(self, dim: int, mult: int = 1) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.net = nn.Sequential(nn.Linear(dim, 2 * dim * mult), GEGLU(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(x))


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention over the latents, without biases (`mha` as in the authors')."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mha = nn.MultiheadAttention(dim, heads, bias=False, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.mha(x, x, x, need_weights=False)[0]


class Perceiver(nn.Module):
    """Learned latents refined by (shared) cross-attention and self-attention blocks."""

    checkpoint_layers = False  # SlideEncoder.set_checkpointing: each layer's cross-attention over the tiles

    def __init__(self, latent_seq: int, latent_dim: int, context_dim: int, mhsa_heads: int, perceiver_depth: int,
                 transformer_depth: int, share_xattn_start_layer: int, share_tf_start_layer: int,
                 xattn_heads: int, mlp_mult: int) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(latent_seq, latent_dim))
        layers: list[nn.ModuleDict] = []
        for i in range(perceiver_depth):
            if i <= share_xattn_start_layer:
                xattn = nn.ModuleDict({"xattn": CrossAttention(latent_dim, context_dim, xattn_heads),
                                       "ff": FeedForward(latent_dim, mlp_mult)})
            else:
                xattn = layers[-1]["xattn"]
            if i <= share_tf_start_layer:
                tf = nn.ModuleList(nn.ModuleDict({"mhsa": SelfAttention(latent_dim, mhsa_heads),
                                                  "ff": FeedForward(latent_dim, mlp_mult)})
                                   for _ in range(transformer_depth))
            else:
                tf = layers[-1]["tf"]
            layers.append(nn.ModuleDict({"xattn": xattn, "tf": tf}))
        self.layers = nn.ModuleList(layers)

    def forward(self, context: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Final latents (B, latent_seq, latent_dim) and the first latent's last cross-attention (B, N)."""
        # a copy, not an expand() view: a view of a parameter made under no_grad still says requires_grad with no
        # grad_fn, which breaks torch's module tracker (FLOP counting)
        x = self.latents.unsqueeze(0).repeat(context.shape[0], 1, 1)  # (B, latent_seq, latent_dim)
        last = len(self.layers) - 1
        weights = None
        for i, layer in enumerate(self.layers):
            # the authors reuse the previous layer's keys/values where W_kv is shared; recomputing
            # them from the unchanged context gives the same values
            out, w = run_layer(self.checkpoint_layers, layer["xattn"]["xattn"], x, context, mask, i == last)
            weights = w if w is not None else weights
            x = out + x
            x = layer["xattn"]["ff"](x) + x
            for block in layer["tf"]:
                x = block["mhsa"](x) + x
                x = block["ff"](x) + x
        assert weights is not None
        return x, weights


class Prism(SlideEncoder):
    """PRISM's Perceiver resampler; (B, N, 2560) Virchow tile embeddings -> (B, 1280) image embedding."""

    uses_coords = False

    def __init__(self, in_dim: int = 2560, latent_seq: int = 512, latent_dim: int = 1280, mhsa_heads: int = 8,
                 perceiver_depth: int = 8, transformer_depth: int = 6, share_xattn_start_layer: int = 1,
                 share_tf_start_layer: int = 0, xattn_heads: int = 1, mlp_mult: int = 1) -> None:
        super().__init__(in_dim, embed_dim=latent_dim)
        for name, value in (("latent_dim", latent_dim), ("xattn_heads", xattn_heads)):
            if value <= 0:
                raise ConfigError(f"PRISM: {name} must be positive, got {value}")
        if latent_dim % xattn_heads or latent_dim % mhsa_heads:
            raise ConfigError(f"PRISM: latent_dim {latent_dim} must divide by xattn_heads {xattn_heads} "
                              f"and mhsa_heads {mhsa_heads}")
        self.cls_norm = nn.LayerNorm(latent_dim)
        self.img_norm = nn.LayerNorm(latent_dim)
        # +1 latent for the image embedding, as in the authors' PerceiverResampler
        self.perceiver = Perceiver(latent_seq + 1, latent_dim, in_dim, mhsa_heads, perceiver_depth,
                                   transformer_depth, share_xattn_start_layer, share_tf_start_layer,
                                   xattn_heads, mlp_mult)
        self._attention: torch.Tensor | None = None

    def forward_latents(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The authors' `slide_representations`: image_embedding (B, D) and image_latents (B, latent_seq, D)."""
        out, weights = self.perceiver(x, mask)
        self._attention = weights.detach()
        return {"image_embedding": self.cls_norm(out[:, 0]), "image_latents": self.img_norm(out[:, 1:])}

    def encode(self, x: torch.Tensor, coords: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        out, weights = self.perceiver(x, mask)
        self._attention = weights.detach()
        return self.cls_norm(out[:, 0])

    def attention(self) -> torch.Tensor | None:
        """(B, N): the image-embedding latent's cross-attention over the tiles in the last layer (mean of
        heads; one head in the published config). Not a quantity the authors return; for heatmaps."""
        return self._attention

    def key_map(self) -> Mapping[str, str]:
        return {"image_resampler.": ""}

    def load_published(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load PRISM's checkpoint; each shared tensor needs one of its aliases (equal values if several)."""
        renamed = {}
        for key, value in drop_prefixed(state_dict, _NOT_IMAGE).items():
            renamed[key[len("image_resampler."):] if key.startswith("image_resampler.") else key] = value
        for group in self._alias_groups():
            given = [k for k in group if k in renamed]
            if not given:
                continue  # reported as missing by the strict load below
            first = renamed[given[0]]
            for other in given[1:]:
                if renamed[other].shape != first.shape or not torch.equal(renamed[other], first):
                    raise ConfigError(f"PRISM: the checkpoint gives different values for the shared tensor "
                                      f"{given[0]!r} and its alias {other!r}")
            for alias in group:
                renamed.setdefault(alias, first)
        super().load_published(renamed)

    def _alias_groups(self) -> list[list[str]]:
        """State-dict keys grouped by the tensor they name (groups of size > 1 are shared weights)."""
        groups: dict[int, list[str]] = {}
        for key, tensor in self.state_dict(keep_vars=True).items():
            groups.setdefault(id(tensor), []).append(key)
        return [keys for keys in groups.values() if len(keys) > 1]


@SLIDE_ARCHS.decorator("prism")
def build_prism(config: str = "published", **overrides: Any) -> SlideEncoder:
    """PRISM's slide encoder on Virchow features (2560-d in, 1280-d out)."""
    return Prism(**config_kwargs("prism", _CONFIGS, config, overrides))


__all__ = ["Prism", "build_prism"]
