"""CLAM-SB, DSMIL and TransMIL pieces against direct computations of their papers' formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from baselines.mil import build_aggregator
from baselines.mil.clam import smooth_top1_svm_loss
from baselines.mil.nystrom import NystromAttention, iterative_pinv


def test_smooth_svm_is_cross_entropy_without_margin_and_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 3, generator=g, dtype=torch.float64)
    target = torch.randint(0, 3, (9,), generator=g)
    # with alpha = 0 and tau = 1, tau * logsumexp(s - s_y) is exactly cross-entropy
    torch.testing.assert_close(smooth_top1_svm_loss(logits, target, alpha=0.0), F.cross_entropy(logits, target))
    expected = []
    for s, y in zip(logits.tolist(), target.tolist()):
        terms = [(s[j] + (1.0 if j != y else 0.0) - s[y]) / 0.5 for j in range(3)]
        expected.append(0.5 * math.log(sum(math.exp(t) for t in terms)))
    assert smooth_top1_svm_loss(logits, target, alpha=1.0, tau=0.5).item() == pytest.approx(np.mean(expected), rel=1e-12)


def clam_instance_loss_by_hand(model, x, label, k, subtyping):
    """CLAM's inst_eval / inst_eval_out for one bag, with numpy argsort for top-k."""
    h = model.proj(x)[0]  # (N, L)
    attention = model(x).attention[0].detach().numpy()
    order = np.argsort(attention)
    top, bottom = order[::-1][:k].copy(), order[:k].copy()
    total = 0.0
    for c, clf in enumerate(model.instance_classifiers):
        if c == label:
            inst = torch.cat([h[top], h[bottom]])
            target = torch.tensor([1] * k + [0] * k)
        elif subtyping:
            inst, target = h[top], torch.zeros(k, dtype=torch.long)
        else:
            continue
        total = total + F.cross_entropy(clf(inst), target)
    return total / (len(model.instance_classifiers) if subtyping else 1)


def test_clam_instance_loss_matches_clams_procedure():
    x = torch.randn(1, 40, 10, dtype=torch.float64)
    for subtyping in (False, True):
        model = build_aggregator("clam-sb", 10, 3, seed=0, hidden_dim=16, dropout=0.0, subtyping=subtyping).double()
        model.train()  # dropout 0: train and eval paths compute the same attention
        aux = model(x, label=torch.tensor([1])).aux_loss
        expected = clam_instance_loss_by_hand(model, x, 1, k=8, subtyping=subtyping)
        torch.testing.assert_close(aux, expected)


def test_clam_caps_k_for_small_bags_and_never_samples_padding():
    model = build_aggregator("clam-sb", 10, 2, seed=0, hidden_dim=16, dropout=0.0, k_sample=8).double().train()
    small = torch.randn(1, 6, 10, dtype=torch.float64)  # 6 instances: k = 3, top and bottom disjoint
    expected = clam_instance_loss_by_hand(model, small, 0, k=3, subtyping=False)
    torch.testing.assert_close(model(small, label=torch.tensor([0])).aux_loss, expected)
    padded = torch.cat([small, torch.randn(1, 10, 10, dtype=torch.float64)], dim=1)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, :6] = True
    torch.testing.assert_close(model(padded, mask=mask, label=torch.tensor([0])).aux_loss, expected)


def test_clam_svm_instance_loss_option():
    x = torch.randn(1, 30, 10, dtype=torch.float64)
    ce = build_aggregator("clam-sb", 10, 2, seed=0, hidden_dim=16, dropout=0.0).double().train()
    svm = build_aggregator("clam-sb", 10, 2, seed=0, hidden_dim=16, dropout=0.0, inst_loss="svm").double().train()
    label = torch.tensor([1])
    a, b = ce(x, label=label).aux_loss, svm(x, label=label).aux_loss
    assert torch.isfinite(b) and not torch.allclose(a, b)
    # the smooth SVM adds a margin of 1 to wrong classes, so it is never below cross-entropy
    assert b > a


def test_dsmil_matches_the_reference_formulation():
    """DSMIL's MILNet for one bag: sort instance scores, critical instance per class,
    A = softmax(Q q_max^T / sqrt(128)) over instances, B = A^T V, Conv1d(C, C, kernel=L)."""
    model = build_aggregator("dsmil", 10, 3, seed=0, hidden_dim=16, q_dim=8, dropout=0.0).double().eval()
    x = torch.randn(1, 25, 10, dtype=torch.float64)
    feats = model.proj(x)[0]  # (N, L)
    classes = model.instance_classifier(feats)  # (N, C)
    _, m_indices = torch.sort(classes, 0, descending=True)
    m_feats = torch.index_select(feats, 0, m_indices[0, :])  # (C, L)
    q, q_max = model.q(feats), model.q(m_feats)
    a = torch.softmax(q @ q_max.T / math.sqrt(q.shape[1]), dim=0)  # (N, C)
    bag = a.T @ model.v(feats)  # (C, L)
    conv = torch.nn.Conv1d(3, 3, kernel_size=16).double()
    with torch.no_grad():
        conv.weight.copy_(model.bag_classifier.weight.reshape(3, 3, 16))
        conv.bias.copy_(model.bag_classifier.bias)
    expected = conv(bag[None]).reshape(1, 3)
    out = model(x)
    torch.testing.assert_close(out.logits, expected)
    torch.testing.assert_close(out.head_attention[0], a.T)
    train_out = model.train()(x, label=torch.tensor([2]))
    torch.testing.assert_close(train_out.aux_loss, F.cross_entropy(classes.max(0).values[None], torch.tensor([2])))


def test_iterative_pinv_inverts_a_softmax_matrix():
    g = torch.Generator().manual_seed(0)
    x = torch.softmax(torch.randn(2, 16, 16, generator=g, dtype=torch.float64) * 0.5, dim=-1)
    approx = iterative_pinv(x, iters=25)
    torch.testing.assert_close(approx, torch.linalg.pinv(x), rtol=1e-6, atol=1e-8)


def test_nystrom_is_exact_softmax_attention_when_every_token_is_a_landmark():
    # n == m: each landmark is one token, so softmax(QK~) pinv(softmax(Q~K~)) softmax(Q~K) = softmax(QK^T)
    torch.manual_seed(0)
    n, dim, heads = 12, 16, 2
    layer = NystromAttention(dim, heads=heads, dim_head=8, n_landmarks=n, pinv_iterations=30, dropout=0.0,
                             exact_short=False).double()
    x = torch.randn(1, n, dim, dtype=torch.float64)
    out, row = layer(x, cls_row=0)
    q, k, v = layer.to_qkv(x).reshape(1, n, 3, heads, 8).permute(2, 0, 3, 1, 4)
    exact = torch.softmax(q @ k.transpose(-1, -2) * 8**-0.5, dim=-1)  # (1, H, n, n)
    torch.testing.assert_close(row, exact[:, :, 0], rtol=1e-6, atol=1e-8)
    expected = (exact @ v + layer.res_conv(v)).transpose(1, 2).reshape(1, n, 16)
    torch.testing.assert_close(out, layer.to_out(expected), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("n, m", [(5, 8), (3, 16), (8, 8)])
def test_short_sequences_get_the_value_the_masked_landmark_path_converges_to(n, m):
    # fewer tokens than landmarks: pad landmarks masked, every token its own landmark; with a converged
    # pseudo-inverse the landmark path equals the exact shortcut (the default), and 6 iterations come close
    torch.manual_seed(1)
    x = torch.randn(2, n, 16, dtype=torch.float64)
    exact = NystromAttention(16, heads=2, dim_head=8, n_landmarks=m, dropout=0.0).double().eval()
    landmark = NystromAttention(16, heads=2, dim_head=8, n_landmarks=m, pinv_iterations=60, dropout=0.0,
                                exact_short=False).double().eval()
    landmark.load_state_dict(exact.state_dict())
    (out_e, row_e), (out_l, row_l) = exact(x, cls_row=0), landmark(x, cls_row=0)
    torch.testing.assert_close(out_e, out_l, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(row_e, row_l, rtol=1e-9, atol=1e-12)
    landmark.pinv_iterations = 6  # the reference's setting: an approximation of the same value
    assert float((landmark(x)[0] - out_e).abs().max()) < 5e-2 * float(out_e.abs().max())


def test_transmil_attention_folds_grid_fillers_back_onto_instances():
    model = build_aggregator("transmil", 10, 2, seed=0, hidden_dim=16, n_landmarks=4).double().eval()
    x = torch.randn(1, 7, 10, dtype=torch.float64)  # 7 instances -> 3 x 3 grid, 2 fillers
    out = model(x)
    assert out.head_attention.shape == (1, 8, 7)
    torch.testing.assert_close(out.head_attention.sum(-1), torch.ones(1, 8, dtype=torch.float64))
    assert (out.head_attention >= 0).all()
