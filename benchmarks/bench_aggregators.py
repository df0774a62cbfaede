"""MIL aggregator benchmark on CPU: training throughput, inference time and memory, A+ at scale.

1. Training throughput of ABMIL and TransMIL on bags of 10,000 x 1024 through a
   small bag data path (HDF5 feature files -> in-memory bag cache -> DataLoader
   at batch size 1 -> the aggregator's checked `forward` -> loss -> AdamW step)
   against a bare loop over the same preloaded tensors (`aggregate` directly, no
   checks, same loss and step), interleaved step by step; rates are 1 / median
   step time. Ratio = data path / bare (goal >= 0.9).
2. Inference seconds per bag (eval, no_grad) for every registered aggregator at
   N = 1,000, 10,000 and 50,000 instances of 1024 features, and peak memory:
   the growth of the process's peak RSS over its RSS when the forward starts
   (model and input already allocated, freed heap returned to the OS with
   malloc_trim), read from VmHWM after resetting it (bench.costs.PeakMemory).
   tracemalloc does not see torch's allocations.
3. ABMILX with the naive A+ (explicit N x N) next to the scalable A+ (SDPA).
   The naive path is skipped where its N x N matrices would not fit in memory.

Run: .venv/bin/python benchmarks/bench_aggregators.py [--quick] [--sizes 1000 10000 50000]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import datetime
import gc
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

IN_DIM = 1024


def mem_available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


# ----------------------------------------------------------------------------- 1. training throughput


def write_bags(folder: Path, n_bags: int, n_instances: int, seed: int) -> list[Path]:
    import h5py

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n_bags):
        path = folder / f"bag{i}.h5"
        with h5py.File(path, "w") as f:
            f["features"] = rng.standard_normal((n_instances, IN_DIM), dtype=np.float32)
            f["coords"] = np.zeros((n_instances, 2), dtype=np.int64)
        paths.append(path)
    return paths


def make_loader(paths: list[Path], labels: list[int]):
    """The small bag data path: features read once into memory, served at batch size 1."""
    import h5py
    import torch
    from torch.utils.data import DataLoader, Dataset

    class CachedBags(Dataset):
        def __init__(self) -> None:
            self.cache: dict[int, torch.Tensor] = {}

        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            if i not in self.cache:
                with h5py.File(paths[i], "r") as f:
                    self.cache[i] = torch.from_numpy(f["features"][:])
            return self.cache[i], torch.tensor(labels[i])

    def collate(batch):
        (x, y), = batch
        return x.unsqueeze(0), y.view(1)  # (1, N, D), (1,)

    return DataLoader(CachedBags(), batch_size=1, shuffle=True, collate_fn=collate,
                      generator=torch.Generator().manual_seed(0))


def train_throughput(name: str, paths: list[Path], repeats: int) -> tuple[float, float]:
    import torch
    import torch.nn.functional as F

    from baselines.mil import build_aggregator

    labels = [i % 2 for i in range(len(paths))]
    loader = make_loader(paths, labels)
    for _ in loader:  # fill the cache (reading the files is not what is measured)
        pass
    bags = [loader.dataset.cache[i].unsqueeze(0) for i in range(len(paths))]  # the same tensors
    targets = [torch.tensor([y]) for y in labels]
    model = build_aggregator(name, IN_DIM, 2, seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(out_logits, y) -> None:
        loss = F.cross_entropy(out_logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def bare_step(i: int) -> float:
        t0 = time.perf_counter()
        step(model.aggregate(bags[i], None, None).logits, targets[i])
        return time.perf_counter() - t0

    def data_path_step(batches) -> float:
        t0 = time.perf_counter()
        x, y = next(batches)
        step(model(x, label=y).logits, y)
        return time.perf_counter() - t0

    bare_step(0), data_path_step(iter(loader))  # warm-up
    bare_times, path_times = [], []
    for _ in range(repeats):
        batches = iter(loader)
        for i in range(len(paths)):  # step by step, interleaved, so machine noise hits both alike
            bare_times.append(bare_step(i))
            path_times.append(data_path_step(batches))
    return 1 / statistics.median(bare_times), 1 / statistics.median(path_times)


# ----------------------------------------------------------------------------- 2./3. inference


def infer(name: str, n: int, repeats: int, **params) -> tuple[float, float]:
    """Best-of-`repeats` seconds per bag (robust to other load on the machine) and
    the largest peak RSS growth (MiB) of an eval forward on a (1, n, 1024) bag."""
    import torch

    from baselines.mil import build_aggregator
    from bench.costs import PeakMemory, peak_memory_mb

    model = build_aggregator(name, IN_DIM, 2, seed=0, **params).eval()
    x = torch.randn(1, n, IN_DIM, generator=torch.Generator().manual_seed(n))
    times, growth = [], []
    for _ in range(repeats):
        release_free_memory()
        with PeakMemory() as peak, torch.no_grad():
            start_rss = peak_memory_mb()  # the reset set the peak to the current RSS
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
        growth.append(peak.mb - start_rss)
    return min(times), max(growth)


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS, so the next forward's RSS growth counts
    all of its working memory rather than only what earlier runs did not leave behind."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def naive_attn_plus_mib(n: int, heads: int = 8) -> float:
    """The naive A+ holds two float32 (H, N, N) tensors at once (scores and their softmax)."""
    return 2 * heads * n * n * 4 / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 50_000])
    parser.add_argument("--train-bags", type=int, default=6)
    parser.add_argument("--train-instances", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script runs")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.train_bags, args.train_instances, args.repeats = [500, 2_000], 2, 2_000, 1

    import torch

    from baselines.mil import AGGREGATORS
    from bench.costs import device_name

    print(f"# bench_aggregators {datetime.date.today()} on {device_name()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average at start {os.getloadavg()[0]:.2f}")

    print(f"\n## training throughput, bags of {args.train_instances:,} x {IN_DIM}, batch size 1, AdamW\n")
    print("| aggregator | bare loop (bags/s) | data path (bags/s) | ratio (goal >= 0.9) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_bags(Path(tmp), args.train_bags, args.train_instances, seed=0)
        for name in ("abmil", "transmil"):
            rb, rp = train_throughput(name, paths, args.repeats)
            print(f"| {name} | {rb:.2f} | {rp:.2f} | {rp / rb:.3f} |", flush=True)

    print("\n## inference, one bag of N x 1024 (eval, no_grad): seconds per bag / peak RSS growth (MiB)\n")
    print("| aggregator | " + " | ".join(f"N = {n:,}" for n in args.sizes) + " |")
    print("|---|" + "---|" * len(args.sizes))
    for name in AGGREGATORS.names():
        cells = []
        for n in args.sizes:
            seconds, mib = infer(name, n, repeats=1 if n >= 50_000 else args.repeats)
            cells.append(f"{seconds:.3f} s / {mib:,.0f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)

    print("\n## ABMILX attention plus: naive (N x N) vs scalable (SDPA)\n")
    print("| N | naive s/bag | naive MiB | SDPA s/bag | SDPA MiB | naive / SDPA time |")
    print("|---|---|---|---|---|---|")
    for n in args.sizes:
        reps = 1 if n >= 50_000 else args.repeats
        fast_s, fast_mib = infer("abmilx", n, reps)
        need = naive_attn_plus_mib(n)
        if need > 0.8 * mem_available_mib():
            print(f"| {n:,} | skipped: needs >= {need / 1024:,.0f} GiB | - | {fast_s:.3f} | {fast_mib:,.0f} | - |", flush=True)
            continue
        naive_s, naive_mib = infer("abmilx", n, reps, attn_plus_impl="naive")
        print(f"| {n:,} | {naive_s:.3f} | {naive_mib:,.0f} | {fast_s:.3f} | {fast_mib:,.0f} | {naive_s / fast_s:.2f} |",
              flush=True)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
