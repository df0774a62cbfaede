"""FEATHER, CHIEF and PRISM slide-encoder architectures: tiny random-init instances, meta-device
published sizes, and checkpoints written by the test with the authors' key names."""

from __future__ import annotations

import math

import pytest
import torch

from baselines.encoders_slide import SLIDE_ENCODERS
from baselines.slide import build_slide_arch
from bench.common.errors import ConfigError

NAMES = ("feather", "feather-uni2", "chief", "prism")


def _tiny(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_slide_arch(name, config="tiny").double().eval()


def _bag(n: int, d: int = 16, b: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name", NAMES)
def test_output_shape_and_in_dim_override(name):
    enc = build_slide_arch(name, config="tiny", in_dim=12).eval()
    z = enc(torch.randn(3, 7, 12))
    assert z.shape == (3, enc.embed_dim)
    assert torch.isfinite(z).all()
    assert enc.uses_coords is False  # none of the three reads patch positions: coords=None is accepted


@pytest.mark.parametrize("name", NAMES)
def test_padded_bag_equals_unpadded_bag(name):
    enc = _tiny(name)
    x = _bag(5)
    padded = torch.cat([x, 100.0 * _bag(3, seed=9)], dim=1)  # loud values in the padding
    mask = torch.tensor([[True] * 5 + [False] * 3])
    with torch.no_grad():
        ref, out = enc(x), enc(padded, mask=mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_batch_of_two_bags_equals_each_bag_alone(name):
    enc = _tiny(name)
    a, b = _bag(4, seed=2), _bag(6, seed=3)
    x = torch.zeros(2, 6, 16, dtype=torch.float64)
    x[0, :4], x[1] = a[0], b[0]
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    with torch.no_grad():
        out = enc(x, mask=mask)
        torch.testing.assert_close(out[0], enc(a)[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(out[1], enc(b)[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_permutation_invariant(name):
    enc = _tiny(name)
    x = _bag(9)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(enc(x[:, perm]), enc(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ("feather", "chief", "prism"))
def test_attention_is_a_distribution_zero_at_padding(name):
    enc = _tiny(name)
    mask = torch.tensor([[True] * 5 + [False] * 2])
    with torch.no_grad():
        enc(_bag(7), mask=mask)
    a = enc.attention()
    assert a.shape == (1, 7)
    assert torch.all(a[0, 5:] == 0)
    assert math.isclose(float(a.sum()), 1.0, rel_tol=1e-12)


# ---- equivalence with the authors' formulas, written out independently of the modules --------------


def _gated_scores(p: dict[str, torch.Tensor], prefix: str, h: torch.Tensor) -> torch.Tensor:
    a = torch.tanh(h @ p[prefix + "attention_a.0.weight"].T + p[prefix + "attention_a.0.bias"])
    g = torch.sigmoid(h @ p[prefix + "attention_b.0.weight"].T + p[prefix + "attention_b.0.bias"])
    return ((a * g) @ p[prefix + "attention_c.weight"].T + p[prefix + "attention_c.bias"])[..., 0]


def test_feather_is_attention_pooling_of_the_relu_embedding():
    enc = _tiny("feather")
    p = enc.state_dict()
    x = _bag(6)[0]
    h = torch.relu(x @ p["patch_embed.0.weight"].T + p["patch_embed.0.bias"])
    expected = torch.softmax(_gated_scores(p, "global_attn.", h), dim=0) @ h
    with torch.no_grad():
        torch.testing.assert_close(enc(x[None])[0], expected, rtol=0, atol=1e-12)


def test_chief_embedding_weights_the_input_features_not_the_projection():
    enc = _tiny("chief")
    p = enc.state_dict()
    x = _bag(6)[0]
    h = torch.relu(x @ p["attention_net.0.weight"].T + p["attention_net.0.bias"])
    expected = torch.softmax(_gated_scores(p, "attention_net.3.", h), dim=0) @ x  # WSI_feature = A @ h_ori
    with torch.no_grad():
        z = enc(x[None])[0]
    assert z.shape == (16,)  # the input size, not the 8-d projection
    torch.testing.assert_close(z, expected, rtol=0, atol=1e-12)


def _ln(x, p, prefix):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], p[prefix + "weight"], p[prefix + "bias"])


def _ff(x, p, prefix):
    u = _ln(x, p, prefix + "norm.") @ p[prefix + "net.0.weight"].T + p[prefix + "net.0.bias"]
    value, gate = u.chunk(2, dim=-1)
    return (value * torch.nn.functional.gelu(gate)) @ p[prefix + "net.2.weight"].T + p[prefix + "net.2.bias"]


def _softmax_attention(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v


def test_prism_matches_a_written_out_perceiver_with_cached_keys():
    """The authors' loop: layers <= 1 compute K/V from the tiles, later layers reuse the cached K/V;
    all layers reuse layer 0's self-attention stack; image embedding = cls_norm(latent 0)."""
    enc = _tiny("prism")
    p = enc.state_dict()
    heads, depth, tf_depth = 2, 3, 2
    ctx = _bag(7)[0]
    x = p["perceiver.latents"].clone()
    kv = None
    for i in range(depth):
        xa = f"perceiver.layers.{min(i, 1)}.xattn."
        q = _ln(x, p, xa + "xattn.x_norm.") @ p[xa + "xattn.to_q.weight"].T
        if i <= 1:
            kv = (ctx @ p[xa + "xattn.to_kv.weight"].T).chunk(2, dim=-1)
        x = _softmax_attention(q, *kv) @ p[xa + "xattn.to_out.weight"].T + x  # one cross-attention head
        cls_weights = torch.softmax(q[0] @ kv[0].T / math.sqrt(q.shape[-1]), dim=0)  # latent 0 over the tiles
        x = _ff(x, p, xa + "ff.") + x
        for j in range(tf_depth):
            tf = f"perceiver.layers.0.tf.{j}."
            y = _ln(x, p, tf + "mhsa.norm.")
            q, k, v = (y @ p[tf + "mhsa.mha.in_proj_weight"].T).chunk(3, dim=-1)
            split = lambda t: t.view(t.shape[0], heads, -1).transpose(0, 1)  # noqa: E731
            att = _softmax_attention(split(q), split(k), split(v)).transpose(0, 1).reshape(x.shape)
            x = att @ p[tf + "mhsa.mha.out_proj.weight"].T + x
            x = _ff(x, p, tf + "ff.") + x
    expected = _ln(x[0], p, "cls_norm.")
    with torch.no_grad():
        torch.testing.assert_close(enc(ctx[None])[0], expected, rtol=0, atol=1e-10)
        latents = enc.forward_latents(ctx[None])
    torch.testing.assert_close(latents["image_latents"][0], _ln(x[1:], p, "img_norm."), rtol=0, atol=1e-10)
    assert latents["image_latents"].shape == (1, 3, 8)
    torch.testing.assert_close(enc.attention()[0], cls_weights, rtol=0, atol=1e-10)  # the last layer's


# ---- loading the authors' checkpoints ---------------------------------------------------------------


def _authors_checkpoint(name: str, enc: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`enc`'s weights under the authors' key names, with the parts this port leaves out."""
    own = {k: v.clone() for k, v in enc.state_dict().items()}
    if name.startswith("feather"):  # saved from the Hub ABMILModel wrapper (.model), with a task head
        sd = {"model." + k: v for k, v in own.items()}
        sd["model.classifier.weight"], sd["model.classifier.bias"] = torch.zeros(2, 8), torch.zeros(2)
        return sd
    if name == "chief":  # strict CHIEF_pretraining.pth also holds the text branch and the heads
        sd = dict(own)
        sd.update({"organ_embedding": torch.zeros(19, 768), "classifiers.weight": torch.zeros(2, 8),
                   "instance_classifiers.0.weight": torch.zeros(2, 8), "att_head.fc1.weight": torch.zeros(6, 8),
                   "text_to_vision.0.weight": torch.zeros(8, 768)})
        return sd
    # PRISM: under image_resampler., one copy per shared tensor (as a Hub save keeps), plus the text side
    seen: set[int] = set()
    sd = {}
    for key, tensor in enc.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            sd["image_resampler." + key] = tensor.detach().clone()
    sd.update({"text_decoder.model.biogpt.embed_tokens.weight": torch.zeros(4, 3),
               "img_to_latents.to_latents.weight": torch.zeros(5, 8), "temperature": torch.tensor(2.6)})
    return sd


@pytest.mark.parametrize("name", NAMES)
def test_load_published_round_trips_the_authors_keys(name):
    src, dst = _tiny(name, seed=0), _tiny(name, seed=1)
    x = _bag(5)
    with torch.no_grad():
        assert not torch.allclose(src(x), dst(x))
        dst.load_published(_authors_checkpoint(name, src))
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_load_published_names_a_missing_or_unexpected_key(name):
    enc = _tiny(name)
    sd = _authors_checkpoint(name, enc)
    missing = next(k for k in sd if "attention_c.bias" in k or k.endswith("cls_norm.bias"))
    short = {k: v for k, v in sd.items() if k != missing}
    with pytest.raises(ConfigError, match="missing") as err:
        enc.load_published(short)
    own_name = missing.removeprefix("model.").removeprefix("image_resampler.")  # reported in this module's names
    assert own_name in str(err.value)
    with pytest.raises(ConfigError, match="unexpected.*not_a_layer"):
        enc.load_published({**sd, "not_a_layer.weight": torch.zeros(1)})


def test_prism_load_refuses_shared_aliases_that_disagree():
    enc = _tiny("prism")
    sd = {"image_resampler." + k: v.clone() for k, v in enc.state_dict().items()}  # every alias
    enc.load_published(sd)  # all aliases, equal: fine
    key = "image_resampler.perceiver.layers.2.xattn.xattn.to_q.weight"  # alias of layer 1's
    sd[key] = sd[key] + 1.0
    with pytest.raises(ConfigError, match="shared tensor"):
        enc.load_published(sd)


# ---- published sizes on the meta device --------------------------------------------------------------

# derived from the authors' configs (see each module's docstring); no card states these counts
PUBLISHED_PARAMS = {"feather": 788_097, "feather-uni2": 1_181_313, "chief": 656_641, "prism": 99_037_440}


@pytest.mark.parametrize("name", NAMES)
def test_published_config_on_meta_has_the_registry_sizes(name):
    with torch.device("meta"):
        enc = build_slide_arch(name)
    spec = SLIDE_ENCODERS.get(name)
    assert (enc.in_dim, enc.embed_dim) == (spec.patch_dim, spec.embed_dim)
    assert sum(p.numel() for p in enc.parameters()) == PUBLISHED_PARAMS[name]
    assert all(p.device.type == "meta" for p in enc.parameters())
    with torch.device("meta"):
        z = enc(torch.empty(2, 11, spec.patch_dim))
    assert z.shape == (2, spec.embed_dim)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_override_and_config_are_errors_naming_them(name):
    with pytest.raises(ConfigError, match="depthh"):
        build_slide_arch(name, config="tiny", depthh=3)
    with pytest.raises(ConfigError, match="'huge'"):
        build_slide_arch(name, config="huge")
