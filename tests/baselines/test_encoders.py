"""Encoder registry, weight lookup and transforms (baselines/encoders.py, baselines/weights.py).

Nothing is downloaded: Hub loading is tested against a tiny timm model that the
test writes into a temporary Hugging Face cache, loaded through the real
`hf-hub:` path with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from baselines.encoders import (
    EncoderSpec,
    build_encoder,
    get_encoder,
    register_encoder,
    register_encoder_from_config,
    spec_from_config,
)
from baselines.weights import RANDOM_INIT, WeightsUnavailable, load_state_dict_file, random_source
from bench.common.errors import ConfigError
from bench.common.files import sha256_file

TINY_VIT_ARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, reg_tokens=2,
                     no_embed_class=True, num_classes=0)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_small_patch16_224", pretrained=False, **TINY_VIT_ARGS).eval()


def cls_plus_mean(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Virchow2's embedding computed by hand: class token ++ mean of patch tokens (registers excluded)."""
    tokens = model.forward_features(x)  # (B, 1 + 2 registers + 16 patches, 32)
    assert tokens.shape[1] == 1 + 2 + (32 // 8) ** 2
    return torch.cat([tokens[:, 0], tokens[:, 3:].mean(1)], dim=-1)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A tiny ViT saved in the Hugging Face cache layout, the cache pointed at by env and constants."""
    import huggingface_hub.constants as hf_constants
    from timm.models import save_for_hf

    cache = tmp_path / "hf-cache"
    repo = cache / "models--test-org--tiny-vit"
    model = tiny_vit(seed=3)
    save_for_hf(model, repo / "snapshots" / COMMIT, model_args=TINY_VIT_ARGS, safe_serialization=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the environment once at import: point its constants at the test cache too
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return model


# ------------------------------------------------------------------------------ built-in specs


@pytest.mark.parametrize("name,dim", [("resnet18-trunc", 256), ("resnet50-trunc", 1024), ("resnet50", 2048)])
def test_resnets_give_their_declared_dimension_and_truncation(name, dim):
    enc = build_encoder(name, random_init=True, input_size=32)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        out = enc.model(x)
    assert out.shape == (2, dim)
    assert enc.weights_id == RANDOM_INIT and enc.precision == "fp32"
    assert not any(p.requires_grad for p in enc.model.parameters()) and not enc.model.training
    bb = enc.model.backbone
    if name.endswith("-trunc"):
        # independent computation: the stem and layers 1-3 by hand, then the spatial mean
        assert isinstance(bb.layer4, torch.nn.Identity)
        with torch.inference_mode():
            h = bb.maxpool(bb.act1(bb.bn1(bb.conv1(x))))
            ref = bb.layer3(bb.layer2(bb.layer1(h))).mean(dim=(2, 3))
        torch.testing.assert_close(out, ref)


def test_foundation_model_specs_keep_their_published_facts():
    """Sizes and parameter counts are checked on the meta device in test_encoder_registry.py; here the
    facts every earlier feature file was made with (their fingerprints must not move)."""
    published = {"uni": 1024, "uni2-h": 1536, "virchow2": 2560, "h-optimus-0": 1536, "gigapath": 1536}
    for name, dim in published.items():
        spec = get_encoder(name)
        assert spec.gated and spec.is_hub and spec.embed_dim == dim
    assert get_encoder("virchow2").pooling == "cls+mean"
    assert get_encoder("h-optimus-0").mean == (0.707223, 0.578729, 0.703617)
    assert get_encoder("h-optimus-0").std == (0.211883, 0.230117, 0.177517)
    assert get_encoder("uni2-h").timm_kwargs["mlp_ratio"] == 2.66667 * 2
    assert get_encoder("gigapath").resize_to == 256 and get_encoder("gigapath").interpolation == "bicubic"


def test_unknown_encoder_lists_close_names():
    with pytest.raises(ConfigError, match=r"unknown encoder 'resnet18-trnc'; did you mean: resnet18-trunc"):
        get_encoder("resnet18-trnc")


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    spec = get_encoder("resnet18-trunc").with_input_size(32)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = spec.create_model(random_init=True, seed=7)
    assert torch.equal(torch.rand(1), expected_next)  # model building consumed no global randomness
    b = spec.create_model(random_init=True, seed=7)
    c = spec.create_model(random_init=True, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["backbone.conv1.weight"], sc["backbone.conv1.weight"])
    assert a.training and all(p.requires_grad for p in a.parameters())  # trainable for the E2E trainer
    assert a.weights_id == RANDOM_INIT and a.init_seed == 7


# ------------------------------------------------------------------------------ weights


def test_hub_snapshot_loads_offline_through_hf_hub_path(hub_cache, registry_guard):
    spec = register_encoder_from_config("tiny-hub", {
        "source": "hf-hub:test-org/tiny-vit", "embed_dim": 64, "input_size": 32, "pooling": "cls+mean",
        "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]})
    source = spec.resolve_weights()
    assert source.kind == "hf-cache" and source.hub_ref == f"test-org/tiny-vit@{COMMIT}"
    enc = build_encoder("tiny-hub")
    assert enc.weights_id == f"hf:test-org/tiny-vit@{COMMIT}"
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(enc.model(x), cls_plus_mean(hub_cache, x), rtol=0, atol=1e-6)


def test_explicit_safetensors_file_equals_saved_model(tmp_path, registry_guard):
    source_model = tiny_vit(seed=5)
    path = tmp_path / "weights.safetensors"
    save_file(source_model.state_dict(), str(path))
    register_encoder(EncoderSpec("tiny-file", "hf-hub:test-org/not-cached", 64, input_size=32, pooling="cls+mean",
                                 architecture="vit_small_patch16_224", architecture_kwargs=TINY_VIT_ARGS))
    enc = build_encoder("tiny-file", path)
    assert enc.weights_id == f"sha256:{sha256_file(path)}"
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(enc.model(x), cls_plus_mean(source_model, x), rtol=0, atol=1e-6)


def test_full_resnet_checkpoint_loads_into_truncated_encoder(tmp_path):
    """A torchvision-style full ResNet-18 file (layer4 + fc) fits resnet18-trunc; the extra stages are dropped."""
    torch.manual_seed(1)
    full = timm.create_model("resnet18", num_classes=1000).eval()
    path = tmp_path / "resnet18.pt"
    torch.save(full.state_dict(), path)  # a plain tensor pickle: allowed with weights_only
    enc = build_encoder("resnet18-trunc", path, input_size=32)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        h = full.maxpool(full.act1(full.bn1(full.conv1(x))))
        ref = full.layer3(full.layer2(full.layer1(h))).mean(dim=(2, 3))  # (2, 256)
        torch.testing.assert_close(enc.model(x), ref)


class Payload:
    """An arbitrary object: unpickling it could run code, so it must be refused."""

    def __reduce__(self):
        return (print, ("pickle payload ran",))


def test_pickle_with_arbitrary_objects_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": torch.zeros(1), "extra": Payload()}, f, protocol=2)
    with pytest.raises(ConfigError, match="refused to load .*evil.pt.*weights_only"):
        load_state_dict_file(path)
    with pytest.raises(ConfigError, match="refused"):
        build_encoder("resnet18-trunc", path, input_size=32)
    assert "payload ran" not in capsys.readouterr().out


def test_weights_that_do_not_fit_are_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file(tiny_vit().state_dict(), str(path))
    with pytest.raises(ConfigError, match="do not fit its architecture: .* missing keys"):
        build_encoder("resnet18-trunc", path, input_size=32)
    with pytest.raises(ConfigError, match="suffix '.npz'"):
        build_encoder("resnet18-trunc", tmp_path.joinpath("w.npz").write_bytes(b"x") and tmp_path / "w.npz")


def test_gated_model_without_cache_or_network_explains_how_to_provide_weights(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    with pytest.raises(WeightsUnavailable) as err:
        get_encoder("uni").resolve_weights()
    msg = str(err.value)
    for part in ("'uni'", "MahmoodLab/uni", "offline", "request access", "HF_TOKEN", "--weights", "--random-init"):
        assert part in msg, part
    assert "hf_secret_token_value" not in msg


def test_random_init_and_weights_together_are_an_error(tmp_path):
    with pytest.raises(ConfigError, match="either weights"):
        get_encoder("resnet18-trunc").resolve_weights(tmp_path / "w.safetensors", random_init=True)


# ------------------------------------------------------------------------------ user encoders


def test_register_from_config_builds_a_timm_model(registry_guard):
    spec = register_encoder_from_config("tiny-resnet", {
        "source": "resnet10t", "embed_dim": 512, "input_size": 32, "pooling": "avg",
        "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "precision": "bf16"})
    enc = build_encoder("tiny-resnet", random_init=True)
    assert enc.precision == "bf16" and enc.spec is spec
    with torch.inference_mode():
        assert enc.model(torch.randn(1, 3, 32, 32)).shape == (1, 512)
    with pytest.raises(ConfigError, match="'tiny-resnet' is already registered"):
        register_encoder_from_config("tiny-resnet", {"source": "resnet10t", "embed_dim": 512})


@pytest.mark.parametrize("config,message", [
    ({"source": "resnet10t", "embed_dim": 512, "colour_space": 3, "pooling_mode": "avg"},
     r"'mine' has unknown keys 'colour_space', 'pooling_mode' \(did you mean 'pooling'\?\)"),
    ({"source": "resnet10t"}, "lacks embed_dim"),
    ({"embed_dim": 8}, "lacks source"),
    ({"source": "resnet10t", "embed_dim": "512"}, "'embed_dim' must be a int, got '512'"),
    ({"source": "resnet10t", "embed_dim": 512, "mean": [0.5, 0.5]}, "mean must be 3 finite numbers"),
    ({"source": "resnet10t", "embed_dim": 512, "std": [0.5, 0.0, 0.5]}, "std must be 3 finite numbers > 0"),
    ({"source": "resnet10t", "embed_dim": 512, "pooling": "max"}, "pooling must be one of"),
    ({"source": "hf-hub:only-org", "embed_dim": 512}, "not of the form 'hf-hub:<org>/<repo>'"),
    ({"source": "resnet10t", "embed_dim": 512, "timm_kwargs": {"trust_remote_code": True}},
     "may not set 'trust_remote_code'"),
    ({"source": "resnet10t", "embed_dim": 512, "timm_kwargs": {"mlp_layer": "os.system"}}, "not a known layer"),
])
def test_bad_encoder_config_names_the_bad_key(config, message):
    with pytest.raises(ConfigError, match=message):
        spec_from_config("mine", config, where="suite.toml")


def test_wrong_embed_dim_is_caught_when_built(registry_guard):
    register_encoder_from_config("wrong-dim", {"source": "resnet10t", "embed_dim": 100, "input_size": 32,
                                               "pooling": "avg"})
    with pytest.raises(ConfigError, match=r"produces embeddings of shape \(512,\) but its spec says embed_dim = 100"):
        build_encoder("wrong-dim", random_init=True)


def test_unknown_timm_architecture_is_named(registry_guard):
    register_encoder_from_config("typo", {"source": "resnet10x", "embed_dim": 512})
    with pytest.raises(ConfigError, match="timm has no model 'resnet10x'; did you mean"):
        build_encoder("typo", random_init=True)


# ------------------------------------------------------------------------------ transform


def test_transform_normalises_like_numpy_and_accepts_one_patch_or_a_batch():
    spec = EncoderSpec("t", "resnet18", 8, input_size=16, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.125))
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)
    out = spec.transform()(patches)
    ref = (patches.astype(np.float64) / 255 - np.array(spec.mean)) / np.array(spec.std)  # (B, H, W, 3)
    assert out.shape == (4, 3, 16, 16) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), ref.transpose(0, 3, 1, 2), atol=1e-5)
    np.testing.assert_allclose(spec.transform()(patches[0]).numpy(), out[:1].numpy())


def test_transform_resizes_then_centre_crops():
    # GigaPath-style: resize to 20, centre-crop 16; a 20 px patch is only cropped, exactly at the centre
    spec = EncoderSpec("t", "resnet18", 8, input_size=16, resize_to=20, mean=(0, 0, 0), std=(1, 1, 1))
    patch = np.zeros((20, 20, 3), dtype=np.uint8)
    patch[2:18, 2:18] = 255
    out = spec.transform()(patch)
    assert out.shape == (1, 3, 16, 16) and torch.all(out == 1.0)
    # a 40 px patch of a constant colour stays that colour after the (antialiased) resize
    flat = np.full((40, 40, 3), 128, dtype=np.uint8)
    torch.testing.assert_close(spec.transform()(flat), torch.full((1, 3, 16, 16), 128 / 255))


def test_transform_fast_path_is_bit_identical_to_the_general_one():
    """Patches already at input size skip the resize: same float32 values as the general path
    (channel-last float view, in-place normalise, contiguous copy), so features do not change."""
    spec = get_encoder("resnet18-trunc")
    transform = spec.transform()
    patches = torch.from_numpy(np.random.default_rng(1).integers(0, 256, size=(3, 224, 224, 3), dtype=np.uint8))
    mean = torch.tensor(transform.mean).mul_(255).view(1, 3, 1, 1)
    scale = torch.tensor(transform.std).mul_(255).reciprocal_().view(1, 3, 1, 1)
    general = patches.permute(0, 3, 1, 2).float().sub_(mean).mul_(scale).contiguous()
    fast = transform(patches)
    assert fast.is_contiguous() and torch.equal(fast, general)


def test_transform_refuses_float_input():
    with pytest.raises(Exception, match="uint8 RGB"):
        get_encoder("resnet18-trunc").transform()(np.zeros((8, 8, 3), dtype=np.float32))


def test_downloaded_snapshot_folder_loads_without_the_cache(hub_cache, tmp_path, registry_guard):
    """`--weights DIR` with config.json + model.safetensors (as `hf download --local-dir` leaves them)."""
    import huggingface_hub.constants as hf_constants

    snapshot = Path(hf_constants.HF_HUB_CACHE) / "models--test-org--tiny-vit" / "snapshots" / COMMIT
    register_encoder_from_config("tiny-dir", {"source": "hf-hub:elsewhere/tiny-vit", "embed_dim": 32,
                                              "input_size": 32, "pooling": "cls"})
    enc = build_encoder("tiny-dir", snapshot)
    assert enc.weights_id == f"sha256:{sha256_file(snapshot / 'model.safetensors')}"
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(enc.model(x), hub_cache.forward_features(x)[:, 0], rtol=0, atol=1e-6)
