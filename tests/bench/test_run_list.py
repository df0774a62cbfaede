"""`bench run --list`: the grid a suite runs and its size (datasets x methods x seeds x folds)."""

from __future__ import annotations

from bench.cli.commands.run import grid_line, grid_size
from bench.cli.main import main
from bench.orchestration.suite import load_suite

SUITE = """
name = "gridded"
seeds = [0, 1]
[[datasets]]
name = "d1"
task = "classification"
split = { protocol = "kfold", folds = 3 }
[[datasets]]
name = "d2"
task = "classification"
[[methods]]
paradigm = "two-stage"
encoder = "resnet18-trunc"
aggregators = ["abmil", "mean", "max"]
"""


def _suite(tmp_path, text=SUITE):
    p = tmp_path / "gridded.toml"
    p.write_text(text)
    return p


def test_grid_size_sums_each_datasets_folds(tmp_path):
    suite = load_suite(_suite(tmp_path))
    total, folds = grid_size(suite, suite.seeds)
    assert folds == [3, 1]  # kfold 3, holdout 1
    assert total == 3 * 2 * (3 + 1) == 24
    assert grid_line(suite, suite.seeds) == "grid: 3 methods x 2 seeds x (d1 3 + d2 1) dataset folds = 24 runs"
    # a dataset's `folds` list restricts the folds run; selection shrinks the grid
    one = load_suite(_suite(tmp_path, SUITE.replace('folds = 3 }', 'folds = 3 }\nfolds = [0, 2]')))
    assert grid_size(one, one.seeds) == (3 * 2 * (2 + 1), [2, 1])
    sel = suite.select(datasets=["d1"], methods=["*/abmil"])
    assert grid_line(sel, (0, 1, 2)) == "grid: 1 datasets x 1 methods x 3 seeds x 3 folds = 9 runs"


def test_cli_list_prints_the_grid_and_its_size(tmp_path, capsys):
    path = _suite(tmp_path)
    root = tmp_path / "data"
    root.mkdir()
    assert main(["run", "--suite", str(path), "--list", "--data-root", str(root), "--seeds", "0", "1", "2"]) == 0
    out = capsys.readouterr().out
    assert "grid: 3 methods x 3 seeds x (d1 3 + d2 1) dataset folds = 36 runs" in out
    assert "two-stage/resnet18-trunc/max" in out and "folds |" in out
    assert not any(root.iterdir())  # listing reads nothing and writes nothing
