"""FEATHER: MahmoodLab's supervised ABMIL slide encoder (registry names `feather`, `feather-uni2`).

FEATHER-24K is a gated-attention ABMIL pretrained on a 108-way pan-cancer classification task
(PC-108, 24K slides) and released without its classification head; its slide embedding is the
attention-pooled 512-d bag feature (`forward_features` in the authors' code).

Source (read, not copied): MahmoodLab/MIL-Lab at commit dfc3c17ca6876a8f9bd33a9162c40f2c22631d9d,
`src/models/abmil.py` (ABMIL, ABMILModel), `src/models/layers.py` (create_mlp,
GlobalGatedAttention), `src/model_configs/abmil/base.yaml` (embed_dim 512, attn_dim 384,
num_fc_layers 1, dropout 0.25, gate True) and `src/_global_mappings.py` (in_dim 768 for CONCH v1.5,
1536 for UNI2-h). TRIDENT (mahmoodlab/TRIDENT a91fa84, `trident/slide_encoder_models/load.py`,
FeatherSlideEncoder / FeatherUni2SlideEncoder) loads the Hub repos
`MahmoodLab/abmil.base.conch_v15.pc108-24k` and `MahmoodLab/abmil.base.uni_v2.pc108-24k` and returns
`forward_features(x)[0]`, 512-d, fp32.

Architecture (the authors' module names, so the checkpoint loads after dropping the `model.`
prefix of the Hub `ABMILModel` wrapper)::

    patch_embed   = Linear(in_dim, 512) -> ReLU        (create_mlp with no hidden layers)
    global_attn   = attention_a: Linear(512, 384) -> Tanh -> Dropout(0.25)
                    attention_b: Linear(512, 384) -> Sigmoid -> Dropout(0.25)
                    attention_c: Linear(384, 1)
    slide embedding = softmax_N(attention_c(a * b)) @ patch_embed(x)            (B, 512)

Departures: padded patches get exactly zero weight (masked_fill with -inf); the authors add
`finfo.min` to their scores, which gives the same weights whenever a bag has one valid patch. The
checkpoint's task head (`classifier.*`, when a saved model carries one) is dropped on load: FEATHER
is used here as an encoder, and the harness puts its own head on the embedding.

Parameter count (published sizes): 788,097 on CONCH v1.5 (768-d), 1,181,313 on UNI2-h (1536-d). The
MIL-Lab README lists "0.9M" for all three FEATHER-24K models, which matches only the UNI (1024-d)
variant's 919,169; no count is checked against it here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from baselines.layers import masked_softmax
from baselines.slide.base import SLIDE_ARCHS, SlideEncoder, config_kwargs

# sizes of the released checkpoints (MIL-Lab abmil/base.yaml) and the tiny test instance
_CONFIGS: dict[str, dict[str, Any]] = {
    "published": {"embed_dim": 512, "attn_dim": 384, "dropout": 0.25},
    "tiny": {"embed_dim": 8, "attn_dim": 6, "dropout": 0.25},
}
# in_dim of each registry name's patch encoder (MIL-Lab ENCODER_DIM_MAPPING)
_IN_DIM = {"feather": 768, "feather-uni2": 1536}
# checkpoint keys that are not part of the slide embedding (the task head)
_HEAD_PREFIXES = ("model.classifier.", "classifier.")


class GatedAttentionScores(nn.Module):
    """Ilse et al.'s gated attention: one score per instance, tanh branch times sigmoid gate.

    Module names follow MIL-Lab's GlobalGatedAttention and CHIEF's Attn_Net_Gated
    (`attention_a.0`, `attention_b.0`, `attention_c`), which share this layout.
    """

    def __init__(self, dim: int, attn_dim: int, dropout: float) -> None:
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.attention_b = nn.Sequential(nn.Linear(dim, attn_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.attention_c = nn.Linear(attn_dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: (B, N, dim) -> unnormalised scores (B, N)."""
        return self.attention_c(self.attention_a(h) * self.attention_b(h)).squeeze(-1)


def drop_prefixed(state_dict: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The entries of `state_dict` whose key starts with none of `prefixes`."""
    return {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}


class Feather(SlideEncoder):
    """FEATHER's ABMIL: linear+ReLU patch embedding, gated attention pooling; (B, N, in_dim) -> (B, embed_dim)."""

    uses_coords = False

    def __init__(self, in_dim: int, embed_dim: int = 512, attn_dim: int = 384, dropout: float = 0.25) -> None:
        super().__init__(in_dim, embed_dim)
        self.patch_embed = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU())
        self.global_attn = GatedAttentionScores(embed_dim, attn_dim, dropout)
        self._attention: torch.Tensor | None = None
        # MIL-Lab's MIL.initialize_weights: Kaiming-uniform (ReLU gain) weights, zero biases
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def encode(self, x: torch.Tensor, coords: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        h = self.patch_embed(x)
        attention = masked_softmax(self.global_attn(h), mask)  # (B, N), sums to 1 over valid patches
        self._attention = attention.detach()
        return torch.einsum("bn,bnd->bd", attention, h)

    def attention(self) -> torch.Tensor | None:
        return self._attention

    def key_map(self) -> Mapping[str, str]:
        return {"model.": ""}  # the Hub checkpoint is saved from ABMILModel, which wraps ABMIL as `.model`

    def load_published(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        super().load_published(drop_prefixed(state_dict, _HEAD_PREFIXES))


def _build(name: str, config: str, overrides: dict[str, Any]) -> Feather:
    base = {"in_dim": _IN_DIM[name] if config == "published" else 16}
    return Feather(**config_kwargs(name, _CONFIGS, config, overrides, base))


@SLIDE_ARCHS.decorator("feather")
def build_feather(config: str = "published", **overrides: Any) -> SlideEncoder:
    """FEATHER-24K on CONCH v1.5 features (768-d in, 512-d out)."""
    return _build("feather", config, overrides)


@SLIDE_ARCHS.decorator("feather-uni2")
def build_feather_uni2(config: str = "published", **overrides: Any) -> SlideEncoder:
    """FEATHER-24K on UNI2-h features (1536-d in, 512-d out)."""
    return _build("feather-uni2", config, overrides)


__all__ = ["Feather", "GatedAttentionScores", "build_feather", "build_feather_uni2", "drop_prefixed"]
