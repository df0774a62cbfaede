"""Tiling benchmark on a synthetic 40,000 x 30,000 px slide (+ the demo cohort's synth/tile time).

Measures, in one run:
1. seconds to tile the slide (thumbnail, tissue mask, grid, coords file, QC thumbnail)
   at 20x/256 px, and at 20x + 10x + 5x in one pass (`tile_slide_multi`) against the
   three tilings done one by one;
2. patch-read throughput of the project's reader (`Slide.read_patch`: RGB numpy out,
   transparent pixels white) against a bare `OpenSlide.read_region` loop over the same
   coordinates. Goal: ratio >= 0.9. The two loops alternate and each figure is the
   best of `--repeats`, so both see the same background load;
3. with `--demo`: `make_cohort` and `tile_slides_multi` (20x + 10x, 128 px) of the
   demo cohort (30 slides of 2,048 x 1,536 px), with 1 and 2 workers.

Run: .venv/bin/python benchmarks/bench_tiling.py [--cache DIR] [--n-patches 2000] [--demo]
The 40k slide is generated once into the cache folder (about a minute).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def big_slide(cache: Path) -> Path:
    """The 40,000 x 30,000 px slide: only the first slide of a seeded plan is written."""
    from bench.data.synthetic import SyntheticSpec, plan_cohort, write_slide

    spec = SyntheticSpec(kind="subtyping", n_slides=2, width=40_000, height=30_000, seed=7)
    folder = cache / "tiling-40k"
    path = folder / "slides" / "S0000.tif"
    if not path.exists():
        t0 = time.perf_counter()
        write_slide(spec, plan_cohort(spec)[0][0], folder)
        print(f"generated {path} in {time.perf_counter() - t0:.1f} s")
    return path


def bench_tiling(slide_path: Path, repeats: int) -> tuple[Path, int]:
    from bench.data.tiling import TileParams, tile_slide, tile_slide_multi

    out = Path(tempfile.mkdtemp())
    one = TileParams(magnification=20, patch_size=256)
    scales = [TileParams(magnification=m, patch_size=256) for m in (20, 10, 5)]
    best_one = best_seq = best_multi = float("inf")
    for _ in range(repeats):  # interleaved, best of each
        t0 = time.perf_counter()
        result = tile_slide(slide_path, out / "one", one, force=True)
        best_one = min(best_one, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for p in scales:
            tile_slide(slide_path, out / f"seq{p.magnification:g}", p, force=True)
        best_seq = min(best_seq, time.perf_counter() - t0)
        t0 = time.perf_counter()
        multi = tile_slide_multi(slide_path, [(p, out / f"multi{p.magnification:g}") for p in scales], force=True)
        best_multi = min(best_multi, time.perf_counter() - t0)
    counts = "/".join(str(r.n_patches) for r in multi)  # type: ignore[union-attr]
    print(f"tiling 20x/256px: {best_one:.2f} s/slide (best of {repeats}), {result.n_patches} patches, "
          f"tissue {result.tissue_area_mm2:.1f} mm2")
    print(f"tiling 20x+10x+5x/256px ({counts} patches): one pass {best_multi:.2f} s, one scale at a time "
          f"{best_seq:.2f} s, ratio {best_seq / best_multi:.2f}x")
    return result.coords_path, result.n_patches


def bench_reads(slide_path: Path, coords_path: Path, n_patches: int, repeats: int) -> None:
    import openslide

    from bench.data.slides import open_slide
    from bench.data.tiling import read_coords

    coords = read_coords(coords_path)
    rng = np.random.default_rng(0)
    pick = coords.coords[rng.choice(len(coords), size=min(n_patches, len(coords)), replace=False)]
    choice = coords.level_choice

    def bare() -> float:
        osr = openslide.OpenSlide(str(slide_path))
        try:
            t0 = time.perf_counter()
            for x, y in pick:
                osr.read_region((int(x), int(y)), choice.level, (choice.read_size, choice.read_size))
            return len(pick) / (time.perf_counter() - t0)
        finally:
            osr.close()

    def ours() -> float:
        with open_slide(slide_path) as s:
            t0 = time.perf_counter()
            for x, y in pick:
                s.read_patch(int(x), int(y), choice)
            return len(pick) / (time.perf_counter() - t0)

    bare(), ours()  # warm the OS page cache for both
    rates_bare, rates_ours = [], []
    for _ in range(repeats):  # interleaved so machine noise hits both alike
        rates_bare.append(bare())
        rates_ours.append(ours())
    rb, ro = max(rates_bare), max(rates_ours)
    print(f"patch reads 20x/256px ({len(pick)} random tissue patches, level {choice.level}): bare read_region "
          f"{rb:.0f} patches/s, project reader {ro:.0f} patches/s, ratio {ro / rb:.3f} (goal >= 0.9; best of "
          f"{repeats}; all runs bare {', '.join(f'{r:.0f}' for r in rates_bare)} / "
          f"ours {', '.join(f'{r:.0f}' for r in rates_ours)})")


def bench_demo(repeats: int) -> None:
    from bench.data.synthetic import SyntheticSpec, make_cohort
    from bench.data.tiling import SlideJob, TileParams, tile_slides_multi

    spec = SyntheticSpec(kind="subtyping", n_slides=30, width=2048, height=1536)
    for workers in (1, 2):
        synth_s = tile_s = float("inf")
        for _ in range(repeats):
            tmp = Path(tempfile.mkdtemp())
            t0 = time.perf_counter()
            root = make_cohort(spec, tmp / "demo", workers=workers)
            synth_s = min(synth_s, time.perf_counter() - t0)
            jobs = [SlideJob(p.stem, p) for p in sorted((root / "slides").glob("*.tif"))]
            targets = [(TileParams(magnification=m, patch_size=128), tmp / "tiles" / f"{m}x") for m in (20, 10)]
            t0 = time.perf_counter()
            tile_slides_multi(jobs, targets, workers=workers)
            tile_s = min(tile_s, time.perf_counter() - t0)
            shutil.rmtree(tmp)
        print(f"demo cohort (30 slides 2048x1536, tiles 20x+10x/128px), {workers} worker(s): "
              f"synth {synth_s:.1f} s, tile {tile_s:.1f} s (best of {repeats})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "cpath-bench-cache"))
    parser.add_argument("--n-patches", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--demo", action="store_true", help="also time synth + tile of the demo cohort")
    args = parser.parse_args()
    os.environ.setdefault("BENCH_PROGRESS", "0")

    from bench.evaluation.costs import cpu_model

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; load average at start {load_average()}")
    slide_path = big_slide(Path(args.cache))
    print(f"slide {slide_path} ({slide_path.stat().st_size / 1e6:.0f} MB)")
    coords_path, n = bench_tiling(slide_path, args.repeats)
    bench_reads(slide_path, coords_path, args.n_patches, args.repeats)
    if args.demo:
        bench_demo(args.repeats)
    print(f"load average at end {load_average()}")


if __name__ == "__main__":
    main()
