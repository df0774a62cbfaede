"""The work-item plan of a suite (bench.orchestration.plan): items, dependencies, device needs; no training."""

from __future__ import annotations

import pytest

from bench.orchestration.plan import EXTRACT_SHARDS, build_plan
from bench.orchestration.runner import RunOptions
from bench.orchestration.suite import load_suite

SUITE = """
name = "plan"
description = "plan test"
seeds = [0, 1]
bootstrap = 100

[defaults.two-stage]
epochs = 1

[defaults.gma]
epochs = 1
tiles = 8
nproc = 3

[[datasets]]
name = "a"
task = "classification"
classes = ["IDC", "ILC"]
split = { protocol = "kfold", folds = 3 }
two_stage = { magnification = 10, patch_size = 64, input_size = 32 }
e2e = { magnification = 5, patch_size = 64, input_size = 32 }
synthetic = { kind = "subtyping", n_slides = 12 }

[[methods]]
paradigm = "two-stage"
encoder = "resnet18-trunc"
aggregators = ["abmil", "mean"]
random_init = true

[[methods]]
paradigm = "gma"
encoder = "resnet18-trunc"
aggregator = "gma"
random_init = true

[demo]
defaults.two-stage = { epochs = 1 }
"""


@pytest.fixture
def plan(tmp_path):
    path = tmp_path / "plan.toml"
    path.write_text(SUITE)
    return build_plan(load_suite(path, demo=True), RunOptions(workdir=tmp_path / "w", device="cpu"))


def test_every_stage_becomes_items_with_their_dependencies(plan):
    ids = [it.id for it in plan.items]
    assert len(ids) == len(set(ids))
    by = {it.id: it for it in plan.items}
    kinds = [it.kind for it in plan.items]
    assert kinds.count("tile") == 2  # two-stage at 10x, GMA at 5x
    assert kinds.count("split") == 2  # one file per seed
    assert kinds.count("extract") == EXTRACT_SHARDS  # one encoder (abmil and mean read the same features)
    assert kinds.count("train") == 3 * 2 * 3  # methods x seeds x folds
    assert ids[-1] == "leaderboard/plan" and set(by[ids[-1]].after) == {i for i in ids if i.startswith("train/")}
    position = {i: n for n, i in enumerate(ids)}
    for it in plan.items:  # a runnable order: every dependency comes first
        assert all(position[d] < position[it.id] for d in it.needs + it.after)
    abmil = by["train/a/two-stage/resnet18-trunc/abmil/kfold-seed1-fold2"]
    assert {d.split("/")[0] for d in abmil.needs} == {"tile", "split", "extract"}
    gma = by["train/a/gma/resnet18-trunc/gma/kfold-seed0-fold0"]
    assert not any(d.startswith("extract/") for d in gma.needs)
    assert (gma.gpus, abmil.gpus) == (3, 1)  # GMA asks for nproc devices
    shards = sorted(it.shard for it in plan.items if it.kind == "extract")
    assert shards == [(i, EXTRACT_SHARDS) for i in range(EXTRACT_SHARDS)]


def test_fingerprints_follow_the_settings_an_item_depends_on(tmp_path):
    path = tmp_path / "plan.toml"
    path.write_text(SUITE)
    base = {it.id: it.fingerprint for it in build_plan(load_suite(path, demo=True), RunOptions(workdir=tmp_path)).items}
    path.write_text(SUITE.replace("[defaults.two-stage]\nepochs = 1", "[defaults.two-stage]\nepochs = 1\nlr = 0.01"))
    changed = {it.id: it.fingerprint for it in build_plan(load_suite(path, demo=True), RunOptions(workdir=tmp_path)).items}
    differ = {i for i in base if base[i] != changed[i]}
    assert differ == {i for i in base if i.startswith("train/a/two-stage/")}


def test_no_leaderboard_item_without_leaderboards(tmp_path):
    path = tmp_path / "plan.toml"
    path.write_text(SUITE)
    plan = build_plan(load_suite(path, demo=True), RunOptions(workdir=tmp_path, leaderboards=None))
    assert not any(it.kind == "leaderboard" for it in plan.items)
