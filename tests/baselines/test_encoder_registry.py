"""The encoder registry file (baselines/encoders.toml): every architecture built on the meta device
(no memory, no weights, no download) gives the embedding and input size its entry claims; bad entries
name the entry and the field; the `hub_filename` and transformers-format paths; slide-encoder pairing."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import timm
import torch

from baselines.encoders import (
    ENCODERS,
    REGISTRY_FILE,
    EncoderSpec,
    build_encoder,
    check_on_meta,
    get_encoder,
    load_registry_file,
    register_encoder,
)
from baselines.encoders_slide import SLIDE_ENCODERS, check_pairing, require_runnable
from baselines.weights import WeightsUnavailable, random_source
from bench.common.errors import ConfigError

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
# Parameter counts published on the model cards / papers (the meta build must agree within 1%).
PUBLISHED_PARAMS = {"uni": 303e6, "uni2-h": 681e6, "virchow": 632e6, "virchow2": 632e6, "h-optimus-0": 1.13e9,
                    "gigapath": 1.13e9}


def test_registry_has_the_issues_encoders_each_with_its_facts_and_source():
    names = set(ENCODERS.names())
    assert len(names) >= 24
    for required in ("uni", "uni2-h", "virchow", "virchow2", "gigapath", "h-optimus-0", "h-optimus-1", "h0-mini",
                     "phikon", "phikon-v2", "hibou-b", "hibou-l", "midnight-12k", "gpfm", "kaiko-vits16",
                     "kaiko-vitb8", "kaiko-vitl14", "lunit-vits8", "resnet50-trunc", "resnet18-trunc", "conch-v15",
                     "ctranspath", "musk"):
        assert required in names, required
    for name, spec in ENCODERS.items():
        assert spec.reference and spec.source_note and spec.licence and spec.magnification, name
        if spec.is_hub:
            assert spec.reference.startswith("https://huggingface.co/"), name
        if spec.revision is not None:
            assert len(spec.revision) == 40 and int(spec.revision, 16) >= 0, name


@pytest.mark.parametrize("name", sorted(ENCODERS.names()))
def test_meta_device_build_gives_the_claimed_embedding_and_input_size(name):
    spec = get_encoder(name)
    dim, params = check_on_meta(spec)
    assert dim == spec.embed_dim
    if name in PUBLISHED_PARAMS:
        assert abs(params - PUBLISHED_PARAMS[name]) / PUBLISHED_PARAMS[name] < 0.01, (name, params)
    # the input size: check_on_meta ran one forward at spec.input_size (a fixed-size ViT refuses others)


def test_cls_plus_mean_entries_are_twice_the_token_width():
    for name in ("virchow", "virchow2", "h0-mini"):
        spec = get_encoder(name)
        with torch.device("meta"):
            backbone, _ = spec._backbone(random_source(), 0, None)
        assert spec.pooling == "cls+mean" and 2 * backbone.embed_dim == spec.embed_dim, name
    assert get_encoder("virchow2").timm_kwargs["mlp_layer"] == "timm.layers.SwiGLUPacked"


def write_registry(tmp_path, body: str):
    path = tmp_path / "encoders.toml"
    path.write_text(body)
    return path


def test_an_embed_dim_the_meta_build_contradicts_names_the_entry_and_field(tmp_path):
    path = write_registry(tmp_path, '[encoders.my-vit]\nsource = "vit_small_patch16_224"\nembed_dim = 768\n'
                                    'pooling = "cls"\nreference = "x"\n')
    (spec,) = load_registry_file(path)
    with pytest.raises(ConfigError, match=r"encoder 'my-vit': embed_dim = 768 but its architecture .* gives \(384,\)"):
        check_on_meta(spec)


def test_an_input_size_the_architecture_cannot_take_is_named(tmp_path):
    path = write_registry(tmp_path, '[encoders.fixed]\nsource = "vit_small_patch16_224"\nembed_dim = 384\n'
                                    'pooling = "cls"\ninput_size = 96\n')
    with pytest.raises(ConfigError, match=r"encoder 'fixed': input_size = 96 does not fit"):
        check_on_meta(load_registry_file(path)[0])


@pytest.mark.parametrize("body,pattern", [
    ('mean = [0.5, 0.5]', r"encoders.toml: encoder 'bad': mean must be 3 finite numbers"),
    ('pooling = "max"', r"encoder 'bad': pooling must be one of"),
    ('weights_format = "onnx"', r"encoder 'bad': weights_format must be one of timm, transformers, torch-hub, harness, custom"),
    ('embdim = 3', r"encoder 'bad' has unknown keys 'embdim'"),
    ('licence = 3', r"encoder 'bad' key 'licence' must be a str"),
])
def test_bad_fields_name_the_entry_and_the_field(tmp_path, body, pattern):
    path = write_registry(tmp_path, f'[encoders.bad]\nsource = "resnet18"\nembed_dim = 512\n{body}\n')
    with pytest.raises(ConfigError, match=pattern):
        load_registry_file(path)


def test_the_shipped_file_is_what_was_registered():
    assert {s.name for s in load_registry_file(REGISTRY_FILE)} == set(ENCODERS.names())
    assert REGISTRY_FILE.name == "encoders.toml" and REGISTRY_FILE.parent.name == "baselines"


def test_transformers_checkpoints_are_looked_up_on_the_hub_and_random_init_builds(hf_snapshot):
    """Converted formats (baselines/convert.py) resolve like timm Hub repos; offline without a cache the message
    names the pinned repo, the licence and the model page."""
    hf_snapshot("other/repo", {"x.pth": {"a": torch.zeros(1)}}, COMMIT)
    with pytest.raises(WeightsUnavailable, match=r"'phikon' from Hugging Face repo owkin/phikon.*offline.*"
                                                 r"Licence of 'phikon': other"):
        get_encoder("phikon").resolve_weights()
    assert get_encoder("phikon").resolve_weights(random_init=True).kind == "random-init"


def test_attentional_pooler_is_one_query_softmax_attention_written_out():
    """CONCH v1.5's pooler against the formula: LN'd query and tokens, per-head softmax(q k^T / sqrt(d_h)) v."""
    from baselines.encoders import _AttentionalPooler

    torch.manual_seed(0)
    pool = _AttentionalPooler(d_model=8, context_dim=12, n_head=2, n_queries=1).double()
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    q = pool.to_q(pool.ln_q(pool.query))  # (1, 8)
    k, v = pool.to_kv(pool.ln_k(x)).chunk(2, dim=-1)  # (3, 5, 8)
    heads = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        att = torch.softmax(torch.einsum("qd,btd->bqt", q[:, sl], k[..., sl]) / 2.0, dim=-1)  # sqrt(4) = 2
        heads.append(torch.einsum("bqt,btd->bqd", att, v[..., sl]))
    expected = pool.to_out(torch.cat(heads, dim=-1))
    torch.testing.assert_close(pool(x), expected, rtol=0, atol=1e-12)
    # permuting the tokens leaves the pooled embedding unchanged
    torch.testing.assert_close(pool(x[:, torch.randperm(5)]), expected, rtol=0, atol=1e-12)


def test_architectures_built_here_name_the_published_keys():
    conch, ctp = get_encoder("conch-v15"), get_encoder("ctranspath")
    assert (conch.embed_dim, conch.input_size, ctp.embed_dim, ctp.input_size) == (768, 448, 768, 224)
    with torch.device("meta"):
        tower, _ = conch._backbone(random_source(), 0, None)
        swin, _ = ctp._backbone(random_source(), 0, None)
    keys = set(tower.state_dict())
    assert {"trunk.pos_embed", "trunk.blocks.23.ls1.gamma", "attn_pool_contrast.query", "attn_pool_contrast.to_kv.weight",
            "ln_contrast.weight"} <= keys
    assert tower.attn_pool_contrast.to_kv.weight.shape == (2 * 768, 1024)  # context 1024 (ViT-L) -> 768
    # the conv stem: 2 x (3x3 stride-2 conv, BN, ReLU) at 12 and 24 channels, then a 1x1 conv to 96
    stem = {k: tuple(v.shape) for k, v in swin.patch_embed.state_dict().items() if k.endswith("weight")}
    assert stem == {"proj.0.weight": (12, 3, 3, 3), "proj.1.weight": (12,), "proj.3.weight": (24, 12, 3, 3),
                    "proj.4.weight": (24,), "proj.6.weight": (96, 24, 1, 1), "norm.weight": (96,)}
    assert conch.weights_format == ctp.weights_format == "harness"  # loaded through HARNESS_CONVERTERS


def test_a_custom_checkpoint_is_refused_with_its_licence(registry_guard):
    register_encoder(EncoderSpec("tiny-custom", "hf-hub:test-org/custom", 96, weights_format="custom",
                                 architecture="harness:ctranspath", hub_filename="w.pth", licence="GPL-3.0"))
    with pytest.raises(ConfigError, match=r"'tiny-custom': its published weights .* are a custom checkpoint.*GPL-3.0"):
        get_encoder("tiny-custom").resolve_weights()


def test_ctranspath_random_init_runs_on_cpu_and_gives_768_d():
    enc = build_encoder("ctranspath", random_init=True)
    with torch.no_grad():
        out = enc.model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 768) and torch.isfinite(out).all()


def test_hub_filename_loads_a_plain_weights_file_from_the_cache_offline(hf_snapshot, registry_guard):
    """GPFM-style: the Hub repo holds a bare state dict, loaded into the registered timm architecture."""
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    torch.manual_seed(4)
    source_model = timm.create_model("vit_small_patch16_224", **args).eval()
    hf_snapshot("test-org/plain", {"w.pth": source_model.state_dict()}, COMMIT)
    register_encoder(EncoderSpec("tiny-plain", "hf-hub:test-org/plain", 32, input_size=32, pooling="cls",
                                 hub_filename="w.pth", architecture="vit_small_patch16_224",
                                 architecture_kwargs=args))
    enc = build_encoder("tiny-plain")
    assert enc.weights_id == f"hf:test-org/plain@{COMMIT}"
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(enc.model(x), source_model.forward_features(x)[:, 0], rtol=0, atol=1e-6)


def test_missing_weights_of_a_licensed_encoder_name_the_licence_and_model_page(hf_snapshot):
    hf_snapshot("other/repo", {"x.pth": {"a": torch.zeros(1)}}, COMMIT)
    with pytest.raises(WeightsUnavailable) as err:
        get_encoder("virchow2").resolve_weights()
    msg = str(err.value)
    assert "CC-BY-NC-ND-4.0" in msg and "https://huggingface.co/paige-ai/Virchow2" in msg and "offline" in msg


def test_slide_encoders_declare_their_patch_encoder_and_refuse_others():
    assert {"gigapath-slide", "chief", "titan", "prism", "feather-uni2"} <= set(SLIDE_ENCODERS.names())
    for name, spec in SLIDE_ENCODERS.items():
        if spec.patch_encoder in ENCODERS.names():
            assert ENCODERS.get(spec.patch_encoder).embed_dim == spec.patch_dim, name
    assert check_pairing("gigapath-slide", "gigapath").embed_dim == 768
    assert check_pairing("titan", "conch-v15").name == "titan"  # TITAN and FEATHER read the registered CONCH v1.5
    with pytest.raises(ConfigError, match=r"slide encoder 'prism' cannot take features of patch encoder 'uni' "
                                          r"\(1024-d\): it was trained on 'virchow' features \(2560-d at 20x"):
        check_pairing("prism", "uni")
    with pytest.raises(ConfigError, match=r"'chief' .* trained on 'ctranspath' features \(768-d.*use two-stage/ctranspath/chief"):
        check_pairing("chief", "resnet50-trunc")
    for name in ("feather", "feather-uni2", "chief", "prism", "titan", "gigapath-slide"):  # written in baselines/slide
        assert require_runnable(name).implemented
    from baselines.encoders_slide import SlideEncoderSpec

    ghost = SlideEncoderSpec(**{**dataclasses.asdict(SLIDE_ENCODERS.get("titan")), "name": "ghost",
                                "needs": "its architecture is not written here"})
    SLIDE_ENCODERS.register("ghost", ghost)
    try:
        with pytest.raises(ConfigError, match=r"'ghost' .* does not run in this harness yet: its architecture is not "
                                              r"written here; see https://huggingface.co/MahmoodLab/TITAN"):
            require_runnable("ghost")
    finally:
        SLIDE_ENCODERS._items.pop("ghost")


def test_cli_table_lists_every_encoder_with_its_facts(capsys):
    from bench.cli.commands import encoders as verb

    parser = argparse.ArgumentParser()
    verb.add_arguments(parser)
    assert verb.run(parser.parse_args(["--references"])) == 0
    out = capsys.readouterr().out
    patch_part, slide_part = out.split("slide encoders")
    lines = [line for line in patch_part.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    assert header[:6] == ["name", "dim", "input", "magnification", "gated", "licence"]
    rows = {c[0]: c for c in ([x.strip() for x in line.split("|")[1:-1]] for line in lines[2:])}
    assert set(rows) == set(ENCODERS.names())
    for name, spec in ENCODERS.items():
        assert int(rows[name][1]) == spec.embed_dim and int(rows[name][2]) == spec.input_size
        assert rows[name][4] == ("yes" if spec.gated else "no") and rows[name][5] == spec.licence
    assert "prism" in slide_part and "virchow" in slide_part


def test_cli_check_builds_on_meta_and_prints_the_measured_size(capsys):
    from bench.cli.main import main

    assert main(["encoders", "--check", "resnet18-trunc", "kaiko-vits16"]) == 0
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["resnet18-trunc"][1:] == ["256", "256", "224", "2,782,784", "ok"]
    assert rows["kaiko-vits16"][2] == "384"
    assert main(["encoders", "--check", "no-such-encoder"]) == 2  # unknown name: one error line
