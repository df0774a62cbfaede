"""Pretrained slide encoders as two-stage methods (baselines/mil/slide.py): probe vs fine-tune, published
weights from a local file, the pairing and missing-weights errors."""

from __future__ import annotations

import pytest
import torch

from baselines.mil import build_aggregator
from bench.common.errors import ConfigError


def _steps(model, n: int = 3) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(n):
        x = torch.randn(1, 17, model.in_dim, generator=gen)
        i = torch.arange(17.0)
        grid = {"coords": torch.stack([i % 5, i // 5], dim=1)[None]} if model.uses_coords else {}  # TITAN, GigaPath
        loss = torch.nn.functional.cross_entropy(model(x, **grid).logits, torch.tensor([1]))
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("name", ["feather", "chief", "prism", "titan", "gigapath-slide"])
def test_probe_trains_only_the_head_and_finetuning_trains_the_encoder(name):
    probe = build_aggregator(name, 12, 2, seed=0, config="tiny")
    tuned = build_aggregator(f"{name}-ft", 12, 2, seed=0, config="tiny")
    enc0 = {k: v.clone() for k, v in probe.encoder.state_dict().items()}
    head0 = {k: v.clone() for k, v in probe.head.state_dict().items()}
    assert all(torch.equal(enc0[k], v) for k, v in tuned.encoder.state_dict().items())  # same seed, same start
    _steps(probe)
    _steps(tuned)
    assert all(torch.equal(enc0[k], v) for k, v in probe.encoder.state_dict().items())  # frozen, bit for bit
    assert not all(torch.equal(head0[k], v) for k, v in probe.head.state_dict().items())
    assert not all(torch.equal(enc0[k], v) for k, v in tuned.encoder.state_dict().items())
    assert not probe.encoder.training and probe.training  # the frozen encoder stays in eval mode (no dropout)
    assert tuned.encoder.training


@pytest.mark.parametrize("name, n_layers", [("prism", 2), ("titan", 2), ("gigapath-slide", 2)])
def test_checkpointed_fine_tuning_gives_the_same_gradients(name, n_layers, monkeypatch):
    """checkpoint_layers (the -ft default) recomputes each repeated layer in backward; dropout on (train mode),
    float64: the gradients match the plain run, and the layers really ran under torch's checkpoint."""
    import torch.utils.checkpoint as tuc

    calls = []
    original = tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda fn, *a, **k: calls.append(fn) or original(fn, *a, **k))
    grads = {}
    for checkpointed in (False, True):
        model = build_aggregator(f"{name}-ft", 12, 2, seed=0, config="tiny",
                                 checkpoint_layers=checkpointed).double().train()
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(2, 17, 12, generator=gen, dtype=torch.float64)
        i = torch.arange(17.0, dtype=torch.float64)
        grid = {"coords": torch.stack([i % 5, i // 5], dim=1)[None].expand(2, -1, -1)} if model.uses_coords else {}
        torch.manual_seed(7)  # the same dropout masks in both runs
        loss = torch.nn.functional.cross_entropy(model(x, **grid).logits, torch.tensor([1, 0]))
        loss.backward()
        grads[checkpointed] = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    assert len(calls) >= n_layers  # the repeated layers went through checkpoint, only in the second run
    assert grads[False].keys() == grads[True].keys() and len(grads[True]) > 5
    for key, g in grads[False].items():
        torch.testing.assert_close(grads[True][key], g, rtol=0, atol=1e-12, msg=key)
    with pytest.raises(ConfigError, match=r"checkpoint_layers must be true or false, got 'yes'"):
        build_aggregator(f"{name}-ft", 12, 2, seed=0, config="tiny", checkpoint_layers="yes")


def test_published_weights_load_from_a_local_file_with_the_authors_prefix(tmp_path):
    from baselines.slide import build_slide_arch

    torch.manual_seed(3)
    authors = build_slide_arch("feather", config="published").eval()  # 768-d CONCH v1.5 features
    path = tmp_path / "feather.pth"
    torch.save({f"model.{k}": v for k, v in authors.state_dict().items()}, path)  # the Hub wrapper's prefix
    model = build_aggregator("feather", 768, 3, seed=0, init="published", weights=str(path))
    for k, v in authors.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[k], v), k
    x = torch.randn(1, 9, 768)
    with torch.no_grad():
        torch.testing.assert_close(model.head(authors(x)), model.eval()(x).logits)


def test_published_weights_need_the_patch_encoders_feature_size():
    with pytest.raises(ConfigError, match=r"takes 768-d features of patch encoder 'conch-v15'; these bags have "
                                          r"256-d features.*two-stage/conch-v15/feather"):
        build_aggregator("feather", 256, 2, init="published")


def test_missing_published_weights_offline_say_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ConfigError) as err:
        build_aggregator("prism", 2560, 2, init="published")
    message = str(err.value)
    assert "paige-ai/Prism" in message and "gated" in message and "weights = \"PATH\"" in message
    with pytest.raises(ConfigError, match="does not exist"):
        build_aggregator("prism", 2560, 2, init="published", weights=str(tmp_path / "nope.safetensors"))


def test_a_suite_pairs_a_published_slide_encoder_with_its_patch_encoder(tmp_path):
    from bench.orchestration.runner import check_methods
    from bench.orchestration.suite import load_suite

    def suite(encoder: str, init: str, aggregator: str = "prism", paradigm: str = "two-stage"):
        path = tmp_path / f"{encoder}-{init}-{aggregator}-{paradigm}.toml"
        path.write_text(f"""
name = "pairing"
seeds = [0]
[[datasets]]
name = "d"
task = "classification"
classes = ["a", "b"]
data = "D"
split = {{ protocol = "holdout", ratios = [0.7, 0.3] }}
[[methods]]
paradigm = "{paradigm}"
encoder = "{encoder}"
aggregator = "{aggregator}"
aggregator_params = {{ init = "{init}" }}
""")
        return load_suite(path)

    with pytest.raises(ConfigError, match=r"slide encoder 'prism' cannot take features of patch encoder 'uni'.*"
                                          r"trained on 'virchow'.*use two-stage/virchow/prism"):
        check_methods(suite("uni", "published"))
    check_methods(suite("virchow", "published"))  # its own patch encoder: accepted
    check_methods(suite("uni", "random"))  # random init: the architecture alone, any features
    check_methods(suite("gigapath", "published", "gigapath-slide"))
    # TITAN and GigaPath read the patch grid, which only the two-stage trainer passes
    with pytest.raises(ConfigError, match=r"aggregator 'titan' needs the patches' grid positions, which only the "
                                          r"two-stage trainer passes; run it as two-stage/<patch encoder>/titan"):
        check_methods(suite("resnet18-trunc", "random", "titan", "e2e"))
