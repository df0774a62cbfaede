"""Cost accounting: timers, FLOPs, parameters, peak memory, the Costs record."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest
import torch

from bench.evaluation.costs import (
    Costs,
    PeakMemory,
    StageTimer,
    count_flops,
    count_parameters,
    cpu_model,
    device_name,
    peak_memory_mb,
    software_versions,
)
from bench.common.errors import DataError


def test_stage_timer_accumulates_per_stage_and_counts_failed_blocks():
    timer = StageTimer()
    for _ in range(2):
        with timer.stage("train"):
            time.sleep(0.03)
    with pytest.raises(RuntimeError):
        with timer.stage("infer"):
            time.sleep(0.02)
            raise RuntimeError("boom")
    assert timer.calls == {"train": 2, "infer": 1}
    assert 0.06 <= timer.seconds["train"] < 1.0
    assert 0.02 <= timer.seconds["infer"] < 1.0
    assert timer.total() == pytest.approx(timer.seconds["train"] + timer.seconds["infer"])
    assert timer.total("train") == timer.seconds["train"]


@pytest.mark.parametrize("batch, d_in, d_out", [(1, 7, 3), (5, 1024, 512)])
def test_flops_of_a_linear_layer_are_two_times_in_out_batch(batch, d_in, d_out):
    layer = torch.nn.Linear(d_in, d_out)
    assert count_flops(layer, torch.randn(batch, d_in)) == 2 * d_in * d_out * batch


def test_flops_add_up_over_layers_and_restore_the_training_mode():
    mlp = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(20, 4))
    mlp.train()
    # A bag of 30 instances (1, N, D) like an aggregator sees.
    assert count_flops(mlp, (torch.randn(1, 30, 10),)) == 2 * 30 * (10 * 20 + 20 * 4)
    assert mlp.training


def test_parameter_counts_total_and_trainable():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2, bias=False))
    model[0].requires_grad_(False)
    counts = count_parameters(model)
    assert counts.total == 8 * 4 + 4 + 4 * 2
    assert counts.trainable == 4 * 2


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux-only")
def test_cpu_peak_memory_is_positive_grows_with_a_big_array_and_resets():
    import mmap

    # an anonymous mapping is always fresh pages: a heap allocation could reuse memory that an earlier test left
    # resident (then the RSS, and so its peak, would not grow; seen once in a full CI run)
    with PeakMemory("cpu") as first:
        base = _rss_mb()
        buf = mmap.mmap(-1, 300 * 2**20)
        big = np.frombuffer(buf, dtype=np.uint8)
        big[:] = 1  # 300 MiB, touched
    assert first.kind == "peak_rss_since_reset"
    assert first.mb - base == pytest.approx(300, rel=0.15)
    del big
    buf.close()
    with PeakMemory("cpu") as second:
        small = np.ones(2**20)
    del small
    # The reset forgot the 300 MiB peak.
    assert 0 < second.mb < first.mb - 200
    assert peak_memory_mb("cpu") < first.mb - 200


def test_device_and_versions():
    assert device_name("cpu").startswith(cpu_model())
    v = software_versions()
    assert v["torch"] == torch.__version__.split("+")[0]
    assert {"python", "timm", "harness", "platform"} <= set(v)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_memory_counts_a_tensor():
    with PeakMemory("cuda") as m:
        x = torch.empty(64 * 2**20 // 4, device="cuda")
        del x
    assert m.kind == "cuda_max_allocated" and m.mb >= 64
    assert device_name("cuda") == torch.cuda.get_device_name(0)


def test_two_stage_costs_add_the_extraction_share():
    base = Costs(train_seconds=100.0, infer_seconds_per_slide=0.5, peak_memory_mb=900.0, params=1000,
                 flops=2_000_000, device="cpu")
    seconds = {"s1": 10.0, "s2": 20.0, "s3": 30.0, "t1": 4.0, "t2": 6.0, "unused": 99.0}
    c = base.with_feature_extraction(seconds, fit_slides=["s1", "s2", "s3"], test_slides=["t1", "t2"])
    assert c.train_seconds == 160.0 and c.feature_seconds == 60.0
    assert c.infer_seconds_per_slide == 5.5 and c.feature_seconds_per_slide == 5.0
    assert json.loads(json.dumps(c.to_dict()))["train_seconds"] == 160.0
    with pytest.raises(DataError, match="t3"):
        base.with_feature_extraction(seconds, ["s1"], ["t3"])
