"""RRT-MIL, WiKG, CLAM-MB and DTFD-MIL against direct computations of their authors' formulas
(the shared suite over every aggregator is tests/baselines/test_mil.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from baselines.mil import build_aggregator
from baselines.mil.dtfd import pseudo_bag_indices
from baselines.mil.rrt import from_regions, grid_side, to_regions


def test_rrt_regions_follow_the_row_major_grid_and_invert():
    # 10 instances, 2 x 2 regions: grid side ceil(sqrt(10)) = 4, regions of 2 x 2
    assert grid_side(10, 2) == 4 and grid_side(50, 8) == 8 and grid_side(50_000, 8) == 224
    x = torch.arange(10.0)[:, None]
    regions, side, r = to_regions(x, 2)
    assert (side, r, tuple(regions.shape)) == (4, 2, (4, 4, 1))
    assert regions[0, :, 0].tolist() == [0, 1, 4, 5] and regions[1, :, 0].tolist() == [2, 3, 6, 7]
    assert regions[2, :, 0].tolist() == [8, 9, 0, 0]  # the tail is zero-filled, as the authors pad
    torch.testing.assert_close(from_regions(regions, 10, 2, r), x)


def test_rrt_cross_region_attention_matches_the_authors_formula():
    model = build_aggregator("rrt-mil", 6, 2, seed=0, hidden_dim=8, n_heads=2, crmsa_heads=2, region_num=2,
                             trans_dropout=0.0).double().eval()
    cr = model.crmsa
    h = torch.randn(13, 8, dtype=torch.double)
    regions, _, r = to_regions(h, 2)  # (4, 16, 8)
    logits = torch.einsum("wpc,ck->wpk", regions, cr.phi).transpose(1, 2)  # (W, k, P)
    combine, dispatch = logits.softmax(-1), logits.softmax(1)
    mm = (logits - logits.min(-1, keepdim=True).values) / (logits.max(-1, keepdim=True).values
                                                             - logits.min(-1, keepdim=True).values + 1e-8)
    reps = (combine.unsqueeze(-1) * regions.unsqueeze(1)).sum(2).transpose(0, 1)  # (k, W, C)
    att = cr.attn
    q, k, v = att.qkv(reps).chunk(3, dim=-1)
    heads = lambda t: t.view(t.shape[0], t.shape[1], 2, 4).transpose(1, 2)  # noqa: E731
    a = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / 2.0, dim=-1)  # head dim 4 -> scale 1/2
    out = att.proj((a @ heads(v)).transpose(1, 2).reshape(reps.shape)).transpose(0, 1)  # (W, k, C)
    back = ((out.unsqueeze(2) * mm.unsqueeze(-1)) * dispatch.unsqueeze(-1)).sum(1)  # (W, P, C)
    torch.testing.assert_close(cr(h), from_regions(back, 13, 2, r))


def test_rrt_epeg_adds_a_convolution_of_the_attention_logits():
    model = build_aggregator("rrt-mil", 6, 2, seed=0, hidden_dim=8, n_heads=2, region_num=1, epeg_k=3,
                             trans_dropout=0.0).double().eval()
    att = model.rmsa.attn
    h = torch.randn(1, 9, 8, dtype=torch.double)  # one region of 9
    q, k, v = (t.view(1, 9, 2, 4).transpose(1, 2) for t in att.qkv(h).chunk(3, dim=-1))
    logits = q @ k.transpose(-1, -2) / 2.0  # (1, 2, 9, 9)
    w = att.pe.weight  # (2, 1, 3, 1) depthwise, along the query axis
    conv = torch.zeros_like(logits)
    padded = F.pad(logits, (0, 0, 1, 1))
    for head in range(2):
        for i in range(9):
            conv[0, head, i] = sum(w[head, 0, t, 0] * padded[0, head, i + t] for t in range(3)) + att.pe.bias[head]
    out = att.proj((torch.softmax(logits + conv, -1) @ v).transpose(1, 2).reshape(1, 9, 8))
    torch.testing.assert_close(att(h), out)


def wikg_by_hand(model, x: torch.Tensor) -> torch.Tensor:
    """The authors' WiKG forward for one bag (1, N, D), full N x N logits."""
    h = model.fc1(x)
    h = (h + h.mean(dim=1, keepdim=True)) * 0.5
    e_h, e_t = model.w_head(h), model.w_tail(h)
    logit = (e_h * model.scale) @ e_t.transpose(-2, -1)
    w, idx = torch.topk(logit, k=model.topk, dim=-1)
    nb = e_t[torch.zeros_like(idx), idx, :]  # (1, N, k, L)
    p = F.softmax(w, dim=2)
    r = p.unsqueeze(-1) * nb + torch.matmul((1 - p).unsqueeze(-1), e_h.unsqueeze(2))
    gate = torch.tanh(e_h.unsqueeze(2).expand(-1, -1, model.topk, -1) + r)
    ka = torch.einsum("ijkl,ijkm->ijk", nb, gate)
    e_n = torch.matmul(F.softmax(ka, dim=2).unsqueeze(2), nb).squeeze(2)
    emb = model.act(model.linear1(e_h + e_n)) + model.act(model.linear2(e_h * e_n))
    gate_score = model.readout(emb.squeeze(0))  # (N, 1), torch_geometric GlobalAttention
    z = (torch.softmax(gate_score, dim=0) * emb.squeeze(0)).sum(0, keepdim=True)
    return model.classifier(model.norm(z))


def test_wikg_matches_the_authors_forward_and_blocks_do_not_change_it():
    x = torch.randn(1, 40, 12, dtype=torch.double)
    model = build_aggregator("wikg", 12, 3, seed=0, hidden_dim=16, dropout=0.0).double().eval()
    torch.testing.assert_close(model(x).logits, wikg_by_hand(model, x))
    blocked = build_aggregator("wikg", 12, 3, seed=0, hidden_dim=16, dropout=0.0, block_rows=7).double().eval()
    torch.testing.assert_close(blocked(x).logits, model(x).logits, rtol=0, atol=1e-12)
    dot = build_aggregator("wikg", 12, 3, seed=0, hidden_dim=16, dropout=0.0, ka_score="dot").double().eval()
    assert not torch.allclose(dot(x).logits, model(x).logits)


def test_wikg_bag_smaller_than_k_uses_only_its_own_instances():
    model = build_aggregator("wikg", 12, 2, seed=0, hidden_dim=16, dropout=0.0).double().eval()
    short = torch.randn(1, 3, 12, dtype=torch.double)
    batch = torch.cat([torch.cat([short, torch.zeros(1, 9, 12, dtype=torch.double)], 1),
                       torch.randn(1, 12, 12, dtype=torch.double)])
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 3:] = False
    torch.testing.assert_close(model(batch, mask=mask).logits[0], model(short).logits[0])


def test_clam_mb_has_one_attention_branch_and_bag_classifier_per_class():
    model = build_aggregator("clam-mb", 10, 3, seed=0, hidden_dim=16, dropout=0.0).double().eval()
    x = torch.randn(1, 25, 10, dtype=torch.double)
    out = model(x)
    h = model.proj(x)[0]
    a = torch.softmax(model.scorer(h[None])[0].T, dim=1)  # (C, N)
    expected = torch.stack([model.bag_classifiers[c](a[c] @ h)[0] for c in range(3)])
    torch.testing.assert_close(out.logits[0], expected)
    torch.testing.assert_close(out.head_attention[0], a)
    assert out.head_attention.shape == (1, 3, 25)


def test_clam_mb_instance_loss_samples_each_class_by_its_own_branch():
    x = torch.randn(1, 30, 10, dtype=torch.float64)
    model = build_aggregator("clam-mb", 10, 3, seed=0, hidden_dim=16, dropout=0.0, subtyping=True).double().train()
    aux = model(x, label=torch.tensor([1])).aux_loss
    h = model.proj(x)[0]
    a = model(x).head_attention[0].detach().numpy()  # train mode, dropout 0: the same attention
    total = 0.0
    for c, clf in enumerate(model.instance_classifiers):
        order = np.argsort(a[c])
        top, bottom = order[::-1][:8].copy(), order[:8].copy()
        if c == 1:
            total = total + F.cross_entropy(clf(torch.cat([h[top], h[bottom]])), torch.tensor([1] * 8 + [0] * 8))
        else:
            total = total + F.cross_entropy(clf(h[top]), torch.zeros(8, dtype=torch.long))
    torch.testing.assert_close(aux, total / 3)


def test_dtfd_pseudo_bags_have_array_split_sizes_and_cover_the_bag():
    g = torch.Generator().manual_seed(0)
    parts = pseudo_bag_indices(10, 4, g)
    assert [len(p) for p in parts] == [3, 3, 2, 2]
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    assert [len(p) for p in pseudo_bag_indices(2, 4, g)] == [1, 1]


def test_dtfd_with_one_pseudo_bag_is_two_gated_attention_poolings():
    model = build_aggregator("dtfd-mil", 10, 2, seed=0, hidden_dim=16, n_groups=1).double().eval()
    x = torch.randn(1, 20, 10, dtype=torch.double)
    h = model.reduce(x[0])
    a = torch.softmax(model.attention1(h).squeeze(-1), dim=0)
    pooled = (a @ h)[None]  # AFS: the one distilled feature
    a2 = torch.softmax(model.attention2(pooled).squeeze(-1), dim=0)  # a single instance: weight 1
    out = model(x)
    torch.testing.assert_close(out.logits[0], model.classifier2(a2 @ pooled))
    torch.testing.assert_close(out.attention[0], a)


def test_dtfd_tiers_learn_from_their_own_losses_only():
    model = build_aggregator("dtfd-mil", 10, 2, seed=0, hidden_dim=16).train()
    out = model(torch.randn(1, 30, 10), label=torch.tensor([1]))
    out.logits.sum().backward(retain_graph=True)  # the bag loss reaches tier 2 only
    tier1 = [p for n, p in model.named_parameters() if n.startswith(("reduce", "attention1", "classifier1"))]
    assert all(p.grad is None for p in tier1)
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith(("attention2", "classifier2")))
    model.zero_grad()
    out.aux_loss.backward()  # the pseudo-bag loss reaches tier 1 only
    assert all(p.grad is not None for p in tier1)
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("classifier2"))


@pytest.mark.parametrize("distill", ["MaxMinS", "MaxS"])
def test_dtfd_instance_distillation_picks_by_the_last_class_cam(distill):
    model = build_aggregator("dtfd-mil", 10, 2, seed=0, hidden_dim=16, n_groups=1, distill=distill).double().eval()
    x = torch.randn(1, 12, 10, dtype=torch.double)
    h = model.reduce(x[0])
    a = torch.softmax(model.attention1(h).squeeze(-1), dim=0)
    cam = (a[:, None] * h) @ model.classifier1.weight.T
    order = torch.argsort(torch.softmax(cam, 1)[:, -1], descending=True)
    pick = order[:1] if distill == "MaxS" else torch.cat([order[:1], order[-1:]])
    feats = h[pick]
    a2 = torch.softmax(model.attention2(feats).squeeze(-1), dim=0)
    torch.testing.assert_close(model(x).logits[0], model.classifier2(a2 @ feats))
    assert math.isclose(float(model(x).attention.sum().detach()), 1.0, rel_tol=1e-9)


def test_maxmil_takes_the_max_over_instance_logits_and_max_the_max_over_features():
    x = torch.randn(1, 15, 12, dtype=torch.double)
    m = build_aggregator("maxmil", 12, 3, seed=0, hidden_dim=16).double().eval()
    h = m.proj(x)[0]
    torch.testing.assert_close(m(x).logits[0], m.classifier(h).max(0).values)
    f = build_aggregator("max", 12, 3, seed=0, hidden_dim=16).double().eval()
    torch.testing.assert_close(f(x).logits[0], f.classifier(f.proj(x)[0].max(0).values))


def test_dsmil_max_loss_bce_is_dsmil_wsi_bce_with_logits():
    x = torch.randn(2, 10, 12)
    label = torch.tensor([0, 2])
    m = build_aggregator("dsmil", 12, 3, seed=0, hidden_dim=16, dropout=0.0, max_loss="bce").train()
    scores = m.instance_classifier(m.proj(x)).max(dim=1).values  # (B, C)
    expected = F.binary_cross_entropy_with_logits(scores, F.one_hot(label, 3).float())
    torch.testing.assert_close(m(x, label=label).aux_loss, expected)


def test_abmilx_feat_is_the_authors_two_stage_config():
    feat = build_aggregator("abmilx-feat", 1024, 2)
    plain = build_aggregator("abmilx", 1024, 2)
    assert not any(isinstance(mod, torch.nn.LayerNorm) for mod in feat.proj)
    assert isinstance(plain.proj[0], torch.nn.LayerNorm) and plain.proj[1].bias is None
    assert feat.proj[0].bias is not None and isinstance(feat.proj[1], torch.nn.ReLU)
    assert feat.classifier.bias is not None and feat.out_proj.bias is not None


def test_smooth_svm_and_hard_hinge_differ_by_the_stated_bound():
    """clam.py's docstring: tau * log(1 + (C-1) exp(alpha/tau) / 1000) where topk switches to the hinge."""
    from baselines.mil.clam import smooth_top1_svm_loss

    # the topk package switches to the hinge once the true score leads every other by tau * log(1000)
    # (the margin alpha not counted); at that point the hinge is 0 and the smooth loss is the bound
    for c in (2, 3):
        logits = torch.zeros(1, c, dtype=torch.double)
        logits[0, 0] = math.log(1000)
        smooth = smooth_top1_svm_loss(logits, torch.tensor([0]), alpha=1.0, tau=1.0)
        hinge = torch.clamp(logits[0, 1:] + 1.0 - logits[0, 0], min=0).max()  # 0 here
        bound = math.log(1 + (c - 1) * math.exp(1.0) / 1000)
        assert float(smooth - hinge) == pytest.approx(bound, rel=1e-9)
    assert bound > math.log(1 + 1e-3)  # the old statement was too small
