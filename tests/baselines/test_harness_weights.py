"""Published checkpoints of the architectures built here (weights_format "harness"): CONCH v1.5's vision tower
and CTransPath.

The checkpoints are written by the tests in the authors' layout: CONCH v1.5's `pytorch_model_vision.bin` keeps
the module's names but a position grid of another size; CHIEF_CTransPath.pth is timm_ctp 0.5.4's Swin layout
(downsample at the end of a stage, attn_mask buffers), made here by an explicit inverse mapping and wrapped in a
'model' key. The CTransPath file goes through the real registry entry from a Hub *dataset* repo in a local HF
cache, offline. Against the authors' own modules (TRIDENT a91fa84, timm_ctp 0.5.4), float64, random weights, the
session check measured: CONCH v1.5 (tiny sizes) <= 6.4e-16 at 224/256/448 px, CTransPath (full size) 0.0.
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


def dataset_cache(tmp_path, monkeypatch, repo: str, filename: str, obj) -> None:
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf-cache"
    folder = cache / f"datasets--{repo.replace('/', '--')}"
    target = folder / "snapshots" / COMMIT / filename
    target.parent.mkdir(parents=True)
    torch.save(obj, target)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


def test_ctranspath_old_layout_loads_from_a_hub_dataset_offline(tmp_path, monkeypatch):
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
    dataset_cache(tmp_path, monkeypatch, "MahmoodLab/hest-bench", spec.hub_filename, {"model": state})
    enc = build_encoder("ctranspath")
    assert enc.weights_id == f"hf:MahmoodLab/hest-bench@{COMMIT}"  # the snapshot commit, not the sub-folder name
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(enc.model.eval()(x), source(x), rtol=0, atol=1e-6)


def test_ctranspath_converter_refuses_a_state_dict_that_is_not_a_swin():
    model = build_encoder("ctranspath", random_init=True).model.backbone
    with pytest.raises(ConfigError, match=r"ctp file: no 'layers.N' keys"):
        HARNESS_CONVERTERS["harness:ctranspath"]({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, model, "ctp file")


def test_missing_dataset_weights_name_the_dataset_page_and_command(tmp_path, monkeypatch):
    dataset_cache(tmp_path, monkeypatch, "other/dataset", "x.pth", {"a": torch.zeros(1)})
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
