"""Feature extraction throughput: the full pipeline against the bare encoder forward.

The pipeline is `baselines.extract.extract_slide` on a synthetic pyramidal TIFF
tiled at 20x / 224 px: DataLoader workers read patches through OpenSlide and
normalise them, the main process runs the encoder, the features are written to
HDF5. The baseline, measured in the same run, is the encoder's forward alone on
the same patches preloaded as normalised tensors (on the device), with all cores.
The ratio pipeline / bare is the pipeline's efficiency: goal >= 0.9 on CPU with the
automatic settings (the "auto" row: reading workers, batch and threads as
`ExtractOptions.settings` chooses them; the bare forward runs at that batch); on CUDA (batch 256, the encoder's autocast precision, channels_last)
goal >= 0.8, plus the seconds per slide of 10,000 patches.

Weights are random (speed does not depend on them, and nothing is downloaded).
Bare and pipeline runs alternate and each figure is the best of `--repeats`, so both
see the same background load (other processes share the CPU).

    .venv/bin/python benchmarks/bench_extract.py
    .venv/bin/python benchmarks/bench_extract.py --encoders resnet18-trunc --repeats 1
    .venv/bin/python benchmarks/bench_extract.py --device cuda --workers 8   # on a GPU machine
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from baselines.encoders import build_encoder
from baselines.extract import ExtractOptions, SlidePatches, extract_slide
from bench.evaluation.costs import cpu_model, device_name
from bench.data.slides import open_slide
from bench.data.synthetic import SyntheticSpec, plan_cohort, write_slide
from bench.data.tiling import SlideJob, TileParams, read_coords, tile_slide
from bench.evaluation.training import autocast


def make_slide(tmp: Path, width: int, height: int) -> tuple[SlideJob, Path, int]:
    """One synthetic slide (the first of a seeded plan), tiled at 20x / 224 px."""
    spec = SyntheticSpec(kind="subtyping", n_slides=2, width=width, height=height, seed=0)
    plan = plan_cohort(spec)[0][0]
    write_slide(spec, plan, tmp / "cohort")
    path = tmp / "cohort" / "slides" / f"{plan.slide_id}.tif"
    result = tile_slide(path, tmp / "tiles", TileParams(magnification=20, patch_size=224, tissue_threshold=0.1),
                        qc=False)
    return SlideJob(path.stem, path), result.coords_path, result.n_patches


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward(encoder, batches: list[torch.Tensor], device: torch.device, precision: str) -> float:
    """Seconds of the forward alone on preloaded normalised tensors (already on the device)."""
    with torch.inference_mode():
        _sync(device)
        start = time.perf_counter()
        for b in batches:
            with autocast(device, precision):
                encoder.model(b)
        _sync(device)
        return time.perf_counter() - start


def pipeline(job: SlideJob, coords_path: Path, out: Path, encoder, workers: int | None, threads: int | None,
             batch: int | None, device: torch.device, precision: str | None = None) -> float:
    """Seconds of extract_slide end to end (reads, transform, forward, HDF5 write), wall clock;
    workers / batch None: the automatic settings (`ExtractOptions.settings`)."""
    options = ExtractOptions(batch_size=batch, num_workers=workers, device=device.type, force=True, precision=precision,
                             torch_threads=threads)
    cores = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)  # what extract_cohort does with options.torch_threads
    try:
        start = time.perf_counter()
        extract_slide(job, coords_path, out, encoder, options, device=device)
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(cores)


def read_only(job: SlideJob, coords_path: Path, encoder, workers: int, batch: int) -> float:
    """Patches/s of the DataLoader alone (slide reads + transform in the workers, no model)."""
    coords = read_coords(coords_path)
    ds = SlidePatches(job.path, coords.coords, coords.level_choice, batch, encoder.transform, coords.mpp)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    start = time.perf_counter()
    n = sum(len(item["patches"]) for item in loader)
    ds.close()
    return n / (time.perf_counter() - start)


def preload(job: SlideJob, coords_path: Path, encoder, batch: int, device: torch.device) -> list[torch.Tensor]:
    """The slide's patches as normalised (B, 3, S, S) tensors on the device, as the model sees them."""
    coords = read_coords(coords_path)
    with open_slide(job.path) as slide:
        patches = np.stack([slide.read_patch(x, y, coords.level_choice) for x, y in coords.coords])  # (N, P, P, 3)
    tensors = encoder.transform(torch.from_numpy(patches).to(device))  # (N, 3, S, S)
    if device.type == "cuda":
        tensors = tensors.contiguous(memory_format=torch.channels_last)
    return list(torch.split(tensors, batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", default=["resnet50-trunc", "resnet18-trunc"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--batch-size", type=int, help="default: 8 on CPU, 256 on CUDA")
    parser.add_argument("--workers", type=int, help="workers of a fixed row next to the automatic one "
                                                    "(default: 2 on CPU, 8 on CUDA)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                        help="CUDA autocast precision (default: the encoder's preferred one)")
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--height", type=int, default=6144)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rows", choices=("all", "goal", "auto"), default="all",
                        help="goal: only the automatic settings and the fixed --workers row; auto: the automatic "
                             "settings only (default: all)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the batch-size sweep and the read-only line")
    args = parser.parse_args()
    os.environ.setdefault("BENCH_PROGRESS", "0")

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    auto = ExtractOptions(batch_size=args.batch_size).settings(device, 224)
    batch = auto.batch_size
    workers = args.workers if args.workers is not None else (8 if cuda else 2)
    cores = torch.get_num_threads()
    print(f"machine: {cpu_model()}, {cores} threads; device {device_name(device)}; torch {torch.__version__}; "
          f"load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        job, coords_path, n = make_slide(tmp, args.width, args.height)
        print(f"slide: {args.width}x{args.height} px synthetic TIFF, {n} patches of 224 px at 20x, batch {batch}")
        print(f"automatic settings: {auto.describe()}\n")
        header = f"{'encoder':<16}{'workers':>8}{'main threads':>14}{'pipeline p/s':>14}{'bare p/s':>10}{'ratio':>8}"
        print(header)
        print("-" * len(header))
        # (workers, main threads): the automatic settings (goal row) first, then fixed ones
        configs = [(None, None), (workers, None)] + ([(workers, 1), (1, None)] if not cuda else [(0, None)])
        if args.rows != "all":
            configs = configs[:2 if args.rows == "goal" else 1]
        for name in args.encoders:
            encoder = build_encoder(name, random_init=True, seed=0)
            encoder.model.to(device)
            if cuda:
                encoder.model.to(memory_format=torch.channels_last)
            precision = (args.precision or encoder.precision) if cuda else "fp32"
            batches = preload(job, coords_path, encoder, batch, device)
            bare_forward(encoder, batches[:1], device, precision)  # warm-up: allocations, kernel selection
            for n_workers, threads in configs:
                bare_s, pipe_s = float("inf"), float("inf")
                for _ in range(args.repeats):  # alternate, best of each: both see the same background load
                    bare_s = min(bare_s, bare_forward(encoder, batches, device, precision))
                    pipe_s = min(pipe_s, pipeline(job, coords_path, tmp / "features.h5", encoder, n_workers, threads,
                                                  batch, device, args.precision))
                shown = threads if threads is not None else cores
                label = f"auto={auto.num_workers}" if n_workers is None else str(n_workers)
                print(f"{name:<16}{label:>8}{shown:>14}{n / pipe_s:>14.1f}{n / bare_s:>10.1f}"
                      f"{bare_s / pipe_s:>8.3f}")
            if cuda:
                print(f"{'':<16}seconds per slide of 10,000 patches at the pipeline's rate: "
                      f"{10_000 * pipe_s / n:.1f} s ({precision}, batch {batch}, {workers} workers)")
            elif not args.no_sweep:
                sweep = {bs: n / min(bare_forward(encoder, list(torch.split(torch.cat(batches), bs)), device, precision)
                                     for _ in range(args.repeats)) for bs in (4, 8, 16, 64)}
                print(f"{'':<16}bare forward p/s by batch size: "
                      + ", ".join(f"{bs}: {rate:.1f}" for bs, rate in sweep.items()))
            if not args.no_sweep:
                print(f"{'':<16}reading alone ({workers} workers, no model): "
                      f"{read_only(job, coords_path, encoder, workers, batch):.0f} p/s")
        print("\nratio = pipeline / bare forward with all threads, same patches, same run; "
              f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
