"""e2e.forward: BatchNorm modes and chunked activation checkpointing (exactness in float64)."""

from __future__ import annotations

import pytest
import torch

from bench.common.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _encoder(frozen_stats: bool = True) -> torch.nn.Module:
    """resnet18-trunc at 32 px in float64, with non-trivial running statistics (frozen BN is then no identity)."""
    from baselines.encoders import build_encoder

    enc = build_encoder("resnet18-trunc", random_init=True, seed=0, trainable=True, input_size=32).model.double()
    if frozen_stats:
        g = torch.Generator().manual_seed(1)
        for m in enc.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
    return enc


def _step(enc: torch.nn.Module, x: torch.Tensor, **kw) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from e2e.forward import encoder_forward

    enc.zero_grad(set_to_none=True)
    out = encoder_forward(enc, x, **kw)  # (n, D)
    w = torch.linspace(-1, 1, out.shape[1], dtype=out.dtype)
    ((out * w).sum(dim=1) ** 2).mean().backward()  # couples all patches, as the aggregator does
    return out.detach(), {k: p.grad.clone() for k, p in enc.named_parameters()}


def test_frozen_batchnorm_chunked_checkpointing_gives_the_unchunked_outputs_and_gradients_in_float64():
    from e2e.forward import batchnorm_buffers, set_encoder_mode

    x = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    enc = _encoder()
    set_encoder_mode(enc, "frozen")
    assert enc.training and not any(m.training for m in enc.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = [t.clone() for t in batchnorm_buffers(enc)]
    ref_out, ref_grads = _step(enc, x, checkpointing=False, bn="frozen")
    for chunk in (1, 3, 7, 100):  # uneven last chunk, one chunk, chunk larger than the sample
        out, grads = _step(enc, x, checkpointing=True, bn="frozen", chunk=chunk)
        torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
        assert grads.keys() == ref_grads.keys()
        for k in grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-10, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}")
    # frozen BatchNorm is never updated, checkpointed or not
    assert all(torch.equal(a, b) for a, b in zip(before, batchnorm_buffers(enc)))
    # the mode changes the numbers (hence train mode stays the default)
    set_encoder_mode(enc, "train")
    train_out, _ = _step(enc, x, checkpointing=False)
    assert not torch.allclose(train_out, ref_out, atol=1e-3)


def test_a_frozen_feature_depends_on_its_own_patch_only():
    from e2e.forward import encoder_forward, set_encoder_mode

    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, 32, 32, generator=g, dtype=torch.float64)
    enc = _encoder()
    set_encoder_mode(enc, "frozen")
    full = encoder_forward(enc, x, False, bn="frozen")
    alone = encoder_forward(enc, x[2:3], False, bn="frozen")
    torch.testing.assert_close(full[2:3], alone, rtol=1e-12, atol=1e-12)
    set_encoder_mode(enc, "train")  # train mode: batch statistics couple the patches
    assert not torch.allclose(encoder_forward(enc, x, False)[2:3], encoder_forward(enc, x[:3], False)[2:3],
                              atol=1e-6)


def test_bad_bn_mode_and_a_chunk_below_one_patch_are_refused_with_the_smallest_that_works():
    from e2e.forward import encoder_forward, set_encoder_mode
    from e2e.train import E2EConfig

    enc = _encoder(frozen_stats=False)
    x = torch.zeros(2, 3, 32, 32, dtype=torch.float64)
    for chunk in (0, -4, 1.5, True):
        with pytest.raises(ConfigError, match="1 is the smallest that works"):
            encoder_forward(enc, x, True, bn="frozen", chunk=chunk)
        with pytest.raises(ConfigError, match="checkpoint_chunk"):
            E2EConfig("resnet18-trunc", checkpoint_chunk=chunk)
    for bad in ("two-pass", "eval", None):
        with pytest.raises(ConfigError, match="bn"):
            set_encoder_mode(enc, bad)
        with pytest.raises(ConfigError, match="bn"):
            E2EConfig("resnet18-trunc", bn=bad)


def test_new_fields_at_their_defaults_keep_older_result_hashes():
    import dataclasses

    from bench.common.files import config_hash
    from e2e.train import _RUN_ONLY, E2EConfig

    c = E2EConfig("resnet18-trunc", samples=64)
    old = {k: v for k, v in c.to_dict().items() if k not in _RUN_ONLY and k not in ("bn", "checkpoint_chunk")}
    assert c.result_hash() == config_hash(old)  # the hash before these fields existed
    assert dataclasses.replace(c, bn="frozen").result_hash() != c.result_hash()
    assert dataclasses.replace(c, checkpoint_chunk=8).result_hash() != c.result_hash()
