"""baselines/convert.py: published transformers / torch-hub checkpoints -> timm ViT state dicts.

Each test writes a checkpoint with the published key names from a tiny random timm model by an explicit
inverse mapping written here (not by convert.py), converts it back, loads it strictly into a fresh timm model
and compares outputs (float64). q/k/v and SwiGLU gate/up order are checked with distinct constant values.
The Hub path runs end to end through the registry with a local HF-cache snapshot and HF_HUB_OFFLINE=1.
No transformers import, no download.
"""

from __future__ import annotations

import re

import pytest
import timm
import torch
from safetensors.torch import save_file

from baselines.convert import check_hf_config, convert_state_dict, detect_kind
from baselines.encoders import EncoderSpec, build_encoder, register_encoder
from bench.common.errors import ConfigError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
D, DEPTH, HEADS, IMG, PATCH = 32, 2, 2, 32, 8
VIT = dict(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS)
DINO = dict(VIT, init_values=0.5)
# SwiGLU: transformers' hidden (int(4 D * 2 / 3) + 7) // 8 * 8 = 88 -> fc1 176 = int(32 * 5.5)
GLU = dict(mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU, mlp_ratio=5.5)


def tiny(arch: str, seed: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs).double().eval()
    with torch.no_grad():  # layer scale, biases and tokens non-trivial, so a dropped or misplaced one shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def split_qkv(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = w.shape[0] // 3
    return w[:n], w[n:2 * n], w[2 * n:]


def to_transformers_vit(sd: dict) -> dict:
    """timm ViT -> ViTModel keys as in owkin/phikon (transformers 4.x names), plus its tanh pooler."""
    out = {"embeddings.cls_token": sd["cls_token"], "embeddings.position_embeddings": sd["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"],
           "pooler.dense.weight": torch.randn(D, D, dtype=torch.float64), "pooler.dense.bias": torch.zeros(D)}
    for i in range(DEPTH):
        b, L = f"blocks.{i}.", f"encoder.layer.{i}."
        for leaf in ("weight", "bias"):
            q, k, v = split_qkv(sd[b + "attn.qkv." + leaf])
            out |= {L + "attention.attention.query." + leaf: q, L + "attention.attention.key." + leaf: k,
                    L + "attention.attention.value." + leaf: v,
                    L + "attention.output.dense." + leaf: sd[b + "attn.proj." + leaf],
                    L + "layernorm_before." + leaf: sd[b + "norm1." + leaf],
                    L + "layernorm_after." + leaf: sd[b + "norm2." + leaf],
                    L + "intermediate.dense." + leaf: sd[b + "mlp.fc1." + leaf],
                    L + "output.dense." + leaf: sd[b + "mlp.fc2." + leaf]}
    return out


def to_transformers_dinov2(sd: dict, *, swiglu: bool, v5_names: bool = False, class_pos: torch.Tensor | None = None,
                           prefix: str = "") -> dict:
    """timm DINOv2 ViT -> Dinov2Model / Dinov2WithRegisters keys (4.x names, or transformers 5's with v5_names).

    With registers the timm pos_embed is patch-only: the transformers model's class position is `class_pos`
    and its class token is timm's minus that position (the sums the two models compute are the same)."""
    cls = sd["cls_token"]
    pos = sd["pos_embed"]
    if "reg_token" in sd:
        cls = cls - class_pos
        pos = torch.cat([class_pos, pos], dim=1)
    out = {"embeddings.cls_token": cls, "embeddings.position_embeddings": pos,
           "embeddings.mask_token": torch.zeros(1, D, dtype=torch.float64),
           "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    if "reg_token" in sd:
        out["embeddings.register_tokens"] = sd["reg_token"]
    for i in range(DEPTH):
        b, L = f"blocks.{i}.", f"encoder.layer.{i}."
        out |= {L + "layer_scale1.lambda1": sd[b + "ls1.gamma"], L + "layer_scale2.lambda1": sd[b + "ls2.gamma"]}
        for leaf in ("weight", "bias"):
            q, k, v = split_qkv(sd[b + "attn.qkv." + leaf])
            att = ("attention.q_proj.", "attention.k_proj.", "attention.v_proj.", "attention.o_proj.") if v5_names \
                else ("attention.attention.query.", "attention.attention.key.", "attention.attention.value.",
                      "attention.output.dense.")
            out |= {L + att[0] + leaf: q, L + att[1] + leaf: k, L + att[2] + leaf: v,
                    L + att[3] + leaf: sd[b + "attn.proj." + leaf],
                    L + "norm1." + leaf: sd[b + "norm1." + leaf], L + "norm2." + leaf: sd[b + "norm2." + leaf]}
            fc1, fc2 = sd[b + "mlp.fc1." + leaf], sd[b + "mlp.fc2." + leaf]
            if swiglu and v5_names:
                gate, up = fc1.chunk(2, dim=0)
                out |= {L + "mlp.gate_proj." + leaf: gate, L + "mlp.up_proj." + leaf: up, L + "mlp.down_proj." + leaf: fc2}
            elif swiglu:
                out |= {L + "mlp.weights_in." + leaf: fc1, L + "mlp.weights_out." + leaf: fc2}
            else:
                out |= {L + "mlp.fc1." + leaf: fc1, L + "mlp.fc2." + leaf: fc2}
    return {prefix + k: v for k, v in out.items()}


def to_torch_hub(sd: dict, class_pos: torch.Tensor, *, chunks: int = 0) -> dict:
    """timm reg4 SwiGLU ViT -> the original DINOv2 module's keys (register_tokens, w12/w3, class position in
    pos_embed; with block chunks, blocks.<chunk>.<index>)."""
    out = {"cls_token": sd["cls_token"] - class_pos, "pos_embed": torch.cat([class_pos, sd["pos_embed"]], dim=1),
           "register_tokens": sd["reg_token"], "mask_token": torch.zeros(1, D, dtype=torch.float64)}
    for k, v in sd.items():
        m = re.match(r"blocks\.(\d+)\.(.+)$", k)
        if m:
            leaf = m.group(2).replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3.")
            chunk = f"{int(m.group(1)) // (DEPTH // chunks)}." if chunks else ""
            out[f"blocks.{chunk}{m.group(1)}.{leaf}"] = v
        elif k.startswith(("patch_embed.", "norm.")):
            out[k] = v
    return out


def check_roundtrip(source: torch.nn.Module, target: torch.nn.Module, state: dict, kind: str) -> None:
    assert detect_kind(state) == kind
    converted = convert_state_dict(kind, state, target=target.state_dict())
    target.load_state_dict(converted, strict=True)
    x = torch.randn(2, 3, IMG, IMG, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(target.forward_features(x), source.forward_features(x), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------ the three kinds


def test_transformers_vit_round_trip_drops_the_pooler():
    src = tiny("vit_base_patch16_224", 1, **VIT)
    check_roundtrip(src, tiny("vit_base_patch16_224", 2, **VIT), to_transformers_vit(src.state_dict()),
                    "transformers-vit")


@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("v5_names", [False, True])
def test_transformers_dinov2_round_trip(swiglu, v5_names):
    kw = {**DINO, **(GLU if swiglu else {})}
    src = tiny("vit_base_patch14_dinov2", 1, **kw)
    state = to_transformers_dinov2(src.state_dict(), swiglu=swiglu, v5_names=v5_names, prefix="dinov2.")
    check_roundtrip(src, tiny("vit_base_patch14_dinov2", 2, **kw), state, "transformers-dinov2")


def test_transformers_dinov2_with_registers_folds_the_class_position_into_the_class_token():
    kw = {**DINO, **GLU, "reg_tokens": 4}
    src = tiny("vit_base_patch14_reg4_dinov2", 1, **kw)
    class_pos = torch.randn(1, 1, D, dtype=torch.float64)
    state = to_transformers_dinov2(src.state_dict(), swiglu=True, class_pos=class_pos)
    check_roundtrip(src, tiny("vit_base_patch14_reg4_dinov2", 2, **kw), state, "transformers-dinov2")


@pytest.mark.parametrize("chunks", [0, 2])
def test_torch_hub_dinov2_round_trip(chunks):
    kw = {**DINO, **GLU, "reg_tokens": 4}
    src = tiny("vit_base_patch14_reg4_dinov2", 1, **kw)
    state = to_torch_hub(src.state_dict(), torch.randn(1, 1, D, dtype=torch.float64), chunks=chunks)
    check_roundtrip(src, tiny("vit_base_patch14_reg4_dinov2", 2, **kw), state, "torch-hub-dinov2")


def test_qkv_is_fused_in_query_key_value_order_and_swiglu_gate_comes_first():
    kw = {**DINO, **GLU}
    model = tiny("vit_base_patch14_dinov2", 1, **kw)
    state = to_transformers_dinov2(model.state_dict(), swiglu=True, v5_names=True)
    for i in range(DEPTH):
        for j, part in enumerate(("q_proj", "k_proj", "v_proj")):
            state[f"encoder.layer.{i}.attention.{part}.weight"] = torch.full((D, D), float(j + 1), dtype=torch.float64)
        state[f"encoder.layer.{i}.mlp.gate_proj.weight"].fill_(7.0)
        state[f"encoder.layer.{i}.mlp.up_proj.weight"].fill_(8.0)
    out = convert_state_dict("transformers-dinov2", state, target=model.state_dict())
    qkv = out["blocks.0.attn.qkv.weight"]
    assert [qkv[j * D:(j + 1) * D].unique().tolist() for j in range(3)] == [[1.0], [2.0], [3.0]]
    fc1 = out["blocks.1.mlp.fc1.weight"]
    half = fc1.shape[0] // 2
    assert fc1[:half].unique().tolist() == [7.0] and fc1[half:].unique().tolist() == [8.0]
    assert "ls1.gamma" in " ".join(out) and not any("mask_token" in k for k in out)


def test_position_grid_of_another_size_is_resampled_bicubic():
    """A 48 px checkpoint (6x6 grid) into a 32 px timm model (4x4): class position kept, patch grid resampled
    exactly as F.interpolate(bicubic, align_corners=False, antialias=False) (transformers' interpolation)."""
    big = tiny("vit_base_patch14_dinov2", 1, **{**DINO, "img_size": 48})
    small = tiny("vit_base_patch14_dinov2", 2, **DINO)
    state = to_transformers_dinov2(big.state_dict(), swiglu=False)
    out = convert_state_dict("transformers-dinov2", state, target=small.state_dict())
    pos = big.pos_embed.detach()
    grid = pos[:, 1:].reshape(1, 6, 6, D).permute(0, 3, 1, 2).float()
    want = torch.nn.functional.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False, antialias=False)
    want = torch.cat([pos[:, :1], want.permute(0, 2, 3, 1).reshape(1, 16, D).double()], dim=1)
    torch.testing.assert_close(out["pos_embed"], want, rtol=0, atol=1e-7)
    small.load_state_dict(out, strict=True)


# ------------------------------------------------------------------------------ strictness


def test_missing_extra_and_misshaped_keys_are_config_errors_naming_them():
    model = tiny("vit_base_patch16_224", 1, **VIT)
    state = to_transformers_vit(model.state_dict())
    target = model.state_dict()
    missing = {k: v for k, v in state.items() if k != "encoder.layer.1.layernorm_after.bias"}
    with pytest.raises(ConfigError, match=r"missing keys \['blocks\.1\.norm2\.bias'\]"):
        convert_state_dict("transformers-vit", missing, target=target)
    with pytest.raises(ConfigError, match=r"no timm counterpart.*encoder\.layer\.0\.attention\.attention\.rel_pos"):
        convert_state_dict("transformers-vit", {**state, "encoder.layer.0.attention.attention.rel_pos.weight":
                                                torch.zeros(3)}, target=target)
    no_value = {k: v for k, v in state.items() if k != "encoder.layer.0.attention.attention.value.weight"}
    with pytest.raises(ConfigError, match=r"layer 0 .* lacks \['value\.weight'\]"):
        convert_state_dict("transformers-vit", no_value, target=target)
    # a SwiGLU checkpoint into a GELU-MLP architecture: same key names, other fc1 shape
    glu = tiny("vit_base_patch14_dinov2", 1, **DINO, **GLU)
    plain = tiny("vit_base_patch14_dinov2", 1, **DINO)
    with pytest.raises(ConfigError, match=r"blocks\.0\.mlp\.fc1\.weight has shape \(176, 32\).*\(128, 32\).*SwiGLU"):
        convert_state_dict("transformers-dinov2", to_transformers_dinov2(glu.state_dict(), swiglu=True),
                           target=plain.state_dict())
    # a checkpoint with registers into an architecture without them
    reg = tiny("vit_base_patch14_reg4_dinov2", 1, **DINO, reg_tokens=4)
    with pytest.raises(ConfigError, match=r"unexpected keys \['reg_token'\]"):
        convert_state_dict("transformers-dinov2",
                           to_transformers_dinov2(reg.state_dict(), swiglu=False, class_pos=torch.zeros(1, 1, D)),
                           target=plain.state_dict())
    with pytest.raises(ConfigError, match=r"cannot tell which checkpoint format"):
        detect_kind(plain.state_dict())  # already timm
    with pytest.raises(ConfigError, match=r"unknown checkpoint kind 'onnx'"):
        convert_state_dict("onnx", state, target=target)


def test_config_json_is_checked_against_the_architecture():
    model = tiny("vit_base_patch14_reg4_dinov2", 1, **DINO, **GLU, reg_tokens=4)
    config = {"model_type": "dinov2", "hidden_size": D, "num_hidden_layers": DEPTH, "num_attention_heads": HEADS,
              "patch_size": PATCH, "num_register_tokens": 4, "use_swiglu_ffn": True, "mlp_ratio": 4,
              "qkv_bias": True, "layer_norm_eps": 1e-6}
    assert check_hf_config(config, model, what="x") == []
    for key, value in (("num_register_tokens", 0), ("use_swiglu_ffn", False), ("num_hidden_layers", 3),
                       ("patch_size", 14)):
        with pytest.raises(ConfigError, match=rf"{key} = {value!r} in config.json but"):
            check_hf_config({**config, key: value}, model, what="x")
    warnings = check_hf_config({**config, "layer_norm_eps": 1e-12}, model, what="x")
    assert len(warnings) == 1 and "layer_norm_eps = 1e-12" in warnings[0]


# ------------------------------------------------------------------------------ through the registry, offline


VIT_CONFIG = {"architectures": ["ViTModel"], "model_type": "vit", "hidden_size": D, "num_hidden_layers": DEPTH,
              "num_attention_heads": HEADS, "intermediate_size": 4 * D, "patch_size": PATCH, "image_size": IMG,
              "qkv_bias": True, "hidden_act": "gelu", "layer_norm_eps": 1e-6}


def phikon_like(name: str, **extra) -> EncoderSpec:
    return EncoderSpec(name, "hf-hub:test-org/tiny-phikon", D, input_size=IMG, pooling="cls",
                       weights_format="transformers", architecture="vit_base_patch16_224",
                       architecture_kwargs=VIT, licence="other (test)", **extra)


def test_phikon_like_hub_snapshot_loads_offline_through_the_registry(hf_snapshot, registry_guard):
    src = tiny("vit_base_patch16_224", 3, **VIT).float()
    state = to_transformers_vit(src.state_dict())
    snap = hf_snapshot("test-org/tiny-phikon",
                       {"model.safetensors": {k: v.float() for k, v in state.items()}, "config.json": VIT_CONFIG},
                       COMMIT)
    register_encoder(phikon_like("tiny-phikon"))
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        want = src.forward_features(x)[:, 0]
    enc = build_encoder("tiny-phikon")
    assert enc.weights_id == f"hf:test-org/tiny-phikon@{COMMIT}"
    with torch.no_grad():
        torch.testing.assert_close(enc.model(x), want, rtol=0, atol=1e-5)
    # the same snapshot as a downloaded folder, and its weights file alone (--weights DIR / FILE)
    for weights in (snap, snap / "model.safetensors"):
        enc = build_encoder("tiny-phikon", weights)
        assert enc.weights_id.startswith("sha256:")
        with torch.no_grad():
            torch.testing.assert_close(enc.model(x), want, rtol=0, atol=1e-5)


def test_hub_config_that_disagrees_with_the_entry_names_the_field(hf_snapshot, registry_guard):
    src = tiny("vit_base_patch16_224", 3, **VIT).float()
    hf_snapshot("test-org/tiny-phikon",
                {"model.safetensors": to_transformers_vit(src.state_dict()),
                 "config.json": {**VIT_CONFIG, "num_attention_heads": 4}}, COMMIT)
    register_encoder(phikon_like("tiny-phikon-bad"))
    with pytest.raises(ConfigError, match=r"num_attention_heads = 4 in config.json but 2 in the timm model"):
        build_encoder("tiny-phikon-bad")


def test_torch_hub_file_in_a_hub_repo_loads_offline(tmp_path, hf_snapshot, registry_guard):
    """OpenMidnight-style: a bare original-DINOv2 state dict under hub_filename, into timm's reg4 SwiGLU ViT."""
    kw = {**DINO, **GLU, "reg_tokens": 4}
    src = tiny("vit_base_patch14_reg4_dinov2", 5, **kw).float()
    state = to_torch_hub(src.state_dict(), torch.randn(1, 1, D))
    hf_snapshot("test-org/tiny-hub", {"teacher.pt": state}, COMMIT)
    register_encoder(EncoderSpec("tiny-hub", "hf-hub:test-org/tiny-hub", D, input_size=IMG, pooling="model",
                                 weights_format="torch-hub", hub_filename="teacher.pt",
                                 architecture="vit_base_patch14_reg4_dinov2",
                                 architecture_kwargs={**kw, "mlp_layer": "timm.layers.SwiGLUPacked",
                                                      "act_layer": "torch.nn.SiLU"}))
    enc = build_encoder("tiny-hub")
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(enc.model(x), src(x), rtol=0, atol=1e-5)
    # a transformers file given to a torch-hub entry is refused, naming both formats
    bad = tmp_path / "vit.safetensors"
    save_file(to_transformers_vit(tiny("vit_base_patch16_224", 1, **VIT).float().state_dict()), str(bad))
    with pytest.raises(ConfigError, match=r"look like a transformers-vit checkpoint but the entry's weights_format is "
                                          r"'torch-hub'"):
        build_encoder("tiny-hub", bad)


# config.json files as published (read on the Hub pages named in encoders.toml; only the fields compared)
PUBLISHED_CONFIGS = {
    # huggingface.co/owkin/phikon/blob/e9ad8d13dfecc267131006c852b537fde98e151c/config.json
    "phikon": {"model_type": "vit", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
               "intermediate_size": 3072, "patch_size": 16, "image_size": 224, "qkv_bias": True,
               "hidden_act": "gelu", "layer_norm_eps": 1e-12},
    # huggingface.co/histai/hibou-b/blame/main/config.json (commit 5cc6343)
    "hibou-b": {"model_type": "dinov2", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                "mlp_ratio": 4, "patch_size": 14, "image_size": 224, "qkv_bias": True, "num_register_tokens": 4,
                "use_swiglu_ffn": True, "layerscale_value": 1.0, "layer_norm_eps": 1e-6},
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_CONFIGS))
def test_registered_architecture_matches_the_published_config(name):
    from baselines.encoders import get_encoder
    from baselines.weights import random_source

    with torch.device("meta"):
        backbone, _ = get_encoder(name)._backbone(random_source(), 0, None)
    warnings = check_hf_config(PUBLISHED_CONFIGS[name], backbone, what=name)
    assert warnings == ([] if name != "phikon" else [warnings[0]])
    if name == "phikon":
        assert "layer_norm_eps = 1e-12" in warnings[0]
