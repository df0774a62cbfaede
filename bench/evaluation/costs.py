"""Cost accounting: stage timers, peak memory, parameters, FLOPs, device, versions.

The cost columns of the ABMILX paper are the contract (`Costs`): training time
(two-stage runs add their share of feature extraction, as the paper's Table 6
does), inference seconds per slide, peak memory at bag batch size 1, parameter
count, FLOPs and the device they were measured on.

    >>> timer = StageTimer()
    >>> with timer.stage("train"):
    ...     pass
    >>> sorted(timer.seconds)
    ['train']

Peak memory means different things, recorded in `Costs.peak_memory_kind`:

- ``cuda_max_allocated``: `torch.cuda.max_memory_allocated` since the last
  `reset_peak_memory` (tensors only; no allocator cache, no CUDA context).
- ``peak_rss_since_reset``: on Linux, the peak resident set size of this
  process since the last reset (``VmHWM`` of /proc/self/status, reset by
  writing 5 to /proc/self/clear_refs). It counts everything in the process:
  the interpreter, imported libraries, cached data.
- ``process_peak_rss``: elsewhere, `resource.getrusage` ``ru_maxrss``, the
  process-lifetime peak, which cannot be reset, so the figure is an upper
  bound that includes whatever the process did before. On Linux it even
  includes the parent's memory at `fork` for a child process (the kernel
  carries it across `exec`), one more reason to prefer ``VmHWM``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from bench.common.errors import DataError

if TYPE_CHECKING:
    import torch


def _is_cuda(device: Any) -> bool:
    if device is None:
        return False
    return str(device).startswith("cuda")


class StageTimer:
    """Wall-clock seconds accumulated per named stage (a stage may run many times).

    With a CUDA `device`, the GPU is synchronised when a stage starts and ends,
    so queued kernels are charged to the stage that launched them.
    """

    def __init__(self, device: Any = None) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.notes: dict[str, list[str]] = {}  # stage -> what it ran with (shown in the stage table)

    def _sync(self) -> None:
        if _is_cuda(self.device):
            import torch

            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block and add it to `seconds[name]` (also when the block raises)."""
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.calls[name] = self.calls.get(name, 0) + 1

    def note(self, name: str, text: str) -> None:
        """Remember what stage `name` ran with (e.g. the extraction settings); each distinct text once."""
        texts = self.notes.setdefault(name, [])
        if text not in texts:
            texts.append(text)

    def total(self, *names: str) -> float:
        """Seconds of the named stages (all stages when none is named)."""
        return float(sum(self.seconds.get(n, 0.0) for n in (names or self.seconds)))

    def to_dict(self) -> dict[str, float]:
        return dict(self.seconds)


# ----------------------------------------------------------------------------- memory


_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _vm_hwm_mb() -> float | None:
    """Peak RSS of the current process image in MiB (Linux), None where unavailable."""
    try:
        with open(_STATUS, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None
    return None


def _rusage_peak_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # macOS bytes, Linux KiB


def reset_peak_memory(device: Any = None) -> str:
    """Start a new peak on `device`; returns the kind of peak that `peak_memory_mb` will then report."""
    if _is_cuda(device):
        import torch

        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda_max_allocated"
    if _vm_hwm_mb() is not None:
        try:
            with open(_CLEAR_REFS, "w", encoding="ascii") as f:
                f.write("5")  # Linux >= 4.0: reset VmHWM to the current RSS
            return "peak_rss_since_reset"
        except OSError:
            pass  # not allowed here: fall back to the lifetime peak
    return "process_peak_rss"


def peak_memory_kind(device: Any = None) -> str:
    """What `peak_memory_mb` measures on `device` (see the module docstring)."""
    if _is_cuda(device):
        return "cuda_max_allocated"
    return "peak_rss_since_reset" if _vm_hwm_mb() is not None else "process_peak_rss"


def peak_memory_mb(device: Any = None) -> float:
    """Peak memory in MiB: CUDA max allocated, or the process peak RSS on CPU (module docstring)."""
    if _is_cuda(device):
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm = _vm_hwm_mb()
    return hwm if hwm is not None else _rusage_peak_mb()


@dataclass
class PeakMemory:
    """Context manager: `with PeakMemory(device) as m: ...` then `m.mb` (see `peak_memory_mb`)."""

    device: Any = None
    mb: float = 0.0
    kind: str = ""

    def __enter__(self) -> PeakMemory:
        self.kind = reset_peak_memory(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        if _is_cuda(self.device):
            import torch

            torch.cuda.synchronize(self.device)
        self.mb = _rusage_peak_mb() if self.kind == "process_peak_rss" else peak_memory_mb(self.device)


# ----------------------------------------------------------------------------- model size


@dataclass(frozen=True)
class ParamCount:
    total: int
    trainable: int


def count_parameters(model: torch.nn.Module) -> ParamCount:
    """Parameters of `model` (shared parameters counted once)."""
    params = list(model.parameters())
    return ParamCount(
        total=int(sum(p.numel() for p in params)),
        trainable=int(sum(p.numel() for p in params if p.requires_grad)),
    )


def count_flops(model: torch.nn.Module, example_input: Any) -> int:
    """Forward FLOPs of `model` on `example_input` (torch.utils.flop_counter).

    `example_input` is a tensor, a tuple of positional arguments or a dict of
    keyword arguments. The model runs once in eval mode under `no_grad` and its
    train/eval mode is restored. The counter counts a multiply-add as 2 FLOPs
    and covers matmuls, convolutions and attention; elementwise operations,
    norms and softmax are not counted (so a Linear layer is 2*batch*in*out).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            if isinstance(example_input, Mapping):
                model(**example_input)
            elif isinstance(example_input, tuple):
                model(*example_input)
            else:
                model(example_input)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------- device, versions


def cpu_model() -> str:
    """The CPU model string ("Intel(R) Xeon(R) ..."), or the architecture when unknown."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown cpu"


def device_name(device: Any = None) -> str:
    """Human name of the device: the CUDA GPU name, or the CPU model with its core count."""
    if _is_cuda(device):
        import torch

        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cores)"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def software_versions() -> dict[str, str]:
    """Versions that change numbers or speed: python, torch (+CUDA), timm, numpy, the harness, the OS."""
    from bench import __version__

    out = {
        "python": platform.python_version(),
        "torch": _version("torch"),
        "timm": _version("timm"),
        "numpy": _version("numpy"),
        "harness": __version__,
        "platform": platform.platform(),
    }
    if "torch" in sys.modules:  # only report CUDA when torch is loaded anyway; never import it for this
        out["cuda"] = str(sys.modules["torch"].version.cuda or "none")
    return out


# ----------------------------------------------------------------------------- the record's cost block


@dataclass(frozen=True)
class Costs:
    """Cost columns of one run (the paper's contract).

    Attributes:
        train_seconds: wall-clock training time, validation included; for a
            two-stage run also the feature extraction of the slides it trains
            on (see `with_feature_extraction`).
        infer_seconds_per_slide: mean wall-clock seconds to predict one test
            slide (for two-stage: its feature extraction plus the aggregator).
        peak_memory_mb: peak memory during training at bag batch size 1, in MiB.
        params: total parameters of what is trained/evaluated (encoder included for E2E).
        flops: forward FLOPs for the run's reference input, None if not measured.
        device: `device_name()` of the measuring device.
        trainable_params: parameters that receive gradients.
        peak_memory_kind: "cuda_max_allocated", "peak_rss_since_reset" or
            "process_peak_rss" (module docstring).
        feature_seconds: extraction seconds included in `train_seconds`.
        feature_seconds_per_slide: extraction seconds included in `infer_seconds_per_slide`.
    """

    train_seconds: float
    infer_seconds_per_slide: float
    peak_memory_mb: float
    params: int
    flops: int | None
    device: str
    trainable_params: int | None = None
    peak_memory_kind: str = "process_peak_rss"
    feature_seconds: float = 0.0
    feature_seconds_per_slide: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_feature_extraction(
        self, extraction_seconds: Mapping[str, float], fit_slides: Iterable[str], test_slides: Iterable[str]
    ) -> Costs:
        """Charge a two-stage run for the feature extraction its results depend on.

        The paper adds feature extraction time to two-stage training time
        (Table 6). Here a run is charged the full extraction seconds of every
        slide it trains or validates on (`fit_slides`), as if it had extracted
        them itself: features shared by several aggregators are not divided
        among them, because each method on its own would have to pay it.
        The mean extraction seconds of the `test_slides` are added to the
        inference time per slide, since predicting a new slide needs its features.

        Args:
            extraction_seconds: slide id -> seconds (the `seconds` attr of its features file).
        """
        fit = list(fit_slides)
        test = list(test_slides)
        missing = [s for s in fit + test if s not in extraction_seconds]
        if missing:
            raise DataError(
                f"no feature extraction time for {len(missing)} slide(s), e.g. {missing[:3]}; "
                "re-extract them so their features file records its seconds"
            )
        bad = [s for s in fit + test if not (float(extraction_seconds[s]) >= 0)]
        if bad:
            raise DataError(f"feature extraction time of slide {bad[0]!r} is {extraction_seconds[bad[0]]!r}; expected seconds >= 0")
        feat_train = float(sum(float(extraction_seconds[s]) for s in fit))
        feat_test = float(sum(float(extraction_seconds[s]) for s in test) / len(test)) if test else 0.0
        return replace(
            self,
            train_seconds=self.train_seconds + feat_train,
            infer_seconds_per_slide=self.infer_seconds_per_slide + feat_test,
            feature_seconds=self.feature_seconds + feat_train,
            feature_seconds_per_slide=self.feature_seconds_per_slide + feat_test,
        )
