"""One check suite over every registered MIL aggregator (shapes, gradients,
padding, permutation, determinism, bad input), plus the registry and the CLI table."""

from __future__ import annotations

import argparse

import pytest
import torch

from baselines.mil import AGGREGATORS, MILAggregator, build_aggregator
from bench.evaluation.costs import count_parameters
from bench.common.errors import ConfigError, DataError

IN_DIM = 12
SMALL = {"hidden_dim": 16}  # every aggregator takes hidden_dim; 16 keeps the suite fast
# TransMIL's 256 landmarks cost 256^3 per pseudo-inverse step whatever the bag size;
# 8 landmarks still exercise the front padding and the landmark groups on 20-instance bags.
# RRT-MIL: 8 x 8 regions leave one instance per region on 20-instance bags (CR-MSA is then zero, as the
# authors' code gives); 2 x 2 regions of 9 instances exercise R-MSA, EPEG and CR-MSA.
EXTRA = {"transmil": {"n_landmarks": 8}, "rrt-mil": {"region_num": 2}}
NAMES = AGGREGATORS.names()
# pretrained slide encoders as aggregators (baselines/mil/slide.py): their tiny test instances, random init
SLIDE = {n for n in NAMES if "encoder" in AGGREGATORS.get(n).defaults}


# PRISM's img_norm normalises the 512 image latents, which its slide embedding (the first latent) never uses
UNUSED_BY_EMBEDDING = {"prism": "encoder.img_norm."}
# Biases that add the same constant to every score of a softmax over instances (the last layer of an attention
# scorer; a key bias, q.(k + b) = q.k + q.b): their gradient is zero up to round-off, by the softmax's shift
# invariance. The gradient test asserts exactly that for them.
SHIFT_BIASES = {
    "abmil": {"scorer.w.bias"}, "abmil-plain": {"scorer.w.bias"}, "clam-sb": {"scorer.w.bias"},
    "clam-mb": {"scorer.w.bias"}, "gma": {"scorer.w.bias"}, "wikg": {"readout.2.bias"},
    "dtfd-mil": {"attention1.w.bias", "attention2.w.bias"}, "abmilx-feat": {"attention_mlp.2.bias", "w_k.bias"},
    "rrt-mil": {"rmsa.attn.pe.bias"}, "2dmamba": {"attention.2.bias"},
    "chief-ft": {"encoder.attention_net.3.attention_c.bias"}, "feather-ft": {"encoder.global_attn.attention_c.bias"},
    "feather-uni2-ft": {"encoder.global_attn.attention_c.bias"},
}


GRID_WIDTH = 8  # test bags of aggregators with `uses_coords` lie row-major on a grid 8 patches wide


def row_major_grid(b: int, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, N, 2) grid positions (column, row) of instance i = (i % 8, i // 8): a bag's first k
    instances have the same positions whatever N, so a padded bag and the bag alone agree."""
    i = torch.arange(n, dtype=dtype)
    return torch.stack([i % GRID_WIDTH, torch.div(i, GRID_WIDTH, rounding_mode="floor")], dim=1).expand(b, n, 2)


def _default_grid(module, args, kwargs):
    """Forward pre-hook of the suite's coords-using models: a row-major grid where the call gives none."""
    x = args[0] if args else kwargs.get("x")
    if kwargs.get("coords") is None and isinstance(x, torch.Tensor) and x.ndim == 3:
        kwargs = {**kwargs, "coords": row_major_grid(x.shape[0], x.shape[1], x.dtype)}
    return args, kwargs


def small(name: str, n_outputs: int = 3, **params) -> MILAggregator:
    base = {"config": "tiny"} if name in SLIDE else SMALL
    model = build_aggregator(name, IN_DIM, n_outputs, seed=1, **{**base, **EXTRA.get(name, {}), **params})
    if model.uses_coords:  # TITAN, GigaPath: every suite call below gets the patches' grid positions
        model.register_forward_pre_hook(_default_grid, with_kwargs=True)
    return model


def test_registry_holds_every_aggregator_of_the_design():
    assert set(NAMES) - SLIDE == {"mean", "max", "abmil", "abmil-plain", "clam-sb", "transmil", "dsmil", "gma",
                                  "abmilx", "clam-mb", "rrt-mil", "wikg", "dtfd-mil", "maxmil", "abmilx-feat",
                                  "2dmamba"}
    from baselines.slide import SLIDE_ARCHS

    assert SLIDE == {m for n in SLIDE_ARCHS.names() for m in (n, f"{n}-ft")}  # every implemented one, both modes
    for name in ("transmil", "rrt-mil", "dtfd-mil", "2dmamba"):  # regions / pseudo-bags / the grid scan: order
        assert not AGGREGATORS.get(name).permutation_invariant, name
    for name in ("mean", "max", "maxmil", "abmil", "abmil-plain", "gma", "abmilx", "clam-mb", "wikg"):
        assert AGGREGATORS.get(name).permutation_invariant, name
    assert AGGREGATORS.get("clam-sb").aux_weight == 0.3  # CLAM: 0.7 bag + 0.3 instance
    assert AGGREGATORS.get("dsmil").aux_weight == 0.5


def test_abmil_variants_differ_only_in_gating():
    assert AGGREGATORS.get("abmil").defaults["gated"] is True
    assert AGGREGATORS.get("abmil-plain").defaults["gated"] is False
    assert build_aggregator("abmil", 8, 2).scorer.u is not None
    assert build_aggregator("abmil-plain", 8, 2).scorer.u is None


@pytest.mark.parametrize(
    ("name", "paper_millions"),
    [("abmil", 0.66), ("clam-sb", 0.79), ("transmil", 2.67), ("dsmil", 0.87), ("abmilx", 0.80)],
)
def test_parameter_counts_match_the_abmilx_paper_table_1(name, paper_millions):
    # Table 1 lists aggregator sizes on ResNet-50 features (1024-d), 2 classes.
    model = build_aggregator(name, 1024, 2)
    assert round(count_parameters(model).trainable / 1e6, 2) == paper_millions


@pytest.mark.parametrize("name", NAMES)
def test_shapes_no_nan_and_attention_is_a_distribution(name):
    model = small(name).eval()
    x = torch.randn(2, 21, IN_DIM)
    out = model(x)
    assert out.logits.shape == (2, 3)
    assert out.attention.shape == (2, 21)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.attention).all()
    assert (out.attention >= 0).all()
    torch.testing.assert_close(out.attention.sum(dim=1), torch.ones(2), atol=1e-5, rtol=0)
    if out.head_attention is not None:
        assert out.head_attention.shape[0] == 2 and out.head_attention.shape[2] == 21
        torch.testing.assert_close(out.head_attention.mean(dim=1), out.attention)
    assert out.aux_loss is None  # eval mode never has an auxiliary loss


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_receives_a_gradient(name):
    model = small(name).train()
    # fixed inputs: a bias that shifts every score before a softmax (ABMIL's w, WiKG's readout, CHIEF's
    # attention_c) has a zero gradient up to round-off, which must not depend on the test order
    x = torch.randn(3, 20, IN_DIM, generator=torch.Generator().manual_seed(0))
    label = torch.tensor([0, 1, 2])  # every class, so each CLAM instance classifier is used
    out = model(x, label=label)
    loss = out.logits.square().sum()
    if out.aux_loss is not None:
        loss = loss + out.aux_loss
    loss.backward()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # a probe trains only its head
    shift = SHIFT_BIASES.get(name, set())
    assert shift <= {n for n, _ in trained}, f"{name}: {shift - {n for n, _ in trained}} not parameters"
    missing = [n for n, p in trained if (p.grad is None or not bool((p.grad != 0).any()))
               and n not in shift and not n.startswith(UNUSED_BY_EMBEDDING.get(name.removesuffix("-ft"), "-"))]
    assert not missing, f"{name}: no gradient for {missing}"
    scale = max(float(p.grad.abs().max()) for _, p in trained if p.grad is not None)
    not_shift = [n for n, p in trained if n in shift and p.grad is not None and float(p.grad.abs().max()) > 1e-5 * scale]
    assert not not_shift, f"{name}: {not_shift} get a real gradient: not a softmax shift"
    assert all(torch.isfinite(p.grad).all() for _, p in trained if p.grad is not None)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    if name in SLIDE:  # probe: exactly the encoder is frozen; fine-tuning: nothing is
        assert bool(frozen) == (not name.endswith("-ft")) and all(n.startswith("encoder.") for n in frozen)


@pytest.mark.parametrize("name", ["clam-sb", "clam-mb", "dsmil", "dtfd-mil"])
def test_auxiliary_loss_only_in_training_with_label(name):
    model = small(name)
    x = torch.randn(2, 20, IN_DIM)
    label = torch.tensor([1, 2])
    assert model.train()(x).aux_loss is None
    aux = model.train()(x, label=label).aux_loss
    assert aux is not None and aux.ndim == 0 and torch.isfinite(aux) and aux > 0
    assert model.eval()(x, label=label).aux_loss is None
    with pytest.raises(DataError, match="outside the classes"):
        model.train()(x, label=torch.tensor([0, 3]))


@pytest.mark.parametrize("name", NAMES)
def test_bag_of_one_instance(name):
    model = small(name)
    x = torch.randn(1, 1, IN_DIM)
    out = model.eval()(x)
    assert out.logits.shape == (1, 3) and torch.isfinite(out.logits).all()
    torch.testing.assert_close(out.attention, torch.ones(1, 1))
    train_out = model.train()(x, label=torch.tensor([2]))  # CLAM: no instance pair to sample
    assert torch.isfinite(train_out.logits).all()
    if train_out.aux_loss is not None:
        assert torch.isfinite(train_out.aux_loss)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", [2, 7, 50])
def test_bags_of_varying_size(name, n):
    out = small(name).eval()(torch.randn(1, n, IN_DIM))
    assert out.logits.shape == (1, 3) and out.attention.shape == (1, n)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("name", NAMES)
def test_padded_bag_equals_the_bag_alone(name):
    model = small(name).double().eval()
    short, full = torch.randn(1, 9, IN_DIM).double(), torch.randn(1, 16, IN_DIM).double()
    padded = torch.cat([short, torch.full((1, 7, IN_DIM), float("nan"), dtype=torch.double)], dim=1)
    batch = torch.cat([padded, full])  # (2, 16, D), garbage (NaN) in the padding
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[0, 9:] = False

    together = model(batch, mask=mask)
    alone_short, alone_full = model(short), model(full)
    torch.testing.assert_close(together.logits[0], alone_short.logits[0], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(together.logits[1], alone_full.logits[0], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(together.attention[0, :9], alone_short.attention[0], rtol=1e-9, atol=1e-10)
    assert (together.attention[0, 9:] == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_permutation_invariance_where_promised(name):
    model = small(name).double().eval()
    x = torch.randn(1, 30, IN_DIM, dtype=torch.double)
    perm = torch.randperm(30)
    out, out_perm = model(x), model(x[:, perm])
    if AGGREGATORS.get(name).permutation_invariant:
        torch.testing.assert_close(out_perm.logits, out.logits, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(out_perm.attention, out.attention[:, perm], rtol=1e-9, atol=1e-10)
    else:  # TransMIL: PPEG sees the order; RRT-MIL: regions; DTFD-MIL: pseudo-bags
        assert not torch.allclose(out_perm.logits, out.logits, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_eval_mode_is_deterministic_and_seed_fixes_weights(name):
    x = torch.randn(2, 25, IN_DIM)
    a, b = small(name).eval(), small(name).eval()  # same seed
    first = a(x)
    assert torch.equal(first.logits, a(x).logits)
    assert torch.equal(first.attention, a(x).attention)
    assert torch.equal(first.logits, b(x).logits)
    state = torch.get_rng_state()
    small(name)
    assert torch.equal(state, torch.get_rng_state())  # seeding does not touch the global RNG


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_gives_clear_errors(name):
    model = small(name).eval()
    with pytest.raises(DataError, match=r"feature dimension 13 .* in_dim=12"):
        model(torch.randn(1, 5, 13))
    with pytest.raises(DataError, match="empty bag"):
        model(torch.randn(1, 0, IN_DIM))
    with pytest.raises(DataError, match="empty bag: bag 1"):
        model(torch.randn(2, 4, IN_DIM), mask=torch.tensor([[True] * 4, [False] * 4]))
    x = torch.randn(1, 6, IN_DIM)
    x[0, 4, 2] = float("nan")
    with pytest.raises(DataError, match="NaN or inf .* bag 0, instance 4"):
        model(x)
    with pytest.raises(DataError, match=r"shape \(B, N, D\).*unsqueeze"):
        model(torch.randn(6, IN_DIM))
    with pytest.raises(DataError, match="mask shape"):
        model(torch.randn(1, 6, IN_DIM), mask=torch.ones(1, 5, dtype=torch.bool))


USES_COORDS = [n for n in NAMES if AGGREGATORS.get(n).cls.uses_coords]


def test_the_coords_users_are_2dmamba_and_the_slide_encoders_with_positions():
    assert {n.removesuffix("-ft") for n in USES_COORDS} == {"titan", "gigapath-slide", "2dmamba"}
    assert all(not AGGREGATORS.get(n).permutation_invariant for n in USES_COORDS)


@pytest.mark.parametrize("name", USES_COORDS)
def test_coords_users_need_coords_and_see_them(name):
    tiny = {"config": "tiny"} if name in SLIDE else SMALL
    model = build_aggregator(name, IN_DIM, 3, seed=1, **tiny).double().eval()  # no default-grid hook
    x = torch.randn(1, 20, IN_DIM, dtype=torch.double)
    with pytest.raises(DataError, match=r"needs the patches' grid positions: call it with coords"):
        model(x)
    with pytest.raises(DataError, match=r"coords shape \(1, 19, 2\) .* expected \(B, N, 2\) = \(1, 20, 2\)"):
        model(x, coords=row_major_grid(1, 19))
    with pytest.raises(DataError, match="coords must be a torch.Tensor"):
        model(x, coords=row_major_grid(1, 20).numpy())
    bad = row_major_grid(1, 20).clone()
    bad[0, 7, 1] = float("nan")
    with pytest.raises(DataError, match="NaN or inf at bag 0, instance 7"):
        model(x, coords=bad)
    grid = row_major_grid(1, 20, torch.double)
    out = model(x, coords=grid)
    # translating the whole bag by whole patches keeps every distance: TITAN's ALiBi is unchanged;
    # moving patches apart changes what the model sees
    moved = grid.clone()
    moved[0, :10, 1] += 5.0  # rows 0-1 move 5 rows down (2dmamba refuses two patches in one cell)
    assert not torch.allclose(model(x, coords=moved).logits, out.logits, rtol=1e-6, atol=1e-8)
    if name.startswith("titan"):
        torch.testing.assert_close(model(x, coords=grid + 3.0).logits, out.logits, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["abmil", "mean", "prism"])
def test_aggregators_without_positions_ignore_coords(name):
    model = small(name).double().eval()
    x = torch.randn(1, 20, IN_DIM, dtype=torch.double)
    assert not model.uses_coords
    torch.testing.assert_close(model(x, coords=row_major_grid(1, 20, torch.double) * 7).logits, model(x).logits,
                               rtol=0, atol=0)


def test_huge_but_finite_features_are_not_mistaken_for_nan():
    # the fast NaN check sums each instance; 3e38 + 3e38 overflows to inf in float32
    x = torch.randn(1, 4, IN_DIM)
    x[0, 2, :2] = 3e38
    out = small("mean").eval()(x)
    assert out.logits.shape == (1, 3)
    x[0, 1, 5] = float("inf")
    with pytest.raises(DataError, match="instance 1 .*1 bad instance"):
        small("mean").eval()(x)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_parameter_names_the_valid_ones(name):
    valid = list(AGGREGATORS.get(name).defaults)
    typo, meant = ("mdoe", "mode") if name in SLIDE else ("hiden_dim", "hidden_dim")
    with pytest.raises(ConfigError) as err:
        build_aggregator(name, IN_DIM, 2, **{typo: 8})
    message = str(err.value)
    assert f"'{typo}'" in message and f"did you mean '{meant}'" in message
    assert all(p in message for p in valid)


def test_unknown_aggregator_lists_close_names():
    with pytest.raises(ConfigError, match=r"unknown aggregator 'abmill'; did you mean: abmil"):
        build_aggregator("abmill", IN_DIM, 2)
    with pytest.raises(ConfigError, match="Known: .*transmil"):
        build_aggregator("transformer-mil-xyz", IN_DIM, 2)


@pytest.mark.parametrize(
    ("name", "params", "pattern"),
    [
        ("abmil", {"dropout": 1.5}, "dropout must be a number in"),
        ("abmilx", {"n_heads": 5}, "hidden_dim=16 must be divisible by n_heads=5"),
        ("abmilx", {"attn_plus_impl": "flash"}, "attn_plus_impl must be one of sdpa, naive"),
        ("abmilx", {"act": "swish"}, "act must be one of"),
        ("clam-sb", {"inst_loss": "hinge"}, "inst_loss must be one of ce, svm"),
        ("transmil", {"n_landmarks": 0}, "n_landmarks must be an integer >= 1"),
        ("mean", {"hidden_dim": "512"}, "hidden_dim must be an integer"),
    ],
)
def test_bad_parameter_values(name, params, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_aggregator(name, IN_DIM, 2, **{**SMALL, **params})


def test_mean_and_max_pooling_against_direct_formulas():
    x = torch.randn(1, 10, IN_DIM, dtype=torch.double)
    mean = small("mean").double().eval()
    h = mean.proj(x)[0]  # (N, L)
    torch.testing.assert_close(mean(x).logits[0], mean.classifier(h.mean(0)))
    mx = small("max").double().eval()
    h = mx.proj(x)[0]
    torch.testing.assert_close(mx(x).logits[0], mx.classifier(h.max(0).values))
    # attention of max pooling: share of dimensions each instance wins
    wins = torch.bincount(h.argmax(0), minlength=10).double() / h.shape[1]
    torch.testing.assert_close(mx(x).attention[0], wins)


@pytest.mark.parametrize("gated", [True, False])
def test_abmil_against_ilse_formula(gated):
    model = small("abmil", gated=gated).double().eval()
    x = torch.randn(1, 15, IN_DIM, dtype=torch.double)
    h = model.proj(x)[0]  # (N, L)
    s = model.scorer
    raw = torch.tanh(h @ s.v.weight.T + s.v.bias)
    if gated:
        raw = raw * torch.sigmoid(h @ s.u.weight.T + s.u.bias)
    a = torch.softmax((raw @ s.w.weight.T + s.w.bias)[:, 0], dim=0)  # (N,)
    z = (a[:, None] * h).sum(0)
    out = model(x)
    torch.testing.assert_close(out.attention[0], a)
    torch.testing.assert_close(out.logits[0], z @ model.classifier.weight.T + model.classifier.bias)


def test_gma_has_the_gma_paper_sizes():
    model = build_aggregator("gma", 1024, 2)
    assert model.proj[0].out_features == 512
    assert model.scorer.v.out_features == 384 and model.scorer.u.out_features == 384
    assert [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)] == [0.25, 0.25]


def test_cli_table_lists_every_aggregator_with_its_parameter_count(capsys):
    from bench.cli.commands import aggregators as verb

    parser = argparse.ArgumentParser()
    verb.add_arguments(parser)
    assert verb.run(parser.parse_args([])) == 0
    table = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line.split("|") for line in table.splitlines()[2:]}
    assert set(rows) == set(NAMES)
    for name in NAMES:
        expected = count_parameters(build_aggregator(name, 1024, 2)).trainable
        assert int(rows[name][2].strip().replace(",", "")) == expected
        hidden = "hidden_dim=128" if name == "2dmamba" else "hidden_dim=512"  # 2DMamba: its authors' 128
        assert (hidden in rows[name][5]) != (name in SLIDE), rows[name]
