"""E2E benchmark: throughput of the trainer's full data path, and patches per step at fixed memory.

1. **Training-step throughput** (patches/s; forward + backward + AdamW + cosine) of
   `train_e2e` itself — MRIS sample -> patch reads (live OpenSlide, or the packed
   JPEG store) -> augmentation (RandomResizedCrop + flips) in DataLoader workers ->
   encoder + ABMILX step — against a bare loop over preloaded tensors of the same
   shape (`encoder_forward` + aggregator + cross-entropy + AdamW + cosine; no reads,
   no augmentation, no checks), in the same process. Bare epochs run inside the
   trainer's epoch callback, so trainer and bare epochs alternate under the same
   machine load. The fold has no validation bags and the test bags are never
   predicted, so a trainer epoch is training only; its time is the history row's
   `seconds` (the loader and every step; the per-epoch checkpoint write, amortised
   over hundreds of steps in a real epoch, is left out). Epoch 0 (worker start,
   warm-up) is not timed; rate = s x steps / best timed epoch. Ratio = trainer /
   bare (goal >= 0.85).
2. **Memory: the most sampled patches per step under a budget**: no checkpointing;
   checkpointing of the stem and every block over the whole sample (train-mode
   BatchNorm, the default); and frozen BatchNorm (`bn = "frozen"`) with the whole
   encoder checkpointed chunk by chunk (`--chunk` patches). Measured: the peak of
   torch's allocations during one training step (the sample's input copied onto the
   device, forward, loss, backward; parameter gradients allocated in the step, as
   after `zero_grad(set_to_none=True)`) above what was allocated before it.
   On CPU the peak comes from the profiler's allocation events (every allocation
   and free of torch's CPU allocator, in order) - a proxy for GPU memory without the
   allocator cache; on CUDA it is `torch.cuda.max_memory_allocated`. Peaks at a few
   sample counts are fitted with a line (activations grow linearly in s); the most
   patches under `--budget-mib` follows from the fit and is then measured once more
   to check it fits (a budget that cannot hold one patch stops with the smallest that
   works). Goal: >= 3x more patches with checkpointing.
3. `--cuda` (a GPU machine): parts 1 and 2 on the GPU (bf16 autocast, channels_last),
   the paper's fixed inference benchmark (10,000 patches of 224 px through
   ResNet-18-trunc + ABMILX, `e2e.inference.fixed_inference_benchmark`) and patches per
   GiB at AMP (bf16) for ResNet-50-trunc at 224 px, with and without checkpointing.
   `--fixed-inference` runs the fixed benchmark on the CPU too (minutes on 2 cores).

Data: a synthetic subtyping cohort written by `bench.data.synthetic` (real pyramidal
TIFFs read through OpenSlide), tiled at 10x; encoder resnet18-trunc, random init.

Run: .venv/bin/python benchmarks/bench_e2e.py [--quick] [--input 112 --patch 128] [--samples 32]
     .venv/bin/python benchmarks/bench_e2e.py --cuda            # on a GPU machine
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

ENCODER = "resnet18-trunc"
AGGREGATOR = "abmilx"
MAG = 10.0


# ----------------------------------------------------------------------------- data


def make_data(work: Path, args: argparse.Namespace):
    """(cohort, coords dir, packed store dir, FoldBags): a synthetic cohort tiled at 10x and packed."""
    from bench.data.cohort import load_cohort
    from bench.data.layout import Layout
    from bench.data.synthetic import SyntheticSpec, make_cohort
    from bench.evaluation.tasks import make_task
    from bench.data.tiling import TileParams, tile_slides
    from bench.evaluation.training import FoldBags
    from e2e.patches import pack_cohort

    root = make_cohort(SyntheticSpec(kind="subtyping", n_slides=args.slides, width=args.width, height=args.height,
                                     minority_fraction=0.5, seed=0), work / "cohort")
    cohort = load_cohort(root)
    layout = Layout(work)
    tiles = layout.tiles_dir("bench", MAG, args.patch)
    tile_slides(cohort.slide_jobs(), tiles, TileParams(magnification=MAG, patch_size=args.patch), qc=False)
    packed = layout.patches_dir("bench", MAG, args.patch)
    pack_cohort(cohort, tiles, packed)
    task = make_task("classification", classes=cohort.classes)
    frame = task.bag_frame(cohort.table)
    fitted = task.fit(task.targets_from_frame(frame))
    # every slide trains; no validation bags and predict_test=False: an epoch is training only
    bags = FoldBags(task=fitted, parts={"train": frame, "val": frame.iloc[:0], "test": frame.iloc[:1]},
                    split_path=work / "split.csv", split_sha256="bench", fold=0)
    return cohort, tiles, packed, bags


# ----------------------------------------------------------------------------- 1. throughput


def bare_loop(args: argparse.Namespace, n_steps: int, device, precision: str):
    """One epoch of the bare step over preloaded tensors: a function returning its seconds."""
    import torch
    import torch.nn.functional as F

    from baselines.encoders import build_encoder
    from baselines.mil import build_aggregator
    from bench.evaluation.training import autocast, cosine_schedule, make_optimizer
    from e2e.forward import encoder_forward

    loaded = build_encoder(ENCODER, random_init=True, seed=0, trainable=True, input_size=args.input)
    encoder = loaded.model.to(device).train()
    if device.type == "cuda":
        encoder = encoder.to(memory_format=torch.channels_last)
    aggregator = build_aggregator(AGGREGATOR, in_dim=loaded.spec.embed_dim, n_outputs=2, seed=0).to(device).train()
    params = [*encoder.parameters(), *aggregator.parameters()]
    opt = make_optimizer("adamw", params, 1e-4)
    sched = cosine_schedule(opt, 1000 * n_steps)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(args.samples, 3, args.input, args.input, generator=g).to(device) for _ in range(4)]
    if device.type == "cuda":
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    ys = [torch.tensor([i % 2], device=device) for i in range(4)]

    def epoch() -> float:
        t0 = time.perf_counter()
        for i in range(n_steps):
            opt.zero_grad(set_to_none=True)
            with autocast(device, precision):
                feats = encoder_forward(encoder, xs[i % 4], False)  # (s, D)
            out = aggregator(feats.float().unsqueeze(0))
            F.cross_entropy(out.logits.float(), ys[i % 4]).backward()
            opt.step()
            sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    return epoch


def throughput(args: argparse.Namespace, data, source: str, workers: int, work: Path, device_name: str,
               precision: str) -> dict:
    """Best timed epoch of train_e2e (source, workers) and of the bare loop, alternating."""
    import torch

    from e2e.train import E2EConfig, train_e2e

    cohort, tiles, packed, bags = data
    n_steps = len(bags.parts["train"])
    device = torch.device(device_name)
    bare = bare_loop(args, n_steps, device, precision)
    bare()  # warm-up
    config = E2EConfig(encoder=ENCODER, aggregator=AGGREGATOR, random_init=True, epochs=args.epochs,
                       samples=args.samples, lr=1e-4, magnification=MAG, patch_size=args.patch,
                       input_size=args.input, precision=precision, workers=workers, device=device_name,
                       source=source, seed=0)
    trainer_s, bare_s = [], []

    def between_epochs(epoch: int, row: dict) -> None:
        assert row["steps"] == n_steps and row["skipped"] == 0
        trainer_s.append(row["seconds"])
        bare_s.append(bare())

    out = work / f"run-{source}-{workers}-{time.monotonic_ns()}"  # a fresh folder: never resume
    train_e2e(bags, cohort, {MAG: tiles}, config, out, packed_dirs={MAG: packed}, epoch_callback=between_epochs,
              predict_test=False)
    patches = n_steps * args.samples
    t, b = min(trainer_s[1:]), min(bare_s[1:])
    return {"trainer": patches / t, "bare": patches / b, "ratio": b / t}


def throughput_section(args: argparse.Namespace, data, device_name: str, precision: str) -> None:
    n_steps = len(data[3].parts["train"])
    print(f"\n## 1. training-step throughput: {ENCODER} + {AGGREGATOR}, s = {args.samples} patches per step, "
          f"{args.patch} px patches at {MAG:g}x -> {args.input} px input, {device_name} {precision}, "
          f"{n_steps} steps x {args.epochs - 1} timed epochs (best epoch)\n")
    print("| source | DataLoader workers | bare step (patches/s) | trainer, full data path (patches/s) | "
          "ratio (goal >= 0.85) |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for source in ("live", "packed"):
            for workers in args.workers:
                r = throughput(args, data, source, workers, Path(tmp), device_name, precision)
                print(f"| {source} | {workers} | {r['bare']:.1f} | {r['trainer']:.1f} | {r['ratio']:.2f} |",
                      flush=True)


# ----------------------------------------------------------------------------- 2. memory


def _cpu_peak_mib(fn) -> float:
    """Peak of torch's CPU allocations while `fn` runs, above the level when it starts (profiler events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    level = peak = 0
    for e in events:
        level += e.nbytes()  # negative for a free
        peak = max(peak, level)
    return peak / 2**20


def step_peak_mib(encoder, aggregator, n: int, input_size: int, checkpointing: bool, device,
                  precision: str, bn: str = "train", chunk: int | None = None) -> float:
    """Peak memory (MiB) of one training step on `n` patches, the sample's input tensor included
    (copied onto the device inside the step, as the trainer's `x.to(device)`)."""
    import torch
    import torch.nn.functional as F

    from bench.evaluation.training import autocast
    from e2e.forward import batchnorm_buffers, encoder_forward, set_encoder_mode

    set_encoder_mode(encoder, bn)
    host = torch.randn(n, 3, input_size, input_size)  # (n, 3, S, S)
    y = torch.tensor([1], device=device)
    bn_buffers = batchnorm_buffers(encoder) if checkpointing and bn == "train" else []

    def step() -> None:
        for m in (encoder, aggregator):
            m.zero_grad(set_to_none=True)
        x = host.to(device, copy=True)  # counted: the sample lives on the device during the step
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            feats = encoder_forward(encoder, x, checkpointing, bn=bn, chunk=chunk)  # (n, D)
        saved = [t.clone() for t in bn_buffers]
        out = aggregator(feats.float().unsqueeze(0))
        F.cross_entropy(out.logits.float(), y).backward()
        for t, s in zip(bn_buffers, saved):
            t.copy_(s)

    step()  # warm-up (cudnn plans, lazy state)
    for m in (encoder, aggregator):
        m.zero_grad(set_to_none=True)
    if device.type != "cuda":
        return _cpu_peak_mib(step)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def most_patches(peak_at, ns: list[int], budget_mib: float, what: str,
                 cap: int | None = None) -> tuple[list[float], float, float, int, float]:
    """(peaks at ns, MiB per patch, fixed MiB, most patches under the budget, peak measured there).

    The count comes from a line fitted to the peaks (at most `cap`: measuring a step of
    thousands of patches takes minutes on a CPU), then is measured and lowered until it fits.

    Raises:
        SystemExit: the budget cannot hold one patch; the message gives the smallest budget that works.
    """
    peaks = [peak_at(n) for n in ns]
    slope, intercept = np.polyfit(ns, peaks, 1)
    n_max = max(1, int(math.floor((budget_mib - intercept) / slope)))
    if cap is not None:
        n_max = min(n_max, cap)
    while True:  # the fit's answer, checked (and lowered if it does not fit after all)
        at = peak_at(n_max)
        if at <= budget_mib:
            return peaks, float(slope), float(intercept), n_max, at
        if n_max == 1:
            raise SystemExit(f"--budget-mib {budget_mib:g} cannot hold one patch ({what}): one patch takes "
                             f"{at:.1f} MiB; the smallest budget that works is {math.ceil(at)} MiB"
                             + (" (or a smaller --chunk)" if "chunk" in what else ""))
        n_max = max(1, min(n_max - 1, int(n_max * budget_mib / at)))


def memory_section(args: argparse.Namespace, encoder_name: str, input_size: int, device_name: str, precision: str,
                   ns: list[int], budget_mib: float, chunk: int, frozen_ns: list[int] | None = None) -> dict:
    import torch

    from baselines.encoders import build_encoder
    from baselines.mil import build_aggregator
    from e2e.forward import check_chunk

    check_chunk(chunk)
    device = torch.device(device_name)
    loaded = build_encoder(encoder_name, random_init=True, seed=0, trainable=True, input_size=input_size)
    encoder = loaded.model.to(device).train()
    if device.type == "cuda":
        encoder = encoder.to(memory_format=torch.channels_last)
    aggregator = build_aggregator(AGGREGATOR, in_dim=loaded.spec.embed_dim, n_outputs=2, seed=0).to(device).train()
    what = ("peak of torch CPU allocations (profiler events; a proxy for GPU memory)" if device.type == "cpu"
            else "torch.cuda.max_memory_allocated")
    print(f"\n## 2. patches per step under {budget_mib:,.0f} MiB: {encoder_name} + {AGGREGATOR} at {input_size} px, "
          f"{device_name} {precision}; memory = {what} of one step (input sample on the device, forward, loss, "
          "backward)\n")
    print("| activation checkpointing | encoder BatchNorm | peaks at s = (MiB) | MiB per patch | fixed (MiB) "
          "| most patches under budget | measured there (MiB) | x no checkpointing |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    modes = [("no", False, "train", None, ns), ("stem + every block, whole sample", True, "train", None, ns),
             (f"whole encoder, chunks of {chunk} patches", True, "frozen", chunk, frozen_ns or ns)]
    most = {}
    for label, ckpt, bn, ch, fit_ns in modes:
        peaks, slope, intercept, n_max, at = most_patches(
            lambda n: step_peak_mib(encoder, aggregator, n, input_size, ckpt, device, precision, bn, ch),
            fit_ns, budget_mib, f"checkpointing {label}, bn {bn}", args.max_patches)
        capped = n_max == args.max_patches
        most[label] = n_max
        base = most[modes[0][0]]
        print(f"| {label} | {bn} | " + ", ".join(f"{n}: {p:.0f}" for n, p in zip(fit_ns, peaks))
              + f" | {slope:.3f} | {intercept:.0f} | {'>= ' if capped else ''}{n_max} | {at:.0f} | "
              f"{'>= ' if capped else ''}{n_max / base:.2f} |", flush=True)
    base, stem, frozen = (most[m[0]] for m in modes)
    per_gib = 1024 / budget_mib
    print(f"\nwith checkpointing: {stem / base:.2f}x more patches per step at the same memory in train-mode "
          f"BatchNorm, {frozen / base:.2f}x with frozen BatchNorm and chunks of {chunk} (goal >= 3x): "
          f"{base * per_gib:.0f} / {stem * per_gib:.0f} / {frozen * per_gib:.0f} patches per GiB")
    return {"none": base, "stem": stem, "frozen": frozen}


# ----------------------------------------------------------------------------- 3. fixed inference benchmark


def fixed_section(device_name: str, precision: str) -> None:
    import torch

    from baselines.encoders import build_encoder
    from baselines.mil import build_aggregator
    from e2e.inference import FIXED_PATCHES, fixed_inference_benchmark

    device = torch.device(device_name)
    loaded = build_encoder(ENCODER, random_init=True, seed=0, trainable=True, input_size=224)
    encoder = loaded.model.to(device)
    if device.type == "cuda":
        encoder = encoder.to(memory_format=torch.channels_last)
    aggregator = build_aggregator(AGGREGATOR, in_dim=loaded.spec.embed_dim, n_outputs=2, seed=0).to(device)
    r = fixed_inference_benchmark(encoder, aggregator, chunk=256, device=device, precision=precision,
                                  repeats=2 if device.type == "cuda" else 1)
    print(f"\n## 3. fixed inference benchmark: one slide of {FIXED_PATCHES:,} patches at 224 px, {ENCODER} + "
          f"{AGGREGATOR}, chunks of 256, {precision}, {r['device']}\n")
    print(f"{r['seconds_per_slide']:.2f} s per slide ({r['patches_per_second']:.0f} patches/s; the paper reports "
          "1.7 s for ResNet-18 on an RTX 3090, reads excluded)")


# ----------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", type=int, default=112, help="encoder input side in px (default: 112)")
    p.add_argument("--patch", type=int, default=128, help="tiled patch side in px at 10x (default: 128)")
    p.add_argument("--samples", type=int, default=32, help="s, patches sampled per step (default: 32)")
    p.add_argument("--slides", type=int, default=8, help="slides of the synthetic cohort = steps per epoch")
    p.add_argument("--width", type=int, default=2048, help="slide width in level-0 px (default: 2048)")
    p.add_argument("--height", type=int, default=1536, help="slide height in level-0 px (default: 1536)")
    p.add_argument("--epochs", type=int, default=4, help="trainer epochs; the first is not timed (default: 4)")
    p.add_argument("--workers", type=int, nargs="+", default=[2], help="DataLoader workers to try (default: 2)")
    p.add_argument("--threads", type=int, help="torch threads of the main process (default: torch's)")
    p.add_argument("--mem-samples", type=int, nargs="+", default=[16, 32, 64],
                   help="sample counts of the memory fit (default: 16 32 64)")
    p.add_argument("--frozen-samples", type=int, nargs="+", default=[64, 128, 256],
                   help="sample counts of the memory fit with frozen BatchNorm, chunked (default: 64 128 256)")
    p.add_argument("--max-patches", type=int, default=4096,
                   help="most patches a memory step is measured at; a larger fit is reported as '>=' (default: 4096)")
    p.add_argument("--chunk", type=int, default=16,
                   help="patches per recomputed chunk with frozen BatchNorm (default: 16)")
    p.add_argument("--budget-mib", type=float, default=512, help="memory budget of part 2 (default: 512)")
    p.add_argument("--parts", type=int, nargs="+", default=[1, 2], help="parts to run (default: 1 2)")
    p.add_argument("--fixed-inference", action="store_true", help="also run part 3 (slow on CPU)")
    p.add_argument("--cuda", action="store_true",
                   help="on the GPU: parts 1-2 in bf16, part 3, and ResNet-50 patches per GiB at 224 px")
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check that the script runs")
    args = p.parse_args()
    if args.quick:
        args.input, args.patch, args.samples, args.slides, args.epochs = 32, 64, 8, 3, 3
        args.width, args.height, args.mem_samples, args.budget_mib = 1024, 768, [8, 16], 64
        args.frozen_samples, args.chunk, args.max_patches = [16, 32], 8, 256

    import torch

    from bench.evaluation.costs import device_name

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("BENCH_PROGRESS", "0")
    dev = "cuda" if args.cuda else "cpu"
    precision = "bf16" if args.cuda else "fp32"
    if args.cuda and not torch.cuda.is_available():
        raise SystemExit("--cuda needs a CUDA GPU; this machine has none")
    print(f"# bench_e2e {datetime.date.today()} on {device_name(torch.device(dev))}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average at start {os.getloadavg()[0]:.2f}")
    t0 = time.perf_counter()
    if 1 in args.parts:
        with tempfile.TemporaryDirectory() as tmp:
            data = make_data(Path(tmp), args)
            throughput_section(args, data, dev, precision)
    if 2 in args.parts:
        memory_section(args, ENCODER, args.input, dev, precision, args.mem_samples, args.budget_mib, args.chunk,
                       args.frozen_samples)
    if args.cuda:
        memory_section(args, "resnet50-trunc", 224, dev, precision, [64, 128, 256], 16384, 64, [256, 512, 1024])
    if args.cuda or args.fixed_inference:
        fixed_section(dev, precision)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}; {time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
