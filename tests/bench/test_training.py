"""Shared training pieces: selection on validation, schedules, NaN guard, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from bench.common.errors import ConfigError, DataError, TrainingError
from bench.evaluation.training import (
    Checkpoint,
    ModelSelector,
    check_finite,
    cosine_schedule,
    load_safetensors,
    make_optimizer,
    resolve_device,
    save_safetensors,
    seed_everything,
)


def test_selector_keeps_best_weights_and_later_ties():
    m = torch.nn.Linear(2, 1)
    sel = ModelSelector("auc", higher_is_better=True)
    kept = []
    for epoch, value in enumerate([0.6, 0.8, 0.8, float("nan"), 0.7]):
        with torch.no_grad():
            m.weight.fill_(epoch)
        kept.append(sel.update(epoch, value, {"model": m}))
    assert sel.best_epoch == 2 and sel.best_value == 0.8  # the tie at epoch 2 wins: it trained longer
    assert kept == [True, True, True, False, False]
    sel.restore({"model": m})
    assert torch.all(m.weight == 2)
    # a flat metric (a coarse validation split) keeps the last epoch, not the untrained first one
    flat = ModelSelector("c_index", patience=2)
    for epoch in range(5):
        flat.update(epoch, 0.5, {"model": m})
    assert flat.best_epoch == 4 and flat.should_stop  # ties do not reset the patience


def test_selector_lower_is_better_and_patience():
    m = torch.nn.Linear(1, 1)
    sel = ModelSelector("loss", higher_is_better=False, patience=2)
    stops = []
    for epoch, value in enumerate([1.0, 0.5, 0.6, 0.7, 0.4]):
        sel.update(epoch, value, {"m": m})
        stops.append(sel.should_stop)
    assert sel.best_epoch == 4 and stops == [False, False, False, True, False]


def test_cosine_schedule_values():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = make_optimizer("adamw", [p], lr=1.0)
    sched = cosine_schedule(opt, total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0)  # cosine starts at the top after warm-up
    assert lrs[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


def test_optimizer_choices_and_errors():
    p = [torch.nn.Parameter(torch.zeros(1))]
    assert isinstance(make_optimizer("Adam", p, 1e-3, 1e-5), torch.optim.Adam)
    with pytest.raises(ConfigError, match="unknown optimizer 'rmsprop'"):
        make_optimizer("rmsprop", p, 1e-3)
    with pytest.raises(ConfigError, match="learning rate"):
        make_optimizer("adamw", p, -1.0)


def test_check_finite_names_epoch_and_step():
    check_finite(torch.tensor(1.0), "loss", epoch=0)
    with pytest.raises(TrainingError, match="epoch 3, step 7") as exc:
        check_finite(torch.tensor(float("nan")), "training loss", epoch=3, step=7)
    assert exc.value.epoch == 3


def test_safetensors_roundtrip_and_bad_file(tmp_path):
    sd = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2])}
    save_safetensors(tmp_path / "w.safetensors", sd, {"epoch": 3, "note": "x"})
    loaded, meta = load_safetensors(tmp_path / "w.safetensors")
    assert torch.equal(loaded["a"], sd["a"]) and torch.equal(loaded["b"], sd["b"])
    assert meta == {"epoch": "3", "note": "x"}
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(DataError, match="bad.safetensors"):
        load_safetensors(tmp_path / "bad.safetensors")


def test_checkpoint_roundtrip_and_refuses_other_config(tmp_path):
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    opt = make_optimizer("adamw", list(a.parameters()) + list(b.parameters()), 1e-2)
    b(a(torch.randn(4, 3))).sum().backward()
    opt.step()
    ck = Checkpoint(tmp_path / "ck", config_hash="abc")
    ck.save(5, {"enc": a, "agg": b}, {"optimizer": opt.state_dict()})
    a2, b2 = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    state = Checkpoint(tmp_path / "ck", config_hash="abc").load({"enc": a2, "agg": b2})
    assert state["epoch"] == 5
    assert torch.equal(a2.weight, a.weight) and torch.equal(b2.bias, b.bias)
    opt2 = make_optimizer("adamw", list(a2.parameters()) + list(b2.parameters()), 1e-2)
    opt2.load_state_dict(state["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(ConfigError, match="another configuration"):
        Checkpoint(tmp_path / "ck", config_hash="other").load({"enc": a2, "agg": b2})


def test_seed_everything_repeats_and_validates():
    seed_everything(3)
    x = torch.randn(3)
    seed_everything(3)
    assert torch.equal(x, torch.randn(3))
    with pytest.raises(ConfigError):
        seed_everything(-1)


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")
