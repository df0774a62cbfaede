"""2DMamba, an optional GPU-only extra: a clear error with the install commands where its CUDA kernel is
missing, and `bench run` records such a method as skipped (not failed) while the other runs go on."""

from __future__ import annotations

import json

import pytest
import torch

from baselines.mil import mamba2d
from baselines.mil.mamba2d import KernelUnavailable, Mamba2DMIL, kernel_problem, require_kernel
from bench.common.errors import ConfigError


def test_building_without_the_kernel_names_what_is_missing_and_the_pip_install():
    with pytest.raises(KernelUnavailable, match=r"aggregator '2dmamba' cannot run here: .*pip install -e "
                                                r"'\.\[mamba2d\]'.*AtlasAnalyticsLab/2DMamba.*build\.sh"):
        Mamba2DMIL(16, 2)
    assert issubclass(KernelUnavailable, ConfigError) and KernelUnavailable.skip_run is True


def test_each_missing_piece_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "CUDA-only" in kernel_problem()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen: list[str] = []

    def importer(missing: str):
        def imp(name: str):
            seen.append(name)
            if name == missing:
                raise ModuleNotFoundError(f"No module named {name!r}")
            return object()
        return imp

    assert kernel_problem(importer("mamba_ssm")).startswith("mamba-ssm cannot be imported")
    assert kernel_problem(importer(mamba2d.KERNEL_MODULE)).startswith("the 2DMamba CUDA kernel cannot be imported")
    assert kernel_problem(importer("nothing")) is None
    # everything importable: still refused, because the aggregator around the kernel is not written yet
    with pytest.raises(KernelUnavailable, match="not implemented in this harness yet"):
        require_kernel(importer("nothing"))


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
            Mamba2DMIL(8, 2)
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
