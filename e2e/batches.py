"""The training data path of the E2E trainer: one item = the patches of one optimiser step.

    bag order (task.epoch_indices) -> MRIS sample per bag -> PatchSource.read -> augment
    -> {"bags": [(n, 3, S, S) float32 per bag]}

Items are numbered over the whole run (`epoch * steps_per_epoch + step`) and
everything random in an item (bag order, sample, augmentation) is a function of
(seed, epoch, step, bag), so the result does not depend on the number of
DataLoader workers, on which worker builds an item, or on a restart. Workers stay
alive across epochs (`EpochSteps.set_epoch`, like DistributedSampler) and read
ahead while the main process trains, each with its own slide handles.

Augmentation (ABMILX paper, appendix B.3: "simple geometric data augmentations
such as flipping and RandomResizedCrop", no colour augmentation): per patch a
RandomResizedCrop (area 0.25-1 of the patch, aspect 3/4-4/3, torchvision's
sampling rule) resized to the input size, then horizontal and vertical flips with
probability 1/2 each. The paper does not give the crop's scale range; 0.25-1 is
this harness's choice (torchvision's default 0.08 cuts 256 px patches to ~70 px
of tissue). Without augmentation the patches are only resized (`PatchTransform`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bench.common.errors import DataError, MissingFileError, SlideError

CROP_SCALE = (0.25, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def crop_box(generator: torch.Generator, height: int, width: int, scale: tuple[float, float] = CROP_SCALE,
             ratio: tuple[float, float] = CROP_RATIO) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a RandomResizedCrop, torchvision's rule (10 tries, then the central crop)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(3, generator=generator).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(u[2] * (height - h + 1))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment_patches(patches: np.ndarray | torch.Tensor, input_size: int, mean: Sequence[float],
                    std: Sequence[float], generator: torch.Generator) -> torch.Tensor:
    """uint8 (n, P, P, 3) -> augmented, normalised float32 (n, 3, S, S) (see module docstring)."""
    import torch.nn.functional as F

    x = torch.as_tensor(patches)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise DataError(f"patches must be uint8 (n, P, P, 3), got {x.dtype} {tuple(x.shape)}")
    n, height, width = x.shape[0], x.shape[1], x.shape[2]
    # resized in uint8: torch's vectorised uint8 antialiased bilinear kernel is ~4x faster than the
    # float one on a crop view, and rounding to whole grey levels is below the JPEG error of the pixels
    out = torch.empty((n, 3, input_size, input_size), dtype=torch.uint8)  # (n, 3, S, S)
    chw = x.permute(0, 3, 1, 2)  # (n, 3, P, P) uint8 view
    for i in range(n):
        top, left, h, w = crop_box(generator, height, width)
        crop = chw[i:i + 1, :, top:top + h, left:left + w]  # (1, 3, h, w) uint8 view
        out[i:i + 1] = F.interpolate(crop, size=(input_size, input_size), mode="bilinear", antialias=True,
                                     align_corners=False)
    flips = torch.rand(n, 2, generator=generator) < 0.5  # (n, 2): horizontal, vertical
    if flips[:, 0].any():
        out[flips[:, 0]] = out[flips[:, 0]].flip(-1)
    if flips[:, 1].any():
        out[flips[:, 1]] = out[flips[:, 1]].flip(-2)
    m = torch.tensor(mean, dtype=torch.float32).mul_(255).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).mul_(255).reciprocal_().view(1, 3, 1, 1)
    return out.float().sub_(m).mul_(s)  # (x / 255 - mean) / std, float32


def item_seed(seed: int, epoch: int, step: int, bag: int) -> int:
    """A 63-bit seed for one bag of one step (independent streams via SeedSequence)."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(step), int(bag)]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


class EpochOrder:
    """epoch -> training bag positions (`task.epoch_indices` with seed + epoch); picklable for workers."""

    def __init__(self, task: Any, train_targets: Any, seed: int) -> None:
        self.task, self.train_targets, self.seed = task, train_targets, int(seed)

    def __call__(self, epoch: int) -> np.ndarray:
        return np.asarray(self.task.epoch_indices(self.train_targets, self.seed + int(epoch)), dtype=np.int64)


@dataclass(frozen=True)
class BagPlan:
    """What a bag reads in one step: per slide, per magnification, the local indices."""

    position: int  # row of the train table
    reads: tuple[tuple[str, float, np.ndarray], ...]  # (slide_id, magnification, indices)


class StepData(torch.utils.data.Dataset):
    """Item i = the augmented patches of the bags of training step i (numbered over the whole run).

    Args:
        source: the patch source (picklable; each worker opens its own handles).
        bag_ids / bag_slides: the training bags and their slides (survival: a patient's slides).
        counts: slide id -> {magnification: patch count}.
        order: epoch -> bag positions in training order (`task.epoch_indices`).
        sampler: the MRIS sampler; a bag drawn twice in an epoch (oversampling) gets another
            sample each time.
        slides_per_step: bags per optimiser step.
        augment: geometric augmentation, else a plain resize (`transform`).
    """

    def __init__(self, source: Any, bag_ids: Sequence[str], bag_slides: Sequence[Sequence[str]],
                 counts: Mapping[str, Mapping[float, int]], order: Any, sampler: Any, slides_per_step: int,
                 steps_per_epoch: int, epochs: int, input_size: int, mean: Sequence[float], std: Sequence[float],
                 augment: bool, transform: Any, seed: int) -> None:
        self.source = source
        self.bag_ids = list(bag_ids)
        self.bag_slides = [tuple(s) for s in bag_slides]
        self.counts = {s: {float(m): int(n) for m, n in c.items()} for s, c in counts.items()}
        self.order = order
        self.sampler = sampler
        self.slides_per_step = int(slides_per_step)
        self.steps_per_epoch = int(steps_per_epoch)
        self.epochs = int(epochs)
        self.input_size = int(input_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment = bool(augment)
        self.transform = transform
        self.seed = int(seed)
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.epochs * self.steps_per_epoch

    def epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.asarray(self.order(epoch), dtype=np.int64)}  # one epoch cached
        return self._orders[epoch]

    def plan(self, epoch: int, step: int) -> list[BagPlan]:
        """The reads of one step (also used by the trainer to know the step's bags without pixels)."""
        from e2e.sampling import split_by_slide

        order = self.epoch_order(epoch)
        lo = step * self.slides_per_step
        plans = []
        for k, pos in enumerate(order[lo:lo + self.slides_per_step]):
            pos = int(pos)
            earlier = int(np.sum(order[:lo + k] == pos))  # occurrences of this bag before, this epoch
            slides = self.bag_slides[pos]
            key = self.bag_ids[pos] if earlier == 0 else f"{self.bag_ids[pos]}#{earlier}"
            available = {m: sum(self.counts[s][m] for s in slides) for m in self.sampler.magnifications}
            sample = self.sampler.sample(key, available, epoch)
            reads = []
            for m, idx in sample.items():
                for s, local in zip(slides, split_by_slide(idx, [self.counts[s][m] for s in slides])):
                    if len(local):
                        reads.append((s, m, local))
            plans.append(BagPlan(pos, tuple(reads)))
        return plans

    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch, step = divmod(int(index), self.steps_per_epoch)
        bags = []
        for k, plan in enumerate(self.plan(epoch, step)):
            parts, skipped = [], []
            failed: set[str] = set()
            for slide_id, mag, idx in plan.reads:
                if slide_id in failed:
                    continue
                try:
                    parts.append(self.source.read(slide_id, mag, idx))  # (n_j, P, P, 3) uint8
                except (SlideError, MissingFileError) as exc:  # skip this slide for the step; reported
                    failed.add(slide_id)
                    skipped.append((slide_id, str(exc)))
            x = None
            if parts:
                sizes = {p.shape[1] for p in parts}
                if len(sizes) > 1:  # scales tiled at other patch sizes: resize each to the input first
                    pixels = [self._to_input(p, epoch, step, k, j) for j, p in enumerate(parts)]
                    x = torch.cat(pixels)
                else:
                    x = self._to_input(np.concatenate(parts), epoch, step, k, 0)  # (n, 3, S, S)
            bags.append({"position": plan.position, "x": x, "skipped": skipped})
        return {"epoch": epoch, "step": step, "bags": bags}

    def _to_input(self, patches: np.ndarray, epoch: int, step: int, bag: int, part: int) -> torch.Tensor:
        if not self.augment:
            return self.transform(patches)  # (n, 3, S, S)
        g = torch.Generator().manual_seed(item_seed(self.seed, epoch, step, bag * 1000 + part))
        return augment_patches(patches, self.input_size, self.mean, self.std, g)

    def close(self) -> None:
        self.source.close()


class EpochSteps(torch.utils.data.Sampler):
    """Yields the item numbers of one epoch; `set_epoch` picks it (persistent workers keep running)."""

    def __init__(self, steps_per_epoch: int, start: int = 0) -> None:
        self.steps_per_epoch = int(steps_per_epoch)
        self.epoch = 0
        self.start = start

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start_step)

    def __iter__(self) -> Iterator[int]:
        base = self.epoch * self.steps_per_epoch
        return iter(range(base + self.start, base + self.steps_per_epoch))

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start


def make_loader(data: StepData, workers: int, pin_memory: bool) -> tuple[torch.utils.data.DataLoader, EpochSteps]:
    """A DataLoader over `data` with persistent workers (none when workers == 0)."""
    sampler = EpochSteps(data.steps_per_epoch)
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=2)
    # its own generator: creating an iterator draws a base seed, which must not shift the global
    # stream that dropout uses (every random choice of an item comes from its own seed anyway)
    loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=sampler, num_workers=int(workers),
                                         pin_memory=pin_memory, generator=torch.Generator().manual_seed(0), **kwargs)
    return loader, sampler


__all__ = ["augment_patches", "crop_box", "item_seed", "StepData", "EpochSteps", "EpochOrder", "BagPlan", "make_loader",
           "CROP_SCALE", "CROP_RATIO"]
