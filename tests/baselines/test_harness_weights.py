"""Published checkpoints of the architectures built here (weights_format "harness"): CONCH v1.5's vision tower
CTransPath and MUSK.

The checkpoints are written by the tests in the authors' layout: CONCH v1.5's `pytorch_model_vision.bin` keeps
the module's names but a position grid of another size; CHIEF_CTransPath.pth is timm_ctp 0.5.4's Swin layout
(downsample at the end of a stage, attn_mask buffers), made here by an explicit inverse mapping and wrapped in a
'model' key. The CTransPath file goes through the real registry entry from a Hub *dataset* repo in a local HF
cache, offline. Against the authors' own modules (TRIDENT a91fa84, timm_ctp 0.5.4), float64, random weights, the
session check measured: CONCH v1.5 (tiny sizes) <= 6.4e-16 at 224/256/448 px, CTransPath (full size) 0.0, MUSK (tiny
BEiT-3, lilab-stanford/MUSK@714b666) 2e-8 with the authors' float32 GELU/softmax, 3e-16 with those casts removed
(both with and without ms_aug).
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from baselines.encoders import (
    HARNESS_CONVERTERS,
    ConchV15Vision,
    EncoderSpec,
    MuskVision,
    build_encoder,
    get_encoder,
    register_encoder,
)
from baselines.weights import WeightsUnavailable
from bench.common.errors import ConfigError

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
TINY_CONCH = dict(img_size=64, d_model=16, n_head=2, trunk_kwargs=dict(embed_dim=32, depth=2, num_heads=4))


def tiny_conch(seed: int = 0) -> ConchV15Vision:
    torch.manual_seed(seed)
    model = ConchV15Vision(**TINY_CONCH).double().eval()
    with torch.no_grad():  # non-trivial position grid, layer scales and norms
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def test_conch_token_path_equals_timms_at_the_built_size():
    """At the built size (no interpolation) the hand-written iBOT token path is timm's forward_features."""
    model = tiny_conch()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_tokens(x), model.trunk.forward_features(x), rtol=0, atol=1e-12)


def test_conch_position_grid_follows_the_ibot_rule_not_timms():
    """448 px on a 224 build is a 4 x 4 -> 8 x 8 grid here (64 px build, 128 px input): bicubic with scale factor
    (8 + 0.1) / 4, the class position untouched; timm's size-based resampling gives other values."""
    model = tiny_conch()
    pos = model.trunk.pos_embed.detach()
    grid = pos[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, scale_factor=(8.1 / 4, 8.1 / 4), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 64, -1)
    got = model.position_embedding(128, 128).detach()
    assert got.shape == (1, 65, 32)
    torch.testing.assert_close(got[:, :1], pos[:, :1], rtol=0, atol=0)
    torch.testing.assert_close(got[:, 1:], expected, rtol=0, atol=1e-12)
    timm_rule = resample_abs_pos_embed(pos, new_size=[8, 8], num_prefix_tokens=1, interpolation="bicubic")
    assert (timm_rule - got).abs().max() > 1e-3  # the rule matters: features would differ
    # non-square input: rows and columns resampled separately
    assert model.position_embedding(128, 64).shape == (1, 1 + 8 * 4, 32)
    torch.testing.assert_close(model.position_embedding(64, 64), pos, rtol=0, atol=0)


def test_conch_published_file_loads_with_its_grid_resampled_as_the_authors_do(tmp_path, registry_guard):
    saved = tiny_conch(seed=1)
    state = saved.state_dict()
    state["trunk.pos_embed"] = torch.randn(1, 1 + 8 * 8, 32, dtype=torch.float64)  # saved at 128 px
    path = tmp_path / "pytorch_model_vision.bin"
    torch.save(state, path)
    register_encoder(EncoderSpec("tiny-conch", "hf-hub:test-org/conch", 16, input_size=128, weights_format="harness",
                                 architecture="harness:conch-v15-vision", architecture_kwargs=TINY_CONCH,
                                 hub_filename="pytorch_model_vision.bin"))
    enc = build_encoder("tiny-conch", weights=path)
    loaded = enc.model.backbone.state_dict()
    expected_pos = resample_abs_pos_embed(state["trunk.pos_embed"].float(), new_size=[4, 4], num_prefix_tokens=1,
                                          interpolation="bilinear", antialias=False)
    torch.testing.assert_close(loaded["trunk.pos_embed"], expected_pos, rtol=0, atol=1e-6)
    for key, value in state.items():
        if key != "trunk.pos_embed":
            torch.testing.assert_close(loaded[key], value.float(), rtol=0, atol=0, msg=key)
    # the same file from a snapshot folder (hub_filename inside it)
    assert build_encoder("tiny-conch", weights=tmp_path).weights_id == enc.weights_id


def test_conch_file_of_another_width_is_refused_naming_the_key():
    model = tiny_conch()
    state = dict(model.state_dict(), **{"trunk.pos_embed": torch.zeros(1, 65, 48)})
    with pytest.raises(ConfigError, match=r"trunk.pos_embed has shape \(1, 65, 48\).*width 32"):
        HARNESS_CONVERTERS["harness:conch-v15-vision"](state, model, "conch file")


def old_swin_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm 1.x Swin state dict -> timm_ctp 0.5.4's keys: `layers.i.downsample` (start of stage i) becomes
    `layers.(i-1).downsample` (end of the previous stage), plus the persistent attn_mask buffers of shifted blocks."""
    out = {}
    for key, value in state.items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", key)
        out[f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else key] = value
    for stage, blocks in ((0, 2), (1, 2), (2, 6)):
        for block in range(1, blocks, 2):
            out[f"layers.{stage}.blocks.{block}.attn_mask"] = torch.randn(4, 49, 49)
    return out


def test_ctranspath_old_layout_loads_from_a_hub_dataset_offline(hf_snapshot):
    source = build_encoder("ctranspath", random_init=True, seed=3).model.backbone
    with torch.no_grad():
        for module in source.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    source.eval()
    state = old_swin_layout(source.state_dict())
    assert "layers.0.downsample.reduction.weight" in state and "layers.3.downsample.reduction.weight" not in state
    spec = get_encoder("ctranspath")
    hf_snapshot("MahmoodLab/hest-bench", {spec.hub_filename: {"model": state}}, COMMIT, repo_type="dataset")
    enc = build_encoder("ctranspath")
    assert enc.weights_id == f"hf:MahmoodLab/hest-bench@{COMMIT}"  # the snapshot commit, not the sub-folder name
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(enc.model.eval()(x), source(x), rtol=0, atol=1e-6)


def test_ctranspath_converter_refuses_a_state_dict_that_is_not_a_swin():
    model = build_encoder("ctranspath", random_init=True).model.backbone
    with pytest.raises(ConfigError, match=r"ctp file: no 'layers.N' keys"):
        HARNESS_CONVERTERS["harness:ctranspath"]({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, model, "ctp file")


def test_missing_dataset_weights_name_the_dataset_page_and_command(hf_snapshot):
    hf_snapshot("other/dataset", {"x.pth": {"a": torch.zeros(1)}}, COMMIT, repo_type="dataset")
    with pytest.raises(WeightsUnavailable) as err:
        get_encoder("ctranspath").resolve_weights()
    msg = str(err.value)
    assert "MahmoodLab/hest-bench" in msg and "--repo-type dataset" in msg and "offline" in msg
    assert "AGPL-3.0" in msg


@pytest.mark.parametrize("fields, message", [
    (dict(weights_format="harness", architecture="vit_small_patch16_224"),
     r"weights_format 'harness' needs an architecture with a converter"),
    (dict(hub_repo_type="space", hub_filename="w.pth", architecture="harness:ctranspath"),
     r"hub_repo_type must be one of model, dataset, got 'space'"),
    (dict(hub_repo_type="dataset", architecture="harness:ctranspath"), r"hub_repo_type 'dataset' needs hub_filename"),
])
def test_bad_harness_fields_are_errors_naming_the_entry(fields, message):
    with pytest.raises(ConfigError, match=rf"encoder 'bad': {message}"):
        EncoderSpec("bad", "hf-hub:org/repo", 768, **fields)


# ------------------------------------------------------------------------------ MUSK (BEiT-3 image path)
TINY_MUSK = dict(img_size=32, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0)
MUSK_LAYER_NAMES = {  # timm name -> BEiT-3 module path (the multiway "A" expert sits before the last part)
    "norm1": "self_attn_layer_norm.A", "norm2": "final_layer_norm.A", "attn.norm": "self_attn.inner_attn_ln.A",
    "attn.proj": "self_attn.out_proj.A", "mlp.fc1": "ffn.A.fc1", "mlp.fc2": "ffn.A.fc2",
    "mlp.norm": "ffn.A.ffn_layernorm",
}


def tiny_musk(seed: int = 0, multiscale: bool = False) -> MuskVision:
    torch.manual_seed(seed)
    model = MuskVision(multiscale=multiscale, **TINY_MUSK).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def beit3_layout(model: MuskVision) -> dict[str, torch.Tensor]:
    """MuskVision -> the published MUSK keys, written out here: A experts, q/k/v split, the position table with its
    two fairseq rows in front, plus the parts an image forward never uses (B experts, text, heads)."""
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {
        "beit3.vision_embed.proj.weight": sd["vit.patch_embed.proj.weight"],
        "beit3.vision_embed.proj.bias": sd["vit.patch_embed.proj.bias"],
        "beit3.vision_embed.cls_token": sd["vit.cls_token"],
        "beit3.vision_embed.mask_token": torch.randn(1, 1, 32, dtype=torch.float64),
        "beit3.encoder.embed_positions.A.weight": torch.cat((torch.randn(2, 32, dtype=torch.float64),
                                                            sd["vit.pos_embed"][0])),
        "beit3.encoder.embed_positions.B.weight": torch.randn(10, 32, dtype=torch.float64),
        "beit3.encoder.layer_norm.A.weight": sd["vit.norm.weight"], "beit3.encoder.layer_norm.A.bias": sd["vit.norm.bias"],
        "beit3.encoder.layer_norm.B.weight": torch.randn(32, dtype=torch.float64),
        "beit3.text_embed.weight": torch.randn(7, 32, dtype=torch.float64),
        "vision_head.weight": torch.randn(32, 32, dtype=torch.float64),
        "language_head.weight": torch.randn(32, 32, dtype=torch.float64), "logit_scale": torch.tensor(2.0),
    }
    for i in range(TINY_MUSK["depth"]):
        base = f"beit3.encoder.layers.{i}"
        q, k, v = sd[f"vit.blocks.{i}.attn.qkv.weight"].chunk(3)
        qb, kb, vb = sd[f"vit.blocks.{i}.attn.qkv.bias"].chunk(3)
        for name, w, b in (("q", q, qb), ("k", k, kb), ("v", v, vb)):
            out[f"{base}.self_attn.{name}_proj.A.weight"], out[f"{base}.self_attn.{name}_proj.A.bias"] = w, b
            out[f"{base}.self_attn.{name}_proj.B.weight"] = torch.randn_like(w)
        for ours, theirs in MUSK_LAYER_NAMES.items():
            for kind in ("weight", "bias"):
                out[f"{base}.{theirs}.{kind}"] = sd[f"vit.blocks.{i}.{ours}.{kind}"]
        out[f"{base}.ffn.B.fc1.weight"] = torch.randn_like(sd[f"vit.blocks.{i}.mlp.fc1.weight"])
    return out


def load_musk(state: dict[str, torch.Tensor], multiscale: bool = False) -> MuskVision:
    from baselines.weights import load_into

    model = MuskVision(multiscale=multiscale, **TINY_MUSK).double().eval()
    load_into(model, HARNESS_CONVERTERS["harness:musk-vision"](state, model, "musk file"), what="musk file")
    return model


def test_musk_published_layout_maps_onto_the_timm_image_path():
    source = tiny_musk()
    loaded = load_musk(beit3_layout(source))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=1e-12)
    # q, k and v land in timm's fused qkv in that order (distinct constants)
    state = beit3_layout(source)
    for n, value in zip("qkv", (1.0, 2.0, 3.0)):
        state[f"beit3.encoder.layers.0.self_attn.{n}_proj.A.weight"] = torch.full((32, 32), value, dtype=torch.float64)
    qkv = load_musk(state).vit.blocks[0].attn.qkv.weight.detach()
    assert [float(part.mean()) for part in qkv.chunk(3)] == [1.0, 2.0, 3.0]


def test_musk_image_path_is_a_prenorm_vit_with_sub_layernorms():
    """One block written out: x + proj(LN_sub(attn(LN1 x))), then + fc2(LN_sub(gelu(fc1(LN2 x)))); final LN; CLS."""
    model = tiny_musk()
    vit = model.vit
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    t = torch.cat((vit.cls_token.expand(2, -1, -1), vit.patch_embed.proj(x).flatten(2).transpose(1, 2)), 1) + vit.pos_embed
    for blk in vit.blocks:
        h = blk.norm1(t)
        q, k, v = blk.attn.qkv(h).unflatten(-1, (3, 4, 8)).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1) @ v
        t = t + blk.attn.proj(blk.attn.norm(a.transpose(1, 2).flatten(2)))
        t = t + blk.mlp.fc2(blk.mlp.norm(F.gelu(blk.mlp.fc1(blk.norm2(t)))))
    with torch.no_grad():
        torch.testing.assert_close(model(x), vit.norm(t)[:, 0], rtol=0, atol=1e-12)
    assert isinstance(blk.attn.norm, torch.nn.LayerNorm) and blk.attn.norm.eps == 1e-5


def test_musk_multiscale_concatenates_the_image_and_the_mean_of_its_upsampled_tiles():
    model = tiny_musk(multiscale=True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    up = F.interpolate(x.float(), size=64, mode="bicubic").double()
    tiles = [up[..., r:r + 32, c:c + 32] for r in (0, 32) for c in (0, 32)]
    with torch.no_grad():
        expected = torch.cat((model.cls(x.float().double()), torch.stack([model.cls(t) for t in tiles]).mean(0)), -1)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
    assert get_encoder("musk-ms").embed_dim == 2 * get_encoder("musk").embed_dim == 2048


def test_musk_position_table_of_another_grid_is_resampled_and_bad_files_are_refused():
    state = beit3_layout(tiny_musk())
    state["beit3.encoder.embed_positions.A.weight"] = torch.randn(2 + 1 + 16, 32, dtype=torch.float64)  # 4 x 4 grid
    model = load_musk(state)
    assert model.vit.pos_embed.shape == (1, 1 + 4, 32)  # the built 2 x 2 grid
    torch.testing.assert_close(model.vit.pos_embed[0, 0], state["beit3.encoder.embed_positions.A.weight"][2],
                               rtol=0, atol=0)  # the class row is kept, the fairseq rows dropped
    with pytest.raises(ConfigError, match=r"musk file: no beit3.encoder.embed_positions.A.weight"):
        load_musk({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)})
    state = beit3_layout(tiny_musk())
    state["beit3.encoder.layers.0.self_attn.rel_bias.A.weight"] = torch.zeros(3)
    with pytest.raises(ConfigError, match=r"no place in MUSK's image path: \['encoder.layers.0.self_attn.rel_bias.A"):
        load_musk(state)
    del state["beit3.encoder.layers.0.self_attn.rel_bias.A.weight"], state["beit3.encoder.layers.1.self_attn.v_proj.A.bias"]
    with pytest.raises(ConfigError, match=r"layer 1 lacks \['v'\]_proj.A.bias"):
        load_musk(state)
