"""E2E inference: every patch of a slide at the main scale, encoded in chunks, then the aggregator
on the whole bag (ABMILX paper, section 4 "inference"; its A+ runs as one SDPA call at any N).

- `encode_slide`: (N, D) features of one slide under `torch.inference_mode`, `chunk`
  patches per encoder forward, the next chunk read (and on CPU transformed) in a
  background thread while the current one is encoded. The encoder runs in eval mode
  (BatchNorm running statistics), so chunked and one-shot encoding agree.
- `predict_part`: predictions, attention (per bag, and with `keep_heads` per head) and timing for a part
  of the split (val, test), with the slides each predicted bag was built from (for attention maps).
- `step_flops`: forward FLOPs of one training step for `n` sampled patches (the paper's
  Table 6 uses 512 patches at 224 px).
- `fixed_inference_benchmark`: the paper's fixed inference benchmark, 10,000 patches of
  224 px through encoder and aggregator (no reads), in seconds per slide; the paper
  reports 1.7 s (ResNet-18, RTX 3090) and 83 s (GigaPath). The trainer runs it on CUDA
  (or when `fixed_benchmark = true`); `benchmarks/bench_e2e.py --fixed-inference` runs it alone.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bench.common.errors import DataError, MissingFileError, SlideError
from bench.evaluation.training import autocast

FLOPS_SAMPLES = 512  # the paper's Table 6 counts FLOPs for 512 sampled 224 px patches
FIXED_PATCHES = 10_000  # the paper's fixed inference benchmark: one slide of 10,000 patches at 224 px


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module):
    """Put modules in eval mode for the block and restore each one's mode after."""
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def encode_slide(encoder: torch.nn.Module, transform: Any, source: Any, slide_id: str, magnification: float, *,
                 chunk: int, device: torch.device, precision: str = "fp32", prefetch: bool = True) -> torch.Tensor:
    """Features (N, D) float32 on `device` of every patch of a slide (see module docstring).

    Raises:
        SlideError: the slide (or its store entry) cannot be read.
    """
    if chunk < 1:
        raise DataError(f"inference chunk must be >= 1, got {chunk}")
    n = int(source.n_patches(slide_id, magnification))
    dim = int(encoder.embed_dim)
    out = torch.empty((n, dim), dtype=torch.float32, device=device)  # (N, D)
    cuda = device.type == "cuda"

    def load(lo: int) -> torch.Tensor:
        patches = source.read(slide_id, magnification, range(lo, min(n, lo + chunk)))  # (c, P, P, 3) uint8
        if cuda:  # uint8 over the bus (4x fewer bytes), normalised on the GPU
            return torch.from_numpy(patches).pin_memory()
        return transform(patches)  # (c, 3, S, S) float32

    starts = list(range(0, n, chunk))
    with eval_mode(encoder), torch.inference_mode(), ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, starts[0]) if starts and prefetch else None
        for k, lo in enumerate(starts):
            x = pending.result() if pending is not None else load(lo)
            pending = pool.submit(load, starts[k + 1]) if prefetch and k + 1 < len(starts) else None
            if cuda:
                x = transform(x.to(device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                out[lo:lo + len(x)] = encoder(x).float()  # (c, D)
    return out


@dataclass
class PartPrediction:
    """Predictions of one part (val or test): the frame covers the bags that could be read."""

    frame: Any  # predictions table (bench.evaluation.tasks), or None when no bag could be predicted
    logits: np.ndarray  # (B, C) of the predicted bags
    positions: list[int]  # rows of the part table that were predicted
    attention: list[np.ndarray]  # (N_b,) per predicted bag
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (slide, reason)
    seconds_per_slide: float = float("nan")
    loss: float = float("nan")
    slides: list[list[str]] = field(default_factory=list)  # per predicted bag: the slides encoded, in bag order
    heads: list[np.ndarray | None] = field(default_factory=list)  # per predicted bag (H, N_b), with keep_heads


def predict_part(encoder: torch.nn.Module, aggregator: torch.nn.Module, transform: Any, part: Any, task: Any,
                 source: Any, magnification: float, *, chunk: int, device: torch.device,
                 precision: str = "fp32", keep_heads: bool = False) -> PartPrediction:
    """Predict every bag of `part` (a FoldBags part table) from all its patches at `magnification`.

    A bag whose slides cannot be read loses those slides; a bag left without patches is
    not predicted and its slides are listed in `skipped` (batch work goes on). The attention
    of a bag covers the patches of `PartPrediction.slides` of that bag, concatenated in order
    (the rows of `source.coords`); `keep_heads` also keeps the per-head attention.
    """
    from bench.evaluation.heatmaps import head_rows

    targets = task.targets_from_frame(part) if len(part) else None
    logits, positions, attention, skipped = [], [], [], []
    bag_slides: list[list[str]] = []
    heads: list[np.ndarray | None] = []
    n_slides = 0
    t0 = time.perf_counter()
    with eval_mode(encoder, aggregator):
        for pos, slide_ids in enumerate(part["slide_ids"]):
            feats, encoded = [], []
            for s in slide_ids:
                try:
                    feats.append(encode_slide(encoder, transform, source, s, magnification, chunk=chunk,
                                              device=device, precision=precision))
                    encoded.append(str(s))
                    n_slides += 1
                except (SlideError, MissingFileError) as exc:
                    skipped.append((s, str(exc)))
            bag = torch.cat(feats) if feats else None  # (N, D)
            if bag is None or bag.shape[0] == 0:
                continue
            with torch.inference_mode():
                out = aggregator(bag.unsqueeze(0))  # (1, N, D) -> logits (1, C), attention (1, N)
            logits.append(out.logits.float().cpu().numpy()[0])
            attention.append(out.attention.float().cpu().numpy()[0])
            positions.append(pos)
            bag_slides.append(encoded)
            if keep_heads:
                heads.append(head_rows(out.head_attention))
    seconds = (time.perf_counter() - t0) / max(1, n_slides)
    if not positions:
        return PartPrediction(None, np.zeros((0, 0)), [], [], skipped, seconds, slides=[], heads=[])
    z = np.stack(logits)  # (B, C)
    sub = targets.subset(np.asarray(positions)) if targets is not None else None
    rows = part.iloc[positions]
    frame = task.prediction_frame(rows["bag_id"], rows["patient_id"], sub, task.scores(z))
    loss = float(task.loss(torch.from_numpy(z), sub.to_torch()))
    return PartPrediction(frame, z, positions, attention, skipped, seconds, loss, slides=bag_slides,
                          heads=heads if keep_heads else [])


def step_flops(encoder: torch.nn.Module, aggregator: torch.nn.Module, n_patches: int, input_size: int) -> int:
    """Forward FLOPs of a training step on `n_patches` patches: encoder per patch x n + aggregator on the bag.

    Counted on one patch and scaled (the encoder treats patches independently; BatchNorm,
    which couples them, is not counted by the FLOP counter), so it is cheap on CPU.
    """
    from bench.evaluation.costs import count_flops

    device = next(encoder.parameters()).device
    per_patch = count_flops(encoder, torch.zeros(1, 3, input_size, input_size, device=device))
    agg = count_flops(aggregator, torch.zeros(1, n_patches, int(encoder.embed_dim), device=device))
    return int(per_patch * n_patches + agg)


def fixed_inference_benchmark(encoder: torch.nn.Module, aggregator: torch.nn.Module, *, n_patches: int = FIXED_PATCHES,
                              input_size: int = 224, chunk: int = 256, device: torch.device | None = None,
                              precision: str = "fp32", repeats: int = 1) -> dict[str, Any]:
    """The paper's inference benchmark: seconds for one slide of `n_patches` random 224 px patches.

    One random chunk is generated on the device and encoded n_patches / chunk times (the
    time does not depend on the pixel values; reads are excluded as in the paper), then the
    aggregator runs on the (1, n_patches, D) bag. Best of `repeats`, after one warm-up chunk.
    """
    from bench.evaluation.costs import device_name

    device = device or next(encoder.parameters()).device
    cuda = device.type == "cuda"
    x = torch.randn(chunk, 3, input_size, input_size, device=device)  # (c, 3, S, S)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    feats = torch.empty((n_patches, int(encoder.embed_dim)), device=device)  # (N, D)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    best = float("inf")
    with eval_mode(encoder, aggregator), torch.inference_mode():
        with autocast(device, precision):
            encoder(x[: min(chunk, 8)])
        sync()
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            for lo in range(0, n_patches, chunk):
                hi = min(n_patches, lo + chunk)
                with autocast(device, precision):
                    feats[lo:hi] = encoder(x[: hi - lo]).float()
            out = aggregator(feats.unsqueeze(0))  # (1, N, D)
            out.logits.sum().item()
            sync()
            best = min(best, time.perf_counter() - t0)
    return {"n_patches": n_patches, "input_size": input_size, "chunk": chunk, "precision": precision,
            "seconds_per_slide": best, "patches_per_second": n_patches / best, "device": device_name(device)}


__all__ = ["encode_slide", "predict_part", "PartPrediction", "step_flops", "fixed_inference_benchmark", "eval_mode",
           "FIXED_PATCHES"]
