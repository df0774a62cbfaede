"""Slide reader backends: patches/s of OpenSlide and tiffslide on the same patches, same run.

One synthetic pyramidal TIFF (`bench.data.synthetic`, JPEG tiles) tiled at 20x / 224 px;
every tissue patch is read with `Slide.read_patch` (RGB uint8, what extraction and E2E
read), first in one thread, then in `--threads` threads (each with its own handle, the
patches split between them). Backends alternate and each figure is the best of
`--repeats`, so both see the same background load. The patches of both backends are
compared (equal pixels expected; `tests/bench/test_slide_readers.py`).

    .venv/bin/python benchmarks/bench_reader.py [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.data.slides import open_slide, reader_available
from bench.data.synthetic import SyntheticSpec, plan_cohort, write_slide
from bench.data.tiling import TileParams, read_coords, tile_slide
from bench.evaluation.costs import cpu_model


def make_slide(tmp: Path, width: int, height: int) -> tuple[Path, np.ndarray, object]:
    spec = SyntheticSpec(kind="subtyping", n_slides=2, width=width, height=height, seed=0)
    plan = plan_cohort(spec)[0][0]
    write_slide(spec, plan, tmp / "cohort")
    path = tmp / "cohort" / "slides" / f"{plan.slide_id}.tif"
    result = tile_slide(path, tmp / "tiles", TileParams(magnification=20, patch_size=224, tissue_threshold=0.1),
                        qc=False)
    coords = read_coords(result.coords_path)
    return path, coords.coords, coords.level_choice


def read_all(path: Path, reader: str, xy: np.ndarray, choice, threads: int) -> tuple[float, list[np.ndarray]]:
    """(seconds, patches) reading every patch of `xy` in `threads` threads, one handle per thread."""
    parts = np.array_split(xy, threads)

    def work(part: np.ndarray) -> list[np.ndarray]:
        with open_slide(path, reader=reader) as s:
            return [s.read_patch(int(x), int(y), choice) for x, y in part]

    start = time.perf_counter()
    if threads == 1:
        out = work(xy)
    else:
        with ThreadPoolExecutor(threads) as pool:
            out = [p for chunk in pool.map(work, parts) for p in chunk]
    return time.perf_counter() - start, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=8192)
    p.add_argument("--height", type=int, default=6144)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads of the multi-threaded rows")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if not reader_available("tiffslide"):
        raise SystemExit("tiffslide is not installed: pip install 'cpath-bench[tiffslide]'")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; load average at start "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        path, xy, choice = make_slide(Path(tmp), args.width, args.height)
        print(f"slide: {args.width}x{args.height} px synthetic TIFF, {len(xy)} patches of 224 px at 20x "
              f"(level {choice.level}, read {choice.read_size} px)\n")
        print("| threads | OpenSlide (patches/s) | tiffslide (patches/s) | tiffslide / OpenSlide | pixels equal |")
        print("|---:|---:|---:|---:|---|")
        for reader in ("openslide", "tiffslide"):
            read_all(path, reader, xy[:16], choice, 1)  # warm-up: imports, first decodes
        for threads in sorted({1, args.threads}):
            best = {"openslide": float("inf"), "tiffslide": float("inf")}
            patches = {}
            for _ in range(args.repeats):  # alternate: both see the same background load
                for reader in best:
                    secs, patches[reader] = read_all(path, reader, xy, choice, threads)
                    best[reader] = min(best[reader], secs)
            equal = all(np.array_equal(a, b) for a, b in zip(patches["openslide"], patches["tiffslide"]))
            o, t = len(xy) / best["openslide"], len(xy) / best["tiffslide"]
            print(f"| {threads} | {o:.0f} | {t:.0f} | {t / o:.2f} | {'yes' if equal else 'NO'} |", flush=True)
    print(f"\nload average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
