"""Published non-timm checkpoints -> timm ViT state dicts (pure key/tensor mapping, no `transformers` import).

Three kinds of checkpoint are converted, each into the timm `VisionTransformer` its registry entry names:

* ``"transformers-vit"``: a Hugging Face `ViTModel` (Phikon, owkin/phikon).
* ``"transformers-dinov2"``: a Hugging Face `Dinov2Model`, or a `Dinov2WithRegisters`-style model with
  ``embeddings.register_tokens`` (Phikon-v2, Midnight-12k, Hibou-B/L's custom `Dinov2ModelWithRegisters`).
* ``"torch-hub-dinov2"``: the original DINOv2 module's state dict (facebookresearch/dinov2 `DinoVisionTransformer`,
  as OpenMidnight's ``teacher_checkpoint_load.pt``).

Key names were read from (no code copied):

* transformers@v5.25.0 (installed in a throw-away folder) ``models/vit/modeling_vit.py`` `ViTModel`,
  ``models/dinov2/modeling_dinov2.py`` `Dinov2Model`, ``models/dinov2_with_registers`` `Dinov2WithRegistersModel`
  and ``conversion_mapping.py``, whose renaming table for ViTModel/Dinov2Model is the link between the names of the
  published checkpoints (saved by transformers 4.3x/4.4x: ``encoder.layer.N.attention.attention.query``,
  ``attention.output.dense``, ``intermediate.dense``, ``output.dense``, ``mlp.weights_in``/``weights_out``) and the
  names transformers 5 uses in memory (``q_proj``, ``o_proj``, ``mlp.fc1``, ``gate_proj``/``up_proj``/``down_proj``).
  Both spellings are accepted here.
* timm@1.0.31 ``timm/models/vision_transformer.py`` (`VisionTransformer`: fused ``attn.qkv`` ordered q, k, v;
  ``ls1.gamma``; ``reg_token``; with registers, ``no_embed_class=True``: the position embedding covers the patches
  only) and ``timm/layers/mlp.py`` `GluMlp` (`SwiGLUPacked` = ``gate_last=False``: ``fc1`` packs [gate; up] rows,
  output ``silu(gate) * up``, exactly the layout of transformers' ``weights_in`` (chunked gate first) and of DINOv2's
  ``SwiGLUFFNFused.w12``).
* facebookresearch/dinov2 ``dinov2/models/vision_transformer.py`` (``register_tokens`` inserted after the class
  token, with no position embedding; ``interpolate_pos_encoding`` bicubic, ``antialias=True`` and no offset for the
  ``*_reg`` hub models) and ``dinov2/layers/swiglu_ffn.py`` (``w12``/``w3``).

What the mapping does, per kind:

* q/k/v: ``cat([query, key, value], dim=0)`` -> ``attn.qkv`` (weights (3D, D), biases (3D,)).
* layer scale: ``layer_scale{1,2}.lambda1`` -> ``ls{1,2}.gamma``.
* SwiGLU (``use_swiglu_ffn = true``): ``weights_in`` (2H, D) -> ``mlp.fc1`` as is; ``gate_proj``/``up_proj``
  -> ``cat([gate, up])``; ``weights_out``/``down_proj``/``w3`` -> ``mlp.fc2``. The timm model must be built with
  ``mlp_layer = SwiGLUPacked, act_layer = SiLU`` and an ``mlp_ratio`` giving fc1 = 2H rows (H = transformers'
  ``(int(4 D * 2 / 3) + 7) // 8 * 8``).
* register tokens: ``register_tokens`` -> ``reg_token``; the class token's position embedding is folded into the
  class token (``cls + pos[:, :1]``) and dropped from ``pos_embed``, which is then patch-only: the same sums as
  the source model (class + its position, registers without one, patches + theirs).
* position embeddings on a different grid (e.g. a 518 px checkpoint into a 224 px timm model): resampled once
  here, bicubic in float32 like the source: ``antialias=False`` for transformers (`interpolate_pos_encoding` of
  transformers 5; transformers 4.3x used a scale factor with a 0.1 offset, which gives slightly different values)
  and ``antialias=True`` for the DINOv2 ``*_reg`` hub models. Not needed for the registered entries whose configs
  were looked up (Phikon 224/16, Hibou-B 224/14).
* dropped: ``embeddings.mask_token``/``mask_token`` (used only for masked pre-training), ``pooler.*`` (ViTModel's
  tanh pooler; the published embeddings are the layer-normed class token, which is timm's
  ``forward_features(x)[:, 0]``, i.e. pooling "cls", and equals ``forward_head(..., pre_logits=True)`` with
  ``global_pool="token"``), a classifier ``head.*``. The final ``layernorm`` -> ``norm``.

Strict: a source key no rule maps, a missing or an extra key against the timm model, or a shape that differs, is a
`ConfigError` naming the keys (and the shapes).

Equivalence (float64, CPU, tiny random models: hidden 48, 2 layers, 4 heads, patch 8, 32 px; all parameters
random; built from configs with transformers 5.25.0 in a throw-away folder, saved with the published checkpoints'
legacy key names and loaded back by transformers' own `from_pretrained`, which reproduced the weights exactly,
then converted here and loaded strictly into timm 1.0.31; compared: the entry's pooling, the layer-normed class
token = transformers' ``pooler_output`` (Dinov2) / ``last_hidden_state[:, 0]`` (ViT); script /tmp/equiv.py, not part
of the project). Max abs differences, 3 images:

* ViTModel, ``layer_norm_eps`` 1e-6: 6.7e-16. With 1e-12 (Phikon's published config) against timm's 1e-6: 2.8e-7.
* Dinov2Model, layer scale, GELU MLP: 4.2e-16; with SwiGLU (``use_swiglu_ffn``): 6.9e-16.
* Dinov2WithRegistersModel (2 registers, SwiGLU): class token 3.3e-16; mean of patch tokens with the registers
  dropped (pooling "mean"): 1.1e-16.
* Dinov2Model checkpoint at 48 px run at 32 px (transformers interpolates each forward, timm once here): 4.4e-16.
* Original DINOv2 `DinoVisionTransformer` (facebookresearch/dinov2@b8931f7, ``swiglufused``, 2 registers,
  ``interpolate_antialias=True``, offset 0, XFORMERS_DISABLED=1), ``torch-hub-dinov2``: 0 at its own grid; 1.1e-8
  from a 48 px checkpoint at 32 px (both resample in float32; the rest is float64).
* timm's ``forward_head(forward_features(x), pre_logits=True)`` equals ``forward_features(x)[:, 0]`` exactly (0) in
  every case (pooling "model" = pooling "cls" for these ViTs).

Not checked against the authors' code: Hibou's custom `Dinov2ModelWithRegisters` (its modeling file was not
read; its config is a Dinov2 config plus ``num_register_tokens``, converted as transformers' registers model).

Published flags timm cannot match exactly: Phikon's config.json at the pinned revision has ``layer_norm_eps``
1e-12 (the transformers default; a Hub pull request proposes 1e-6 "to match timm", the iBOT training value); timm's
ViT uses 1e-6. The converter keeps timm's 1e-6 and `check_hf_config` warns (2.8e-7 on the tiny models above).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from bench.common.errors import ConfigError

KINDS = ("transformers-vit", "transformers-dinov2", "torch-hub-dinov2")
# A common prefix a wrapper put on every key (a classification model around the backbone, DDP, our own wrapper).
_PREFIXES = ("module.", "backbone.", "model.", "vit.", "dinov2.", "encoder_model.")
_EXAMPLES = 5


def detect_kind(state_dict: Mapping[str, Any]) -> str:
    """Which converter a state dict needs, from its key names (after a common wrapper prefix).

    Raises:
        ConfigError: the keys look like none of `KINDS` (e.g. already a timm state dict).
    """
    keys = list(_strip_prefix(dict(state_dict)))
    if any(re.match(r"(encoder\.layer|layers)\.\d+\.layernorm_before\.", k) for k in keys):
        return "transformers-vit"
    if any(re.match(r"encoder\.layer\.\d+\.norm1\.", k) for k in keys):
        return "transformers-dinov2"
    if any(re.match(r"blocks\.\d+\.(\d+\.)?attn\.qkv\.", k) for k in keys) and (
            "mask_token" in keys or "register_tokens" in keys or any(".mlp.w12." in k for k in keys)):
        return "torch-hub-dinov2"
    raise ConfigError(f"cannot tell which checkpoint format these weights are (first keys {keys[:_EXAMPLES]}); "
                      f"expected one of {', '.join(KINDS)}")


def convert_state_dict(
    kind: str, state_dict: Mapping[str, torch.Tensor], *, target: Mapping[str, torch.Tensor],
    what: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Map a published checkpoint onto a timm ViT's keys.

    Args:
        kind: one of `KINDS`.
        state_dict: the checkpoint's tensors (a common wrapper prefix such as ``dinov2.`` is stripped).
        target: the timm model's ``state_dict()`` (its shapes decide the position-embedding layout and grid).
        what: what the weights are, for error messages.

    Returns:
        A state dict with exactly the target's keys and shapes (load it with ``strict=True``).

    Raises:
        ConfigError: unknown kind; a source key no rule maps; missing or extra keys against the target; a shape
            that differs (the message names them).
    """
    if kind not in KINDS:
        raise ConfigError(f"{what}: unknown checkpoint kind {kind!r}; expected one of {', '.join(KINDS)}")
    sd = _strip_prefix(dict(state_dict))
    if kind == "torch-hub-dinov2":
        out, unknown = _map_torch_hub(sd)
    else:
        out, unknown = _map_transformers(sd, vit=kind == "transformers-vit")
    if unknown:
        raise ConfigError(f"{what}: {len(unknown)} keys of the {kind} checkpoint have no timm counterpart "
                          f"(e.g. {unknown[:_EXAMPLES]}); is this the right checkpoint for the entry?")
    _fit_positions(out, target, antialias=kind == "torch-hub-dinov2", what=what)
    check_against(out, target, what=what)
    return out


def check_against(state_dict: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], *, what: str) -> None:
    """Missing/extra keys or different shapes against the target model's state dict are a `ConfigError`."""
    missing = [k for k in target if k not in state_dict]
    extra = [k for k in state_dict if k not in target]
    if missing or extra:
        raise ConfigError(
            f"{what}: the converted weights do not fit the timm architecture: {len(missing)} missing keys "
            f"{missing[:_EXAMPLES]}, {len(extra)} unexpected keys {extra[:_EXAMPLES]}. Check the entry's architecture "
            "and architecture_kwargs against the checkpoint's config.json (registers, depth, SwiGLU)")
    bad = [(k, tuple(state_dict[k].shape), tuple(target[k].shape)) for k in target
           if tuple(state_dict[k].shape) != tuple(target[k].shape)]
    if bad:
        k, got, want = bad[0]
        raise ConfigError(
            f"{what}: {k} has shape {got} in the converted weights but {want} in the timm architecture "
            f"({len(bad)} mismatches: {[b[0] for b in bad[:_EXAMPLES]]}). A different fc1 size means the MLP type "
            "or mlp_ratio differs (SwiGLU: mlp_layer = SwiGLUPacked, act_layer = SiLU); fix architecture_kwargs")


def check_hf_config(config: Mapping[str, Any], model: torch.nn.Module, *, what: str) -> list[str]:
    """Compare a transformers config.json with the timm model built for it.

    Returns the differences that do not change the keys but change the numbers slightly (``layer_norm_eps``),
    as warning sentences.

    Raises:
        ConfigError: a size or flag that the timm model does not have (hidden size, depth, heads, patch size,
            register tokens, SwiGLU, qkv bias, intermediate size), naming the config field and both values.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None or not len(blocks):
        raise ConfigError(f"{what}: the timm architecture is not a ViT with blocks; transformers checkpoints convert "
                          "only into timm VisionTransformer models")
    block = blocks[0]
    fc1 = block.mlp.fc1.weight.shape[0]
    fc2_in = block.mlp.fc2.weight.shape[1]
    glu = fc1 == 2 * fc2_in
    model_type = config.get("model_type")
    have: dict[str, Any] = {
        "hidden_size": int(model.embed_dim), "num_hidden_layers": len(blocks),
        "num_attention_heads": int(block.attn.num_heads), "patch_size": int(model.patch_embed.patch_size[0]),
        "qkv_bias": block.attn.qkv.bias is not None,
    }
    if model_type == "vit":
        have["intermediate_size"] = fc1
    else:
        have["num_register_tokens"] = int(getattr(model, "num_reg_tokens", 0))
        have["use_swiglu_ffn"] = glu
    defaults = {"num_register_tokens": 0, "use_swiglu_ffn": False, "qkv_bias": True}
    wrong = []
    for key, value in have.items():
        published = config.get(key, defaults.get(key))
        if published is None:
            continue
        if isinstance(published, list):  # patch_size may be [p, p]
            published = published[0]
        if published != value:
            wrong.append(f"{key} = {published!r} in config.json but {value!r} in the timm model")
    if model_type not in (None, "vit") and config.get("use_swiglu_ffn") and glu:
        hidden = int(config["hidden_size"] * config.get("mlp_ratio", 4))
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8  # transformers' Dinov2SwiGLUFFN hidden size
        if hidden != fc2_in:
            wrong.append(f"SwiGLU hidden size {hidden} (from hidden_size and mlp_ratio) but {fc2_in} in the timm "
                         "model (set mlp_ratio so that int(hidden_size * mlp_ratio) = 2 * that size)")
    act = config.get("hidden_act", "gelu")
    if model_type == "vit" and act != "gelu":
        wrong.append(f"hidden_act = {act!r} in config.json but timm's ViT uses exact GELU")
    if wrong:
        raise ConfigError(f"{what}: the checkpoint's config.json does not match the entry's timm architecture: "
                          + "; ".join(wrong) + ". Fix architecture/architecture_kwargs in the encoder entry")
    warnings = []
    eps = config.get("layer_norm_eps")
    norm_eps = getattr(getattr(model, "norm", None), "eps", None)
    if eps is not None and norm_eps is not None and not math.isclose(float(eps), float(norm_eps), rel_tol=1e-3):
        warnings.append(f"{what}: config.json has layer_norm_eps = {eps} but the timm model uses {norm_eps}; "
                        "embeddings differ slightly from transformers' (relative size about the eps difference "
                        "over the activation variance)")
    return warnings


# ------------------------------------------------------------------------------ mapping rules


def _strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed and sd:
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


# transformers layer keys -> timm block keys; "{i}" is the layer index. Legacy (published) and transformers-5 names.
_VIT_LAYER = {
    "layernorm_before": "norm1", "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
_DINOV2_LAYER = {
    "norm1": "norm1", "norm2": "norm2",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "mlp.weights_in": "mlp.fc1", "mlp.weights_out": "mlp.fc2",
    "mlp.down_proj": "mlp.fc2",
}
_QKV = {"attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
        "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v"}
_GLU_HALVES = {"mlp.gate_proj": 0, "mlp.up_proj": 1}
_EMBEDDINGS = {
    "embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "reg_token",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
}
_DROPPED = re.compile(r"^(embeddings\.mask_token|mask_token|pooler\..*|head\..*|classifier\..*)$")
_LAYER_KEY = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias|lambda1)$")


def _map_transformers(sd: dict[str, torch.Tensor], *, vit: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
    rules = _VIT_LAYER if vit else _DINOV2_LAYER
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}  # (layer, weight|bias) -> {q, k, v} or {0, 1}
    for key, value in sd.items():
        if _DROPPED.match(key):
            continue
        if key in _EMBEDDINGS:
            out[_EMBEDDINGS[key]] = value
            continue
        m = _LAYER_KEY.match(key)
        if m is None:
            unknown.append(key)
            continue
        i, name, leaf = int(m.group(1)), m.group(2), m.group(3)
        if leaf == "lambda1":  # layer scale: "layer_scale1" + ".lambda1"
            name, leaf = f"{name}.lambda1", ""
        if name in _QKV:
            parts.setdefault((i, f"qkv.{leaf}"), {})[_QKV[name]] = value
        elif not vit and name in _GLU_HALVES:
            parts.setdefault((i, f"glu.{leaf}"), {})[str(_GLU_HALVES[name])] = value
        elif name in rules:
            out[f"blocks.{i}.{rules[name]}" + (f".{leaf}" if leaf else "")] = value
        else:
            unknown.append(key)
    for (i, slot), got in parts.items():
        group, leaf = slot.split(".", 1)
        order = ("q", "k", "v") if group == "qkv" else ("0", "1")
        lacking = [p for p in order if p not in got]
        if lacking:
            names = {"q": "query", "k": "key", "v": "value", "0": "gate_proj", "1": "up_proj"}
            raise ConfigError(f"layer {i} of the checkpoint has {group} parts but lacks "
                              f"{[names[p] + '.' + leaf for p in lacking]}")
        fused = torch.cat([got[p] for p in order], dim=0)  # q, k, v (timm's qkv order) / gate, up (GluMlp order)
        out[f"blocks.{i}.attn.qkv.{leaf}" if group == "qkv" else f"blocks.{i}.mlp.fc1.{leaf}"] = fused
    return out, unknown


_HUB_BLOCK = re.compile(r"^blocks\.(?:\d+\.)?(\d+)\.(.+)$")  # "blocks.N." or, with block chunks, "blocks.C.N."


def _map_torch_hub(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    plain = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
             "norm.bias"}
    block_leaves = re.compile(r"^(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2|mlp\.w12|mlp\.w3)\.(weight|bias)$"
                              r"|^ls[12]\.gamma$")
    for key, value in sd.items():
        if _DROPPED.match(key):
            continue
        if key == "register_tokens":
            out["reg_token"] = value
        elif key in plain:
            out[key] = value
        elif (m := _HUB_BLOCK.match(key)) and block_leaves.match(m.group(2)):
            leaf = m.group(2).replace("mlp.w12.", "mlp.fc1.").replace("mlp.w3.", "mlp.fc2.")
            out[f"blocks.{int(m.group(1))}.{leaf}"] = value
        else:
            unknown.append(key)
    return out, unknown


def _fit_positions(out: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], *, antialias: bool,
                   what: str) -> None:
    """Fold the class position into the class token when the timm model's pos_embed is patch-only (registers),
    and resample the patch grid to the target's. In place."""
    if "pos_embed" not in out or "pos_embed" not in target:
        return
    from timm.layers import resample_abs_pos_embed

    pos = out["pos_embed"]  # (1, 1 + n*n, D): class position first
    n_src = pos.shape[1] - 1
    side = math.isqrt(n_src)
    if side * side != n_src:
        raise ConfigError(f"{what}: position embeddings of length {pos.shape[1]} are not 1 + a square grid")
    n_tgt = target["pos_embed"].shape[1]
    patch_only = math.isqrt(n_tgt) ** 2 == n_tgt
    if patch_only:
        if "cls_token" in out:
            out["cls_token"] = out["cls_token"] + pos[:, :1]  # (1, 1, D): its position folded in
        pos = pos[:, 1:]
    grid = math.isqrt(n_tgt if patch_only else n_tgt - 1)
    if grid != side:
        pos = resample_abs_pos_embed(pos, new_size=[grid, grid], old_size=[side, side],
                                     num_prefix_tokens=0 if patch_only else 1, antialias=antialias)
    out["pos_embed"] = pos


__all__ = ["KINDS", "detect_kind", "convert_state_dict", "check_against", "check_hf_config"]
