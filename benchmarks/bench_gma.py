"""GMA benchmark: gather/scatter step time and communication share; chunked mode's time and memory in K.

1. **1+N processes vs one process, same K** (CPU, gloo). One training step of
   encoder + GMA aggregator on K random tiles: one process with all K tiles in
   one forward (torch threads 1 and 2), against `gma_step` on 1 aggregator + N
   encoder processes under torchrun (DDP, one thread each). The step time is
   rank 0's median period over the timed steps. Communication share = the
   pure communication of a step (the same gather + scatter, and DDP's
   all-reduce of an encoder-sized gradient among the encoder ranks, with
   nothing else running; median, slowest rank) / the distributed step time.
2. **Chunked mode vs plain one-process training as K grows**: time per step and
   peak memory (growth of the process's peak RSS over its RSS before the step,
   VmHWM reset through bench.evaluation.costs.PeakMemory) for plain training (activations
   of all K tiles) and chunked mode (chunks of `--chunk`, activations of one
   chunk). Each (mode, K) runs in a fresh process so freed heap of one
   measurement cannot hide the next one's growth. Chunked memory must stay
   flat in K; its time costs one extra encoder forward.
3. With `--cuda` (a GPU machine): part 2 on the GPU with
   torch.cuda.max_memory_allocated, and the largest K each mode fits under
   `--budget-mib` (tiles per step at fixed memory). Not measurable on the
   CPU-only development machine.

Encoder: resnet18-trunc (random init) at `--input` px; pixels are random
tensors (slide reading is not part of what is measured).

Run: .venv/bin/python benchmarks/bench_gma.py [--quick] [--ks 32 64 128 256] [--nproc 3]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ENCODER = "resnet18-trunc"
HERE = Path(__file__).resolve()


# ----------------------------------------------------------------------------- shared pieces


def build(input_size: int, device: str = "cpu"):
    import torch

    from baselines.encoders import get_encoder
    from baselines.mil import build_aggregator

    spec = get_encoder(ENCODER).with_input_size(input_size)
    encoder = spec.create_model(random_init=True, seed=0).to(device)
    aggregator = build_aggregator("gma", in_dim=spec.embed_dim, n_outputs=2, seed=1).to(device)
    return encoder, aggregator, spec.embed_dim, torch.device(device)


def pixel_fn(input_size: int):
    """Random tiles, the same for the same (slide, index): no file reading in the measurement."""
    import torch

    def pixels(slide_id: str, indices):
        g = torch.Generator().manual_seed(int(indices[0]) if len(indices) else 0)
        return torch.rand(len(indices), 3, input_size, input_size, generator=g)

    return pixels


def target():
    import numpy as np

    from bench.evaluation.tasks import Targets, make_task

    return make_task("classification", classes=("a", "b")), Targets(label=np.array([1]))


def tiles_for(k: int, step: int):
    from e2e.gma.core import sample_tiles

    return sample_tiles(["s0"], [100_000], k, seed=0, epoch=0, step=step)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- one measurement (subprocess)


def one_process(mode: str, k: int, steps: int, input_size: int, chunk: int, threads: int, device: str) -> dict:
    """Median step time and peak memory growth of plain or chunked training in this process."""
    import torch

    from bench.evaluation.costs import PeakMemory
    from bench.evaluation.training import make_optimizer
    from e2e.gma.core import AggregatorSide, EncoderSide, LocalTopology, gma_step, load_pixels, set_train_mode

    torch.set_num_threads(threads)
    encoder, aggregator, dim, dev = build(input_size, device)
    set_train_mode(encoder, "frozen")
    task, tgt = target()
    opts = [make_optimizer("adamw", m.parameters(), 1e-4) for m in (encoder, aggregator)]
    pixels = pixel_fn(input_size)
    enc = EncoderSide(encoder, pixels, dev, dim, chunk=chunk, recompute=True)
    agg = AggregatorSide(aggregator, task, dev)

    def step(i: int) -> None:
        for o in opts:
            o.zero_grad(set_to_none=True)
        tiles = tiles_for(k, i)
        if mode == "chunked":
            gma_step(LocalTopology(), tiles, tgt, enc, agg)
        else:
            f = encoder(load_pixels(pixels, tiles).to(dev))  # (K, D), activations of all K tiles kept
            loss, _ = agg.loss(f, tgt)
            loss.backward()
        for o in opts:
            o.step()

    step(0)  # warm-up: allocator, optimiser state
    times, peaks = [], []
    for i in range(1, steps + 1):
        gc.collect()
        if dev.type == "cpu":
            _malloc_trim()  # hand freed heap back, or the step would reuse it without raising the RSS
        base = _rss_mib() if dev.type == "cpu" else torch.cuda.memory_allocated(dev) / 2**20
        with PeakMemory(dev) as mem:
            sync(dev)
            t0 = time.perf_counter()
            step(i)
            sync(dev)
            times.append(time.perf_counter() - t0)
        peaks.append(mem.mb - base)
    return {"mode": mode, "k": k, "threads": threads, "step_s": statistics.median(times), "peak_growth_mib": max(peaks)}


def _malloc_trim() -> None:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_one(args: argparse.Namespace, mode: str, k: int, threads: int, device: str = "cpu") -> dict:
    cmd = [sys.executable, str(HERE), "--one", mode, str(k), str(threads), "--steps", str(args.steps),
           "--input", str(args.input), "--chunk", str(args.chunk), "--device", device]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                         env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if out.returncode != 0:
        raise RuntimeError(f"{mode} K={k} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the distributed worker (torchrun)


def worker(k: int, steps: int, input_size: int, out: Path) -> None:
    """One rank: `steps` timed gma_steps after a warm-up, then the same exchanges with nothing else."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from bench.evaluation.training import make_optimizer
    from e2e.gma.core import AggregatorSide, DistTopology, EncoderSide, gma_step, set_train_mode
    from e2e.gma.launch import init_distributed

    torch.set_num_threads(1)
    device, _ = init_distributed("gloo", 300.0, "cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(ranks=list(range(1, world)))
    encoder, aggregator, dim, dev = build(input_size)
    task, tgt = target()
    topo = DistTopology(dev, dim)
    enc = agg = None
    if rank == 0:
        agg = AggregatorSide(aggregator, task, dev)
        opts = [make_optimizer("adamw", aggregator.parameters(), 1e-4)]
    else:
        set_train_mode(encoder, "frozen")
        ddp = DistributedDataParallel(encoder, process_group=group, forward_sync_buffers=False)
        enc = EncoderSide(ddp, pixel_fn(input_size), dev, dim, chunk=64, scale=world - 1)
        opts = [make_optimizer("adamw", encoder.parameters(), 1e-4)]
    stamps = []
    for i in range(steps + 2):
        for o in opts:
            o.zero_grad(set_to_none=True)
        gma_step(topo, tiles_for(k, i), tgt, enc, agg)
        for o in opts:
            o.step()
        stamps.append(time.perf_counter())
    periods = [b - a for a, b in zip(stamps[1:], stamps[2:])]  # steady state: after two warm-up steps
    # the pure communication of a step, nothing else running: the same gather + scatter, and on the
    # encoder ranks DDP's all-reduce of a gradient the size of the encoder's
    dist.barrier()
    share = torch.zeros(-(-k // (world - 1)), dim)
    flat = torch.zeros(sum(p.numel() for p in encoder.parameters())) if rank > 0 else None
    comm = []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        full = topo.gather(share if rank > 0 else None, k)
        topo.scatter(full, k)
        if flat is not None:
            dist.all_reduce(flat, group=group)
        comm.append(time.perf_counter() - t0)
    mine = {"step_s": statistics.median(periods), "comm_s": statistics.median(comm)}
    every = [None] * world
    dist.all_gather_object(every, mine)
    if rank == 0:
        out.write_text(json.dumps({"k": k, "nproc": world, "step_s": every[0]["step_s"],
                                   "comm_s": max(e["comm_s"] for e in every)}))
    dist.barrier()
    dist.destroy_process_group()


def run_distributed(args: argparse.Namespace, k: int) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               str(HERE), "--worker", str(k), "--steps", str(args.steps), "--input", str(args.input),
               "--out", str(out)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=str(HERE.parents[1]))
        if res.returncode != 0:
            raise RuntimeError(f"distributed K={k} failed:\n{res.stdout[-3000:]}{res.stderr[-3000:]}")
        return json.loads(out.read_text())


# ----------------------------------------------------------------------------- main


def best_of(runs: int, fn):
    """Best-of-N (the CPU is shared): the smallest step time of `runs` repeats."""
    results = [fn() for _ in range(runs)]
    return min(results, key=lambda r: r["step_s"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", type=int, nargs="+", default=[32, 64, 128, 256], help="K values for part 2")
    p.add_argument("--dist-ks", type=int, nargs="+", default=[32, 128], help="K values for part 1")
    p.add_argument("--nproc", type=int, default=3, help="world size of part 1 (1 + N)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per measurement")
    p.add_argument("--input", type=int, default=64, help="tile side in pixels")
    p.add_argument("--chunk", type=int, default=16, help="chunk size of chunked mode")
    p.add_argument("--repeats", type=int, default=2, help="best-of-N repeats (alternated)")
    p.add_argument("--parts", type=int, nargs="+", default=[1, 2], help="which CPU parts to run (default: 1 2)")
    p.add_argument("--quick", action="store_true", help="small K values, 2 steps, 1 repeat")
    p.add_argument("--cuda", action="store_true", help="part 3: on the GPU")
    p.add_argument("--budget-mib", type=float, default=8192, help="part 3: memory budget for the largest K")
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--one", nargs=3, metavar=("MODE", "K", "THREADS"), help=argparse.SUPPRESS)
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        mode, k, threads = args.one[0], int(args.one[1]), int(args.one[2])
        print(json.dumps(one_process(mode, k, args.steps, args.input, args.chunk, threads, args.device)))
        return
    if args.worker:
        worker(args.worker, args.steps, args.input, Path(args.out))
        return
    if args.quick:
        args.ks, args.dist_ks, args.steps, args.repeats = [16, 32, 64], [16], 2, 1
    from bench.evaluation.costs import cpu_model

    print(f"# bench_gma {datetime.date.today()} on {cpu_model()} ({os.cpu_count()} cores); encoder {ENCODER} "
          f"random init at {args.input} px, GMA aggregator; {args.steps} timed steps, best of {args.repeats}")
    if args.cuda:
        cuda_part(args)
        return

    if 1 in args.parts:
        part1(args)
    if 2 in args.parts:
        part2(args)


def part1(args: argparse.Namespace) -> None:
    print(f"\n## 1. one training step: 1+{args.nproc - 1} processes (gloo) vs one process, same K")
    print("| K | 1 process, 1 thread (s) | 1 process, 2 threads (s) | "
          f"1+{args.nproc - 1} processes (s) | speed-up vs best 1-process | pure communication | comm share |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for k in args.dist_ks:
        singles = {t: best_of(args.repeats, lambda t=t: run_one(args, "plain", k, t)) for t in (1, 2)}
        dist_res = best_of(args.repeats, lambda: run_distributed(args, k))
        best_single = min(s["step_s"] for s in singles.values())
        print(f"| {k} | {singles[1]['step_s']:.3f} | {singles[2]['step_s']:.3f} | {dist_res['step_s']:.3f} | "
              f"{best_single / dist_res['step_s']:.2f}x | {dist_res['comm_s'] * 1e3:.2f} ms | "
              f"{dist_res['comm_s'] / dist_res['step_s']:.1%} |", flush=True)



def part2(args: argparse.Namespace) -> None:
    print(f"\n## 2. chunked mode (chunk {args.chunk}) vs plain one-process training, 1 thread")
    print("| K | plain step (s) | chunked step (s) | time ratio chunked/plain | plain peak growth (MiB) | "
          "chunked peak growth (MiB) | memory ratio chunked/plain |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for k in args.ks:
        plain = best_of(args.repeats, lambda: run_one(args, "plain", k, 1))
        chunked = best_of(args.repeats, lambda: run_one(args, "chunked", k, 1))
        print(f"| {k} | {plain['step_s']:.3f} | {chunked['step_s']:.3f} | {chunked['step_s'] / plain['step_s']:.2f} | "
              f"{plain['peak_growth_mib']:.0f} | {chunked['peak_growth_mib']:.0f} | "
              f"{chunked['peak_growth_mib'] / max(plain['peak_growth_mib'], 1e-9):.2f} |", flush=True)


def cuda_part(args: argparse.Namespace) -> None:
    """Part 3: GPU memory (max allocated) per K, and the largest K each mode fits under the budget."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--cuda needs a CUDA GPU; this machine has none")
    print(f"\n## 3. GPU ({torch.cuda.get_device_name(0)}): plain vs chunked (chunk {args.chunk}), fp32")
    print("| K | plain step (s) | plain max allocated (MiB) | chunked step (s) | chunked max allocated (MiB) |")
    print("|---:|---:|---:|---:|---:|")
    fits = {"plain": 0, "chunked": 0}
    for k in args.ks:
        row = {}
        for mode in ("plain", "chunked"):
            try:
                row[mode] = run_one(args, mode, k, 1, device="cuda")
                if row[mode]["peak_growth_mib"] <= args.budget_mib:
                    fits[mode] = max(fits[mode], k)
            except RuntimeError:  # out of memory
                row[mode] = {"step_s": float("nan"), "peak_growth_mib": float("nan")}
        print(f"| {k} | {row['plain']['step_s']:.3f} | {row['plain']['peak_growth_mib']:.0f} | "
              f"{row['chunked']['step_s']:.3f} | {row['chunked']['peak_growth_mib']:.0f} |", flush=True)
    print(f"\nlargest K under {args.budget_mib:.0f} MiB: plain {fits['plain']}, chunked {fits['chunked']} "
          f"(ratio {fits['chunked'] / max(fits['plain'], 1):.1f}x; bounded by the K values tried)")


if __name__ == "__main__":
    main()
