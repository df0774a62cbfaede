"""Multi-scale random instance sampling (MRIS), ABMILX paper section 3.1, eq. 2.

Per training step a slide contributes `s` patches: `s_j = ceil(s * sigma_j)` from
each context scale j and the rest from the main scale, all resized to one input
size by the trainer. Plain random sampling is the one-scale case.

    >>> scale_counts(512, [0.75, 0.25])         # 10x main, 5x context: s/4 from 5x
    [384, 128]
    >>> scale_counts(10, [0.5, 0.25, 0.25])     # ceil(2.5) = 3 per context scale, main gets the rest
    [4, 3, 3]
    >>> sampler = MRISampler([(10.0, 0.75), (5.0, 0.25)], samples=8, seed=0)
    >>> {m: len(i) for m, i in sampler.sample("slide-0", {10.0: 100, 5.0: 30}, epoch=0).items()}
    {10.0: 6, 5.0: 2}

How the total stays exactly `s`: the paper writes s_j = ceil(s * sigma_j) for every
scale with sum(sigma_j) = 1 "to ensure sum(s_j) = s", which the ceilings break when
s * sigma_j is not an integer (s = 10, sigma = (0.5, 0.25, 0.25) gives 5 + 3 + 3 = 11).
We take the ceiling for the context scales and give the main scale (the first) the
remainder, so sum(s_j) = s always. When s is so small that the context ceilings alone
exceed it, the last context scales give up samples first (s = 1, sigma = (0.5, 0.25,
0.25) -> [0, 1, 0]).

Draws are a function of (seed, epoch, slide) only, never of a global RNG, the
process or the DataLoader worker: the same seed gives the same sample, the next
epoch another one, and a resumed run the same as an uninterrupted one. A scale is
sampled without replacement; only when the slide has fewer patches there than its
count does it take every patch once and draw the rest with replacement. A scale
where the slide has no patch at all (a small biopsy at 5x) hands its count to the
main scale (or, if the main scale is the empty one, to the next scale with patches).
Indices come back sorted within a scale, so reads go through the slide in coords order.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from bench.common.errors import ConfigError, DataError

_RATIO_TOLERANCE = 1e-6


def check_ratios(ratios: Sequence[float]) -> list[float]:
    """Validated sampling ratios: positive, finite, summing to 1."""
    out = [float(r) for r in ratios]
    if not out:
        raise ConfigError("MRIS needs at least one scale (ratio list is empty)")
    if any(not math.isfinite(r) or r <= 0 for r in out):
        raise ConfigError(f"MRIS ratios must be positive numbers, got {out}")
    if abs(sum(out) - 1.0) > _RATIO_TOLERANCE:
        raise ConfigError(f"MRIS ratios must sum to 1 (paper, eq. 2), got {out} (sum {sum(out):g})")
    return out


def scale_counts(samples: int, ratios: Sequence[float]) -> list[int]:
    """Patches per scale for `samples` in total; `ratios[0]` is the main scale (see module docstring).

    Raises:
        ConfigError: samples < 1, or ratios that are not positive and summing to 1.
    """
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise ConfigError(f"the number of sampled patches must be an integer >= 1, got {samples!r}")
    r = check_ratios(ratios)
    # s * sigma within float noise of an integer (512 * 0.25) must not be ceiled up to the next one
    context = [max(0, math.ceil(samples * x - 1e-9)) for x in r[1:]]
    excess = sum(context) - samples
    for j in range(len(context) - 1, -1, -1):  # s too small for every ceiling: the last scales give way
        if excess <= 0:
            break
        give = min(excess, context[j])
        context[j] -= give
        excess -= give
    return [samples - sum(context), *context]


def _slide_key(slide_id: str) -> int:
    """A stable 32-bit key of a slide id (Python's hash() changes from process to process)."""
    return zlib.crc32(str(slide_id).encode("utf-8"))


def draw(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """k sorted indices of range(n): without replacement when k <= n, else every index once plus
    k - n drawn with replacement."""
    if k <= n:
        idx = rng.choice(n, size=k, replace=False)
    else:
        idx = np.concatenate([np.arange(n), rng.integers(0, n, size=k - n)])
    return np.sort(idx.astype(np.int64))


class MRISampler:
    """Draws the multi-scale sample of a slide (or a patient bag) for one epoch.

    Args:
        scales: (magnification, ratio) pairs, the main scale first; ratios sum to 1.
        samples: `s`, patches per slide per step.
        seed: base seed; draws depend on (seed, epoch, slide id) only.
    """

    def __init__(self, scales: Sequence[tuple[float, float]], samples: int, seed: int) -> None:
        scales = [(float(m), float(r)) for m, r in scales]
        if not scales:
            raise ConfigError("MRIS needs at least one (magnification, ratio) scale")
        mags = [m for m, _ in scales]
        if any(not math.isfinite(m) or m <= 0 for m in mags):
            raise ConfigError(f"MRIS magnifications must be positive, got {mags}")
        if len({round(m, 6) for m in mags}) != len(mags):
            raise ConfigError(f"MRIS scales list a magnification twice: {mags}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"MRIS seed must be a non-negative integer, got {seed!r}")
        self.scales = scales
        self.samples = int(samples)
        self.seed = int(seed)
        self.counts = scale_counts(self.samples, [r for _, r in scales])

    @property
    def magnifications(self) -> list[float]:
        return [m for m, _ in self.scales]

    def sample(self, slide_id: str, available: Mapping[float, int], epoch: int) -> dict[float, np.ndarray]:
        """Indices into the coords of each scale, {magnification: (s_j,) int64}, main scale first.

        Args:
            slide_id: the slide (or bag) drawn for; part of the random stream.
            available: patches of the slide at each scale's magnification.
            epoch: the epoch; another epoch gives another sample.

        Raises:
            DataError: the slide has no patch at any scale, or `available` lacks a scale.
        """
        have = {}
        for m in self.magnifications:
            found = [int(n) for k, n in available.items() if math.isclose(float(k), m, rel_tol=1e-6)]
            if not found:
                raise DataError(f"no patch count for slide {slide_id!r} at {m:g}x (have "
                                f"{', '.join(f'{float(k):g}x' for k in available)}); tile the slide at {m:g}x")
            have[m] = max(0, found[0])
        counts = dict(zip(self.magnifications, self.counts))
        empty = [m for m in self.magnifications if have[m] == 0]
        if len(empty) == len(counts):
            raise DataError(f"slide {slide_id!r} has no patches at any sampling scale "
                            f"({', '.join(f'{m:g}x' for m in empty)}); nothing to sample")
        for m in empty:  # hand the count to the main scale, or the first scale that has patches
            target = next(x for x in self.magnifications if have[x] > 0)
            counts[target] += counts[m]
            counts[m] = 0
        rng = np.random.default_rng([self.seed, int(epoch), _slide_key(slide_id)])
        return {m: draw(rng, have[m], counts[m]) if counts[m] else np.zeros(0, dtype=np.int64)
                for m in self.magnifications}


def split_by_slide(indices: np.ndarray, counts: Sequence[int]) -> list[np.ndarray]:
    """Indices into a bag's concatenated slides -> per-slide local indices (a patient bag samples
    from all its slides' patches at once; the reads go slide by slide)."""
    bounds = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))])  # (k + 1,)
    idx = np.asarray(indices, dtype=np.int64)
    return [idx[(idx >= lo) & (idx < hi)] - lo for lo, hi in zip(bounds[:-1], bounds[1:])]


__all__ = ["MRISampler", "scale_counts", "check_ratios", "draw", "split_by_slide"]
