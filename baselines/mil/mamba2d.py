"""2DMamba (Zhang et al., CVPR 2025; the ABMILX paper's Table 1 baseline): an optional, GPU-only aggregator.

2DMamba scans the patch-feature grid with a 2D selective state-space scan whose CUDA kernel the authors
build themselves (AtlasAnalyticsLab/2DMamba: `cuda_kernel/build.sh` with CMake produces the module
`v2dmamba_scan`; their README lists packing it into a Python package as a to-do) on top of `mamba-ssm`.
Neither can be built here (no CUDA), so this module only says what is missing:

- `require_kernel()` raises `KernelUnavailable` (a ConfigError) naming the missing piece and the commands
  to install it (`pip install -e '.[mamba2d]'` for mamba-ssm, then the authors' kernel build);
- `KernelUnavailable.skip_run` is True: `bench run` records such a method as *skipped* with that reason
  (not failed) and the other runs go on.

The aggregator around the kernel is not implemented yet: with the kernel importable, building it still
raises `KernelUnavailable`, saying so, rather than running something that is not 2DMamba.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from baselines.mil.base import MILAggregator, MILOutput
from bench.common.errors import ConfigError

KERNEL_MODULE = "v2dmamba_scan"  # the authors' compiled scan (pscan.so under v2dmamba_scan/)
MAMBA_MODULE = "mamba_ssm"
INSTALL = ("pip install -e '.[mamba2d]' (mamba-ssm), then build the authors' kernel: git clone "
           "https://github.com/AtlasAnalyticsLab/2DMamba && cd 2DMamba/cuda_kernel && bash build.sh "
           "(set -DPython_ROOT_DIR in build.sh; `import v2dmamba_scan` must work)")


class KernelUnavailable(ConfigError):
    """An optional GPU kernel is missing: the method cannot run on this machine (recorded as skipped)."""

    skip_run = True


def kernel_problem(importer: Callable[[str], object] = importlib.import_module) -> str | None:
    """Why 2DMamba cannot run here (None when CUDA, mamba-ssm and the authors' kernel are all present)."""
    if not torch.cuda.is_available():
        return "2DMamba's selective-scan kernel is CUDA-only and no CUDA device is visible"
    for module, what in ((MAMBA_MODULE, "mamba-ssm"), (KERNEL_MODULE, "the 2DMamba CUDA kernel")):
        try:
            importer(module)
        except ImportError as exc:
            return f"{what} cannot be imported ({type(exc).__name__}: {exc})"
    return None


def require_kernel(importer: Callable[[str], object] = importlib.import_module) -> None:
    """Raise `KernelUnavailable` with the reason and the install commands unless 2DMamba can run."""
    problem = kernel_problem(importer)
    if problem is not None:
        raise KernelUnavailable(f"aggregator '2dmamba' cannot run here: {problem}. To run it on a CUDA machine: "
                                f"{INSTALL}")
    raise KernelUnavailable("aggregator '2dmamba': the kernel is importable, but the 2DMamba aggregator around it "
                            "is not implemented in this harness yet")


class Mamba2DMIL(MILAggregator):
    """Placeholder of the 2DMamba aggregator: building it checks the kernel and raises `KernelUnavailable`."""

    permutation_invariant = False

    def __init__(self, in_dim: int, n_outputs: int, hidden_dim: int = 512, dropout: float = 0.25) -> None:
        require_kernel()
        super().__init__(in_dim, n_outputs, hidden_dim)  # pragma: no cover - unreachable until it exists

    def aggregate(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                  label: torch.Tensor | None = None) -> MILOutput:  # pragma: no cover
        raise NotImplementedError


__all__ = ["KernelUnavailable", "Mamba2DMIL", "kernel_problem", "require_kernel", "KERNEL_MODULE", "INSTALL"]
