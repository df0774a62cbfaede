"""benchmarks/gpu_check.sh on a machine without CUDA: says what it would run, writes nothing, exits 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs the whole check (minutes)")
def test_gpu_check_without_cuda_lists_its_steps_and_exits_0(tmp_path):
    out = tmp_path / "figures"
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "no CUDA device here" in r.stdout
    for what in ("CUDA tests", "bench_extract.py --device cuda --encoders resnet50-trunc uni --batch-size 256 "
                 "--precision bf16", "bench_e2e.py --cuda", "bench_gma.py --cuda", f"{out}/gpu-figures.md"):
        assert what in r.stdout
    budget = sum(int(line.split("s |")[0]) for line in r.stdout.splitlines() if line.startswith("  ") and "s |" in line)
    assert budget <= 480  # one call of at most 8 minutes
    assert not out.exists()
