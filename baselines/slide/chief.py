"""CHIEF's slide-level attention network (registry name `chief`), image branch only.

CHIEF (Wang et al., Nature 2024) pools CTransPath patch features (768-d) with a CLAM-style gated
attention network pretrained weakly supervised on 60K slides. Its slide embedding, `WSI_feature`,
is the attention-weighted mean of the *input* patch features (so it is 768-d, the patch size),
not of the projected 512-d features that its classifier sees.

Source (read, not copied): hms-dbmi/CHIEF at commit 1abed334e674ad2b6ee0430d1ce7d0b566420bb4,
`models/CHIEF.py` (CHIEF, Attn_Net_Gated; size_arg "small" = [768, 512, 256], dropout True) and
`Get_CHIEF_WSI_level_feature.py` (`CHIEF(size_arg="small", dropout=True, n_classes=2)`, strict load
of `CHIEF_pretraining.pth`, `result['WSI_feature']`, shape (1, 768)). TRIDENT (mahmoodlab/TRIDENT
a91fa84, `trident/slide_encoder_models/load.py`, CHIEFSlideEncoder) builds the same model and returns
`WSI_feature`, 768-d, fp32.

Architecture (the authors' module names, so their checkpoint loads unchanged)::

    attention_net = Linear(768, 512) -> ReLU -> Dropout(0.25) ->
                    gated attention (attention_a: Linear(512, 256) -> Tanh -> Dropout(0.25);
                                     attention_b: Linear(512, 256) -> Sigmoid -> Dropout(0.25);
                                     attention_c: Linear(256, 1))
    slide embedding = softmax_N(scores) @ x                                     (B, 768)

Left out: the text branch and heads (`organ_embedding`, the 19 anatomical-site text embeddings,
`text_to_vision`, `classifiers`, `instance_classifiers`, `att_head`). They feed only the bag logits
(`WSI_feature_anatomical` = pooled projected features + site embedding), never `WSI_feature`, so the
image embedding is the same without them; their checkpoint keys are dropped on load.

Departures: the authors' forward takes one bag (N, 768) at a time (`torch.mm`); this one takes a
padded batch (B, N, D) with a mask and gives padded patches exactly zero weight.

Parameter count (published sizes): 656,641 for this image branch; the authors' full module has
1,185,032 parameters (and the 19x768 buffer). MIL-Lab's README lists CHIEF at "0.9M"; it matches
neither, so no count is checked against it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from baselines.layers import masked_softmax, xavier_init
from baselines.slide.base import SLIDE_ARCHS, SlideEncoder, config_kwargs
from baselines.slide.feather import GatedAttentionScores, drop_prefixed

_CONFIGS: dict[str, dict[str, Any]] = {
    "published": {"in_dim": 768, "hidden_dim": 512, "attn_dim": 256, "dropout": 0.25},  # size_arg "small"
    "tiny": {"in_dim": 16, "hidden_dim": 8, "attn_dim": 6, "dropout": 0.25},
}
# checkpoint entries of the text branch and heads, which the slide embedding does not use
_NOT_IMAGE = ("classifiers.", "instance_classifiers.", "att_head.", "text_to_vision.", "organ_embedding")


class Chief(SlideEncoder):
    """CHIEF's gated attention pooling of the raw patch features; (B, N, in_dim) -> (B, in_dim)."""

    uses_coords = False

    def __init__(self, in_dim: int = 768, hidden_dim: int = 512, attn_dim: int = 256, dropout: float = 0.25) -> None:
        super().__init__(in_dim, embed_dim=in_dim)
        self.attention_net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
            GatedAttentionScores(hidden_dim, attn_dim, dropout),
        )
        self._attention: torch.Tensor | None = None
        xavier_init(self)  # CHIEF's utils.initialize_weights: xavier-normal weights, zero biases

    def encode(self, x: torch.Tensor, coords: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        attention = masked_softmax(self.attention_net(x), mask)  # (B, N)
        self._attention = attention.detach()
        return torch.einsum("bn,bnd->bd", attention, x)  # WSI_feature: weights applied to the input features

    def attention(self) -> torch.Tensor | None:
        return self._attention

    def load_published(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        super().load_published(drop_prefixed(state_dict, _NOT_IMAGE))


@SLIDE_ARCHS.decorator("chief")
def build_chief(config: str = "published", **overrides: Any) -> SlideEncoder:
    """CHIEF's image branch on CTransPath features (768-d in, 768-d out)."""
    return Chief(**config_kwargs("chief", _CONFIGS, config, overrides))


__all__ = ["Chief", "build_chief"]
