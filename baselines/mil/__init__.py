"""MIL aggregators: one registry, one interface, one factory.

Example:
    >>> import torch
    >>> from baselines.mil import build_aggregator
    >>> model = build_aggregator("abmil", in_dim=1024, n_outputs=2, seed=0)
    >>> out = model(torch.randn(1, 50, 1024))
    >>> tuple(out.logits.shape), tuple(out.attention.shape)
    ((1, 2), (1, 50))

Registered names (`bench aggregators` lists them with sizes and defaults):
mean, max, maxmil, abmil (gated), abmil-plain, clam-sb, transmil, dsmil, gma, abmilx, abmilx-feat,
clam-mb, rrt-mil, wikg, dtfd-mil, 2dmamba (its authors' 128-d inner size), and every slide encoder of
baselines/slide as `<name>` (probe) and `<name>-ft` (fine-tuned).
Every other model projects the features to `hidden_dim` (512) first and follows the
interface of `baselines.mil.base` (MILOutput; how the trainer weighs `aux_loss`).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

from baselines.mil.abmil import ABMIL
from baselines.mil.abmilx import ABMILX
from baselines.mil.base import MILAggregator, MILOutput, check_bag
from baselines.mil.clam import CLAMSB
from baselines.mil.clam_mb import CLAMMB
from baselines.mil.dsmil import DSMIL
from baselines.mil.dtfd import DTFDMIL
from baselines.mil.gma import GMA
from baselines.mil.mamba2d import Mamba2DMIL
from baselines.mil.pooling import MaxPoolMIL, MeanPoolMIL
from baselines.mil.rrt import RRTMIL
from baselines.mil.transmil import TransMIL
from baselines.mil.wikg import WiKG
from bench.common.errors import ConfigError
from bench.common.registry import Registry

__all__ = [
    "AGGREGATORS",
    "AggregatorSpec",
    "MILAggregator",
    "MILOutput",
    "build_aggregator",
    "check_bag",
]


@dataclass(frozen=True)
class AggregatorSpec:
    """A registered aggregator: its class, its default parameters and a one-line summary."""

    name: str
    cls: Callable[..., MILAggregator]
    defaults: Mapping[str, Any]
    summary: str

    @property
    def permutation_invariant(self) -> bool:
        return bool(getattr(self.cls, "permutation_invariant", False))

    @property
    def aux_weight(self) -> float:
        return float(getattr(self.cls, "aux_weight", 0.0))


def _spec(name: str, cls: type[MILAggregator], summary: str, **overrides: Any) -> AggregatorSpec:
    """Defaults come from the class signature (after in_dim, n_outputs), then `overrides`."""
    params = list(inspect.signature(cls.__init__).parameters.values())[3:]
    defaults = {p.name: p.default for p in params}
    unknown = set(overrides) - set(defaults)
    assert not unknown, f"{name}: overrides {unknown} are not parameters of {cls.__name__}"
    return AggregatorSpec(name, cls, MappingProxyType({**defaults, **overrides}), summary)


AGGREGATORS: Registry[AggregatorSpec] = Registry[AggregatorSpec]("aggregator")
for _s in (
    _spec("mean", MeanPoolMIL, "mean pooling of projected instances"),
    _spec("max", MaxPoolMIL, "max pooling of projected instances"),
    _spec("maxmil", MaxPoolMIL, "max over per-instance logits (the ABMILX authors' MaxMIL)", pool="logits"),
    _spec("abmil", ABMIL, "gated attention MIL (Ilse et al. 2018), as in CLAM"),
    _spec("abmil-plain", ABMIL, "non-gated (tanh) attention MIL (Ilse et al. 2018)", gated=False),
    _spec("clam-sb", CLAMSB, "CLAM single-branch with instance clustering loss (Lu et al. 2021)"),
    _spec("transmil", TransMIL, "Nystrom transformer + PPEG (Shao et al. 2021)"),
    _spec("dsmil", DSMIL, "dual-stream MIL, critical-instance attention (Li et al. 2021)"),
    _spec("gma", GMA, "gated MIL attention of the GMA paper (Campanella et al.)"),
    _spec("abmilx", ABMILX, "multi-head local attention + attention plus (ABMILX paper)"),
    _spec("abmilx-feat", ABMILX, "ABMILX with the authors' two-stage feature config (no input LayerNorm, biases, "
          "ReLU)", input_norm=False, bias=True, act="relu"),
    _spec("clam-mb", CLAMMB, "CLAM multi-branch: per-class attention and bag classifiers (Lu et al. 2021)"),
    _spec("rrt-mil", RRTMIL, "regional re-embedding transformer (R-MSA + CR-MSA) + ABMIL (Tang et al. 2024)"),
    _spec("wikg", WiKG, "dynamic top-k graph, knowledge-aware attention, attention readout (Li et al. 2024)"),
    _spec("dtfd-mil", DTFDMIL, "double-tier feature distillation over pseudo-bags, AFS (Zhang et al. 2022)"),
    _spec("2dmamba", Mamba2DMIL, "2D selective state-space scan over the patch grid + attention pooling "
          "(Zhang et al. 2025)"),
):
    AGGREGATORS.register(_s.name, _s)
del _s


def register_slide_encoders() -> None:
    """Every slide encoder whose architecture is implemented (baselines/slide), in both modes (idempotent).

    The slide architectures import nothing of this package (shared ops live in `baselines.layers`), so
    importing `baselines.slide` first or this package first registers the same set.
    """
    from baselines.mil.slide import SlideEncoderMIL
    from baselines.slide.base import SLIDE_ARCHS

    for name in SLIDE_ARCHS.names():
        if name in AGGREGATORS:
            continue
        with torch.device("meta"):  # no memory, no init cost: only the class attribute is read
            invariant = not SLIDE_ARCHS.get(name)(config="tiny").uses_coords
        cls = type(f"SlideEncoderMIL[{name}]", (SlideEncoderMIL,),
                   {"permutation_invariant": invariant, "uses_coords": not invariant})
        AGGREGATORS.register(name, _spec(name, cls, f"slide encoder {name}, frozen + linear head "
                                         "(probe)", encoder=name))
        AGGREGATORS.register(f"{name}-ft", _spec(f"{name}-ft", cls, f"slide encoder {name}, "
                                                 "fine-tuned with a linear head", encoder=name, mode="finetune"))


register_slide_encoders()


def build_aggregator(name: str, in_dim: int, n_outputs: int, seed: int | None = None, **params: Any) -> MILAggregator:
    """Build the aggregator `name` for `in_dim`-dimensional features and `n_outputs` outputs.

    Args:
        name: a registered name (`bench aggregators`).
        in_dim: feature dimension of the bags it will receive.
        n_outputs: number of logits (classes, or survival bins).
        seed: if given, the weights are initialised from this seed without
            touching the global torch RNG state.
        **params: overrides of the spec's defaults; unknown names are a ConfigError.
    """
    spec = AGGREGATORS.get(name)
    unknown = sorted(set(params) - set(spec.defaults))
    if unknown:
        bad = unknown[0]
        close = difflib.get_close_matches(bad, list(spec.defaults), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"unknown parameter {bad!r} for aggregator {name!r}{hint} Valid: {', '.join(spec.defaults)}"
        )
    kwargs = {**spec.defaults, **params}
    if seed is None:
        return spec.cls(in_dim, n_outputs, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return spec.cls(in_dim, n_outputs, **kwargs)
