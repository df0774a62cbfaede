"""2DMamba: the plain-torch 2D selective scan and the aggregator around it, and the optional CUDA kernel:
with `scan_impl="cuda"` and no kernel, a clear error with the install commands, and `bench run` records
such a method as skipped (not failed) while the other runs go on."""

from __future__ import annotations

import copy
import json
import math
import sys
import types

import pytest
import torch

from baselines.mil import mamba2d
from baselines.mil.mamba2d import (
    KernelUnavailable,
    Mamba2DMIL,
    kernel_problem,
    require_kernel,
    scan_2d,
    selective_scan_2d,
)
from bench.common.errors import ConfigError, DataError

D64 = torch.float64


def tiny(**kw) -> Mamba2DMIL:
    torch.manual_seed(0)
    params = dict(hidden_dim=8, n_layers=2, d_state=4, attn_dim=6, dropout=0.0) | kw
    return Mamba2DMIL(12, 3, **params).to(D64).eval()


def bag(n: int = 9, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (1, n, 12) and distinct cells of a 3 x 4 box, offset to (10, 5) (column, row)."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.cat([torch.tensor([0, 11]), torch.randperm(10, generator=g)[: n - 2] + 1])
    coords = torch.stack([cells % 4 + 10, cells // 4 + 5], dim=1).to(D64)
    return torch.randn(1, n, 12, generator=g, dtype=D64), coords[None]


# --------------------------------------------------------------------------- the scan


def test_the_2d_scan_is_the_horizontal_then_vertical_recurrence_written_out():
    g = torch.Generator().manual_seed(0)
    h_, w_, e, s = 3, 4, 5, 2
    u, delta = torch.randn(2, h_, w_, e, generator=g, dtype=D64), torch.rand(2, h_, w_, e, generator=g, dtype=D64)
    a = -torch.rand(e, s, generator=g, dtype=D64) * 2
    b, c = torch.randn(2, h_, w_, s, generator=g, dtype=D64), torch.randn(2, h_, w_, s, generator=g, dtype=D64)
    d = torch.randn(e, generator=g, dtype=D64)
    y = selective_scan_2d(u, delta, a, b, c, d)
    expect = torch.zeros_like(y)
    for n in range(2):
        for ch in range(e):
            for st in range(s):
                hor = [[0.0] * w_ for _ in range(h_)]
                state = [[0.0] * w_ for _ in range(h_)]
                for r in range(h_):
                    for col in range(w_):
                        dt = float(delta[n, r, col, ch])
                        da = math.exp(dt * float(a[ch, st]))
                        left = hor[r][col - 1] if col else 0.0
                        hor[r][col] = da * left + dt * float(b[n, r, col, st]) * float(u[n, r, col, ch])
                for r in range(h_):
                    for col in range(w_):
                        da = math.exp(float(delta[n, r, col, ch]) * float(a[ch, st]))
                        up = state[r - 1][col] if r else 0.0
                        state[r][col] = da * up + hor[r][col]
                        expect[n, r, col, ch] += float(c[n, r, col, st]) * state[r][col]
    expect += d * u
    assert torch.allclose(y, expect, rtol=0, atol=1e-12)


def test_on_one_row_the_2d_scan_is_the_1d_selective_scan():
    g = torch.Generator().manual_seed(3)
    decay, inputs = torch.rand(2, 1, 7, 3, 2, generator=g, dtype=D64), torch.randn(2, 1, 7, 3, 2, generator=g, dtype=D64)
    state, states = torch.zeros(2, 3, 2, dtype=D64), []
    for t in range(7):  # Mamba: h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t
        state = decay[:, 0, t] * state + inputs[:, 0, t]
        states.append(state)
    assert torch.allclose(scan_2d(decay, inputs)[:, 0], torch.stack(states, 1), rtol=0, atol=1e-14)
    # and on one column likewise
    assert torch.allclose(scan_2d(decay.transpose(1, 2), inputs.transpose(1, 2))[:, :, 0], torch.stack(states, 1),
                          rtol=0, atol=1e-14)


# --------------------------------------------------------------------------- the aggregator


def test_shapes_and_attention_a_distribution_over_the_patches():
    model = tiny()
    x, coords = bag()
    assert Mamba2DMIL.uses_coords and not Mamba2DMIL.permutation_invariant
    for pool in ("grid", "patches"):
        model.pool = pool
        out = model(x, coords=coords)
        assert out.logits.shape == (1, 3) and out.attention.shape == (1, 9) and out.aux_loss is None
        assert torch.allclose(out.attention.sum(1), torch.ones(1, dtype=D64)) and bool((out.attention > 0).all())
    copy.deepcopy(model)  # the trainer may copy a model


def test_a_padded_batch_gives_each_bag_its_output_alone_and_zero_attention_at_padding():
    model = tiny()
    (x1, c1), (x2, c2) = bag(9, 1), bag(6, 2)
    x = torch.zeros(2, 11, 12, dtype=D64)
    coords = torch.full((2, 11, 2), 123.0, dtype=D64)  # padding positions that would collide if used
    x[0, :9], coords[0, :9], x[1, 2:8], coords[1, 2:8] = x1[0], c1[0], x2[0], c2[0]
    x[1, :2] = float("nan")
    mask = torch.zeros(2, 11, dtype=torch.bool)
    mask[0, :9], mask[1, 2:8] = True, True
    out = model(x, mask=mask, coords=coords)
    alone1, alone2 = model(x1, coords=c1), model(x2, coords=c2)
    assert torch.allclose(out.logits[0], alone1.logits[0], rtol=0, atol=1e-10)
    assert torch.allclose(out.logits[1], alone2.logits[0], rtol=0, atol=1e-10)
    assert torch.allclose(out.attention[0, :9], alone1.attention[0], rtol=0, atol=1e-10)
    assert torch.allclose(out.attention[1, 2:8], alone2.attention[0], rtol=0, atol=1e-10)
    assert bool((out.attention[~mask] == 0).all())
    assert torch.allclose(out.attention.sum(1), torch.ones(2, dtype=D64))


def test_the_grid_position_matters_but_the_order_and_the_offset_do_not():
    model = tiny()
    x, coords = bag()
    ref = model(x, coords=coords).logits
    perm = torch.randperm(9)
    assert torch.allclose(model(x[:, perm], coords=coords[:, perm]).logits, ref, rtol=0, atol=1e-12)
    assert torch.allclose(model(x, coords=coords - 10.0).logits, ref, rtol=0, atol=1e-12)
    # a tiling origin that is not a multiple of the patch side (fractional grid positions), float32 round-off
    shifted = (coords + 0.9999).float().to(D64)
    assert torch.allclose(model(x, coords=shifted).logits, ref, rtol=0, atol=1e-12)
    occupied = {(int(c), int(r)) for c, r in coords[0].tolist()}
    free = next((c, r) for r in range(5, 8) for c in range(10, 14) if (c, r) not in occupied)
    moved = coords.clone()
    moved[0, 2] = torch.tensor(free, dtype=D64)  # one patch to an empty cell of the same box
    assert (model(x, coords=moved).logits - ref).abs().max() > 1e-6


def test_missing_or_bad_coords_are_refused():
    model = tiny()
    x, coords = bag()
    with pytest.raises(DataError, match="grid positions"):
        model(x)
    dup = coords.clone()
    dup[0, 1] = dup[0, 0]
    with pytest.raises(DataError, match="same grid cell"):
        model(x, coords=dup)
    with pytest.raises(DataError, match="max_cells"):
        model(x, coords=coords * 1000)


def test_bad_parameters_are_config_errors():
    for kw, bad in (({"pool": "mean"}, "mean"), ({"scan_impl": "triton"}, "triton"), ({"pad_token": "x"}, "x"),
                    ({"d_state": 0}, "0"), ({"dt_rank": "big"}, "big"), ({"dropout": 1.5}, "1.5")):
        with pytest.raises(ConfigError, match=bad):
            Mamba2DMIL(12, 2, **kw)


def test_every_parameter_gets_a_gradient():
    model = tiny().train()
    x, coords = bag()
    out = model(x, coords=coords)
    (out.logits.sum() + (out.attention ** 2).sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
    frozen = tiny(pad_token="zero")
    assert not frozen.layers.pad_token.requires_grad and bool((frozen.layers.pad_token == 0).all())


def test_parameter_count_of_the_authors_default_config():
    # MambaMIL_2D (main.py defaults: dim 128, 1 layer, d_state 16, trainable pad token; expand 2, d_conv 4,
    # dt_rank ceil(128/16) = 8) at in_dim 1024, 2 classes:
    # _fc1 1024*128+128 + LayerNorm 2*128 + pad 128 + RMSNorm 128 + in_proj 128*512 + conv 256*4+256
    # + x_proj 256*40 + dt_proj 8*256+256 + A_log 256*16 + D 256 + out_proj 256*128
    # + attention 128*128+128+128+1 + classifier 128*2+2 = 265,091 (their module, built from their code: 265,091)
    expect = (1024 * 128 + 128 + 2 * 128 + 128 + 128 + 128 * 512 + 256 * 4 + 256 + 256 * 40 + 8 * 256 + 256
              + 256 * 16 + 256 + 256 * 128 + 128 * 128 + 128 + 128 + 1 + 128 * 2 + 2)
    assert expect == 265_091
    with torch.device("meta"):
        model = Mamba2DMIL(1024, 2)
    assert sum(p.numel() for p in model.parameters()) == expect


# --------------------------------------------------------------------------- the optional kernel


def test_the_cuda_scan_without_the_kernel_names_what_is_missing_and_the_pip_install(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(KernelUnavailable, match=r"aggregator '2dmamba' with scan_impl='cuda' cannot run here: .*"
                                                r"pip install -e '\.\[mamba2d\]'.*AtlasAnalyticsLab/2DMamba.*build\.sh"):
        Mamba2DMIL(16, 2, scan_impl="cuda")
    assert issubclass(KernelUnavailable, ConfigError) and KernelUnavailable.skip_run is True
    assert not Mamba2DMIL(16, 2, scan_impl="auto").uses_kernel  # auto falls back to the torch scan


def test_the_kernel_call_passes_the_authors_layout(monkeypatch):
    """A stand-in for v2dmamba_scan.fwd that computes the torch scan from the kernel's (B, E, H*W) layout,
    with its fused softplus(delta + bias) and SiLU(z) gate: the kernel path then gives the torch path's output."""

    def fwd(u, delta, a, b, c, d, z, delta_bias, softplus, height, width, out_float):
        assert softplus and not out_float and b.shape[1] == 1 and u.is_contiguous()
        grid = lambda t: t.transpose(1, 2).reshape(t.shape[0], height, width, -1)  # noqa: E731
        dl = torch.nn.functional.softplus(delta + delta_bias[:, None])
        y = selective_scan_2d(grid(u), grid(dl), a, grid(b[:, 0]), grid(c[:, 0]), d)
        out = y.reshape(y.shape[0], height * width, -1).transpose(1, 2)
        return [out, None, out * torch.nn.functional.silu(z)]

    monkeypatch.setitem(sys.modules, mamba2d.KERNEL_MODULE, types.SimpleNamespace(fwd=fwd))
    monkeypatch.setattr(mamba2d, "_kernel_applies", lambda x: True)
    model = tiny().float()
    x, coords = bag()
    with torch.no_grad():
        ref = model(x.float(), coords=coords).logits
        model.uses_kernel = True
        out = model(x.float(), coords=coords).logits
    assert torch.allclose(out, ref, rtol=0, atol=1e-5)


def test_each_missing_piece_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "CUDA-only" in kernel_problem()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen: list[str] = []
    kernel = object()

    def importer(missing: str):
        def imp(name: str):
            seen.append(name)
            if name == missing:
                raise ModuleNotFoundError(f"No module named {name!r}")
            return kernel
        return imp

    assert kernel_problem(importer("mamba_ssm")).startswith("mamba-ssm cannot be imported")
    assert kernel_problem(importer(mamba2d.KERNEL_MODULE)).startswith("the 2DMamba CUDA kernel cannot be imported")
    assert kernel_problem(importer("nothing")) is None
    assert require_kernel(importer("nothing")) is kernel  # everything importable: the kernel module


TINY = """
name = "tiny-skip"
seeds = [0]
bootstrap = 50
[defaults.two-stage]
epochs = 1
lr = 1e-3
[[datasets]]
name = "mini"
task = "classification"
classes = ["IDC", "ILC"]
split = { protocol = "holdout", ratios = [0.6, 0.4], val_fraction = 0.25 }
two_stage = { magnification = 10, patch_size = 64, input_size = 32 }
synthetic = { kind = "subtyping", n_slides = 8, width = 768, height = 512, minority_fraction = 0.5 }
[[methods]]
paradigm = "two-stage"
encoder = "resnet18-trunc"
aggregators = ["mean", "max"]
random_init = true
"""


@pytest.mark.slow
def test_a_suite_records_a_kernel_less_method_as_skipped_and_runs_the_others(tmp_path, monkeypatch):
    import bench.orchestration.runner as runner
    from bench.orchestration.runner import RunOptions, outcome_table, run_suite
    from bench.orchestration.suite import load_suite

    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    real = runner.train_method

    def no_kernel(prep, method, *args, **kwargs):  # what building '2dmamba' does on this machine
        if method.aggregator == "max":
            Mamba2DMIL(8, 2, scan_impl="cuda")
        return real(prep, method, *args, **kwargs)

    monkeypatch.setattr(runner, "train_method", no_kernel)
    report = run_suite(load_suite(path), RunOptions(workdir=tmp_path / "work", leaderboards=None, device="cpu"))
    status = {o.method: o.status for o in report.outcomes}
    assert status == {"two-stage/resnet18-trunc/mean": "ok", "two-stage/resnet18-trunc/max": "skipped"}
    assert report.failed == []  # skipped is not failed: `bench run` exits 0
    skipped = next(o for o in report.outcomes if o.status == "skipped")
    record = json.loads(skipped.record.read_text())
    assert record["status"] == "skipped" and "pip install -e '.[mamba2d]'" in record["reason"]
    assert not (skipped.run_dir / "run.json").exists()
    assert "| skipped" in outcome_table(report) and "KernelUnavailable" in outcome_table(report)
