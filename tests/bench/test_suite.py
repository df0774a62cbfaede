"""Suite files: validation at the edge, method grids, the demo overlay, selection."""

from __future__ import annotations

import pytest

from bench.common.errors import ConfigError, MissingFileError
from bench.orchestration.suite import builtin_suites, load_suite, parse_suite

MINIMAL = """
name = "mini"
[[datasets]]
name = "d1"
task = "classification"
[[methods]]
paradigm = "two-stage"
encoder = "resnet18-trunc"
aggregators = ["abmil", "mean"]
"""


def write(tmp_path, text, name="suite.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", ["subtyping", "grading", "survival"])
def test_builtin_suites_load_in_both_modes(name):
    full, demo = load_suite(name), load_suite(name, demo=True)
    assert full.name == demo.name == name and not full.demo and demo.demo
    # the real suite lists the paper's methods: two-stage x foundation models, E2E ABMILX, GMA
    names = {m.name for m in full.methods}
    assert {"two-stage/resnet50-trunc/abmil", "two-stage/uni/abmilx", "e2e/resnet18-trunc/abmilx",
            "e2e/resnet50-trunc/abmilx", "gma/resnet18-trunc/gma"} <= names
    # the demo runs every paradigm, with explicitly random-initialised small encoders
    assert {m.paradigm for m in demo.methods} == {"two-stage", "e2e", "gma"}
    assert all(m.random_init and m.encoder == "resnet18-trunc" for m in demo.methods)
    assert all(d.synthetic for d in demo.datasets)
    assert set(builtin_suites()) >= {"subtyping", "grading", "survival"}


def test_paper_hyperparameters_in_builtins():
    sub = load_suite("subtyping")
    e2e = sub.method_params(sub.method("e2e/resnet18-trunc/abmilx"))
    assert (e2e["optimizer"], e2e["lr"], e2e["weight_decay"], e2e["epochs"]) == ("adamw", 8e-5, 0.0, 75)
    assert sub.method_params(sub.method("two-stage/uni/abmil"))["lr"] == 1e-4
    assert sub.method_params(sub.method("two-stage/resnet50-trunc/abmil"))["lr"] == 2e-4
    grading = load_suite("grading")
    g = grading.method_params(grading.method("e2e/resnet18-trunc/abmilx"))
    assert (g["optimizer"], g["lr"], g["weight_decay"], g["epochs"]) == ("adam", 2e-4, 1e-5, 200)
    surv = load_suite("survival")
    s = surv.method_params(surv.method("e2e/resnet18-trunc/abmilx"))
    assert (s["lr"], s["weight_decay"], s["epochs"]) == (8e-5, 5e-2, 30)
    assert sub.dataset("tcga-brca").oversample == 2.0
    assert grading.dataset("panda").split["source"] == "abmilx-panda"  # the authors' 7:1:2 split, shipped
    assert load_suite("grading", demo=True).dataset("panda").split["ratios"] == (0.5, 0.1, 0.4)  # the demo's own holdout


def test_grid_expands_and_names(tmp_path):
    s = load_suite(write(tmp_path, MINIMAL))
    assert [m.name for m in s.methods] == ["two-stage/resnet18-trunc/abmil", "two-stage/resnet18-trunc/mean"]
    assert s.seeds == (0,) and s.bootstrap == 1000


def test_typo_key_is_named_with_file_and_suggestion(tmp_path):
    p = write(tmp_path, MINIMAL.replace('task = "classification"', 'task = "classification"\nprimary_metrc = "auc"'))
    with pytest.raises(ConfigError) as exc:
        load_suite(p)
    msg = str(exc.value)
    assert str(p) in msg and "datasets[0]" in msg and "primary_metrc" in msg and "primary_metric" in msg


def test_bad_values_are_named(tmp_path):
    cases = {
        'task = "classification"': ('task = "clasification"', "classification"),
        'paradigm = "two-stage"': ('paradigm = "2stage"', "two-stage"),
    }
    for old, (new, hint) in cases.items():
        with pytest.raises(ConfigError, match=hint):
            load_suite(write(tmp_path, MINIMAL.replace(old, new)))
    with pytest.raises(ConfigError, match="ratios must sum to 1"):
        parse_suite({"name": "x", "methods": [{"paradigm": "e2e", "encoder": "e", "aggregator": "a"}],
                     "datasets": [{"name": "d", "task": "survival", "e2e": {"scales": [[10, 0.5], [5, 0.2]]}}]})
    with pytest.raises(ConfigError, match="duplicate method"):
        load_suite(write(tmp_path, MINIMAL + MINIMAL[MINIMAL.index("[[methods]]"):]))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_suite(write(tmp_path, "name = = 1"))


def test_search_space_validation(tmp_path):
    ok = MINIMAL + '[methods.search]\nlr = { type = "float", low = 1e-5, high = 1e-3, log = true }\n' \
        '"aggregator.dropout" = { type = "categorical", choices = [0.0, 0.25] }\n'
    s = load_suite(write(tmp_path, ok))
    assert s.methods[0].search["lr"].log and s.methods[0].search["aggregator.dropout"].choices == (0.0, 0.25)
    with pytest.raises(ConfigError, match="low must be below high"):
        load_suite(write(tmp_path, MINIMAL + '[methods.search]\nlr = { type = "float", low = 1, high = 0.1 }\n'))
    with pytest.raises(ConfigError, match="log-scale range needs low > 0"):
        load_suite(write(tmp_path, MINIMAL + '[methods.search]\nlr = { type = "float", low = 0, high = 1, log = true }\n'))


def test_demo_overlay_merges_and_replaces(tmp_path):
    text = MINIMAL.replace('task = "classification"', 'task = "classification"\ntwo_stage = { magnification = 20, patch_size = 256 }') + """
[defaults.two-stage]
epochs = 75
lr = 2e-4
[demo]
description = "demo"
[demo.defaults.two-stage]
epochs = 3
[demo.datasets.d1]
two_stage = { patch_size = 128 }
synthetic = { kind = "subtyping", n_slides = 8 }
[[demo.methods]]
paradigm = "two-stage"
encoder = "resnet18-trunc"
aggregator = "mean"
"""
    p = write(tmp_path, text)
    real, demo = load_suite(p), load_suite(p, demo=True)
    assert real.dataset("d1").two_stage.patch_size == 256 and not real.dataset("d1").synthetic
    d = demo.dataset("d1")
    assert (d.two_stage.magnification, d.two_stage.patch_size) == (20, 128)  # merged, not replaced
    assert [m.name for m in demo.methods] == ["two-stage/resnet18-trunc/mean"]
    assert demo.method_params(demo.methods[0]) == {"epochs": 3, "lr": 2e-4}
    with pytest.raises(ConfigError, match="no \\[demo\\] table"):
        load_suite(write(tmp_path, MINIMAL, "nodemo.toml"), demo=True)


def test_unknown_suite_and_selection():
    with pytest.raises(ConfigError, match="unknown suite 'subtypng'.*subtyping"):
        load_suite("subtypng")
    with pytest.raises(MissingFileError):
        load_suite("nothere.toml")
    s = load_suite("subtyping")
    sel = s.select(datasets=["tcga-brca"], methods=["e2e/*", "gma/resnet18-trunc/gma"])
    assert [d.name for d in sel.datasets] == ["tcga-brca"]
    assert [m.paradigm for m in sel.methods] == ["e2e", "e2e", "e2e", "e2e", "gma"]
    with pytest.raises(ConfigError, match="unknown method 'e2e/resnet18-trunc/abmlx'.*e2e/resnet18-trunc/abmilx"):
        s.select(methods=["e2e/resnet18-trunc/abmlx"])


@pytest.mark.parametrize("table, where, demo", [
    ('[defaults.two-stage]\nepocs = 3\n', "defaults.two-stage.epocs", False),
    ('[demo]\n[demo.defaults.e2e]\nepocs = 3\n', "demo.defaults.e2e.epocs", True),
])
def test_a_trainer_parameter_typo_in_defaults_fails_at_load_naming_file_key_and_suggestion(tmp_path, table, where,
                                                                                           demo):
    path = write(tmp_path, MINIMAL + table)
    with pytest.raises(ConfigError) as err:
        load_suite(path, demo=demo)
    message = str(err.value)
    assert str(path) in message and where in message and "did you mean 'epochs'?" in message


def test_a_method_parameter_typo_and_a_search_key_typo_fail_at_load(tmp_path):
    path = write(tmp_path, MINIMAL.replace('aggregators = ["abmil", "mean"]', 'aggregator = "abmil"\n'
                                           'params = { patienc = 3 }'))
    with pytest.raises(ConfigError, match=r"methods\[0\]\.params\.patienc: unknown key 'patienc'; did you mean 'patience'"):
        load_suite(path)
    path = write(tmp_path, MINIMAL + '[methods.search]\nlearning_rate = { type = "float", low = 1e-5, high = 1e-3 }\n'
                 '"aggregator.dropout" = { type = "float", low = 0.0, high = 0.5 }\n')
    with pytest.raises(ConfigError, match=r"search\.learning_rate"):
        load_suite(path)


def test_a_bad_parameter_value_fails_before_any_stage(tmp_path):
    from bench.orchestration.runner import RunOptions, run_suite

    path = write(tmp_path, MINIMAL + '[defaults.two-stage]\nepochs = -2\n')
    suite = load_suite(path)  # keys are fine; the value is the trainer's to refuse
    work = tmp_path / "work"
    with pytest.raises(ConfigError) as err:
        run_suite(suite, RunOptions(workdir=work, leaderboards=None))
    assert str(path) in str(err.value) and "epochs" in str(err.value) and "d1" in str(err.value)
    assert not work.exists()  # nothing synthesised, tiled or split


def test_planted_expectations_are_validated_and_carry_the_knob(tmp_path):
    base = MINIMAL.replace('task = "classification"\n', 'task = "classification"\n'
                           'synthetic = { kind = "subtyping", witness_rate = 0.1 }\n{expect}\n', 1)
    ok = 'expect = [{ better = "two-stage/resnet18-trunc/abmil", than = "two-stage/resnet18-trunc/mean", planted = "witness_rate" }]'
    suite = load_suite(write(tmp_path, base.replace("{expect}", ok)))
    (e,) = suite.expectations()["d1"]
    assert (e["better"], e["than"], e["planted"], e["value"]) == (
        "two-stage/resnet18-trunc/abmil", "two-stage/resnet18-trunc/mean", "witness_rate", 0.1)
    assert "mean pooling" in e["expected"]
    bad = {
        ok.replace("two-stage/resnet18-trunc/mean", "two-stage/resnet18-trunc/meen"): "unknown method 'two-stage/resnet18-trunc/meen'",
        ok.replace('"witness_rate"', '"lesion_contrast"'): "does not set lesion_contrast",
        ok.replace('"witness_rate"', '"witness"'): "witness",
        ok.replace("two-stage/resnet18-trunc/mean", "two-stage/resnet18-trunc/abmil"): "the same method",
        ok.replace(', planted = "witness_rate"', ""): "missing required key 'planted'",
    }
    for text, message in bad.items():
        with pytest.raises(ConfigError, match="expect") as err:
            load_suite(write(tmp_path, base.replace("{expect}", text)))
        assert message in str(err.value), str(err.value)
    # the built-in demos plant at least one contrast per subtyping dataset, none in the real suites
    demo = load_suite("subtyping", demo=True).expectations()
    assert set(demo) == {"tcga-brca", "tcga-nsclc"} and not load_suite("subtyping").expectations()


def test_a_bad_split_is_an_error_at_load_naming_the_dataset(tmp_path):
    text = MINIMAL.replace('task = "classification"\n', 'task = "classification"\n'
                           'split = { protocol = "holdout", ratios = [0.35, 0.15, 0.5], val_fraction = 0.2 }\n', 1)
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.split: give either three ratios"):
        load_suite(write(tmp_path, text))
