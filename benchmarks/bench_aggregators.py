"""MIL aggregator benchmark on CPU: training throughput, inference time and memory, A+ at scale.

1. Training throughput of ABMIL and TransMIL on bags of 10,000 x 1024 through the
   trainer's real data path: `train_two_stage` itself (HDF5 feature files ->
   in-memory bag cache -> `TwoStageLoop.train_step`: checked `forward`, task loss,
   NaN guard, AdamW, cosine schedule; plus its per-epoch history and checkpoint),
   once with the bag cache and once reading every bag from disk at every step,
   against a bare loop over the same preloaded tensors (`aggregate` directly, no
   checks, cross-entropy, AdamW, cosine schedule). The bare epochs run inside the
   trainer's epoch callback, so trainer and bare epochs alternate; epoch 0 (the
   cache fill, warm-up) is left out; rates are bags / best-of-N epoch time.
   Ratio = trainer / bare (goal >= 0.9).
2. Inference seconds per bag (eval, no_grad) for every registered aggregator at
   N = 1,000, 10,000 and 50,000 instances of 1024 features, and peak memory:
   the growth of the process's peak RSS over its RSS when the forward starts
   (model and input already allocated, freed heap returned to the OS with
   malloc_trim), read from VmHWM after resetting it (bench.evaluation.costs.PeakMemory).
   tracemalloc does not see torch's allocations.
3. ABMILX with the naive A+ (explicit N x N) next to the scalable A+ (SDPA).
   The naive path is skipped where its N x N matrices would not fit in memory.
4. The aggregators added for issue 19 (RRT-MIL, WiKG, CLAM-MB, DTFD-MIL, maxmil,
   abmilx-feat, 2DMamba with a square patch grid): one training step (forward with the label, task + auxiliary loss,
   backward, AdamW step) and one eval forward at each N, seconds and peak RSS growth,
   next to ABMIL measured in the same run (the ratio column); a step that fails for
   memory, or whose peak would pass 24 GiB (the target machine), is flagged.
5. The slide encoders as aggregators (FEATHER, CHIEF, TITAN, PRISM, GigaPath's slide
   encoder), published sizes with random weights, on bags at each encoder's own feature
   size (TITAN and GigaPath with a square patch grid): a probe step, a fine-tuning step
   and an eval forward, next to ABMIL on N x 1024; TITAN's full attention is skipped and
   flagged where its estimated need passes the machine's memory, and any step whose peak,
   extrapolated linearly from the last size it ran at, would pass 24 GiB (or 80% of the free
   memory) is skipped and flagged with that estimate (a lower bound).

Run: .venv/bin/python benchmarks/bench_aggregators.py [--quick] [--sizes 1000 10000 50000]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import datetime
import gc
import math
import tempfile
import time
from collections.abc import Callable
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


def train_throughput(name: str, paths: list[Path], epochs: int, cache: bool, out_dir: Path
                     ) -> tuple[list[float], list[float]]:
    """Seconds per epoch of `train_two_stage` and of the bare loop, alternating epoch by epoch."""
    import h5py
    import pandas as pd
    import torch
    import torch.nn.functional as F

    from baselines.mil import build_aggregator
    from baselines.train import TwoStageConfig, train_two_stage
    from bench.evaluation.tasks import make_task
    from bench.evaluation.training import FoldBags, cosine_schedule, make_optimizer

    ids = [p.stem for p in paths]
    labels = [i % 2 for i in range(len(paths))]
    frame = pd.DataFrame({"bag_id": ids, "patient_id": ids, "slide_ids": [(s,) for s in ids], "label": labels})
    task = make_task("classification", classes=("0", "1"))
    # no val bags (selection keeps the last epoch) and predict_test=False: an epoch is training only
    bags = FoldBags(task=task, parts={"train": frame, "val": frame.iloc[:0], "test": frame.iloc[:1]},
                    split_path=out_dir / "split.csv", split_sha256="bench", fold=0)
    config = TwoStageConfig(aggregator=name, epochs=epochs, lr=2e-4, precision="fp32", device="cpu",
                            cache_bags=cache)

    bare_bags = []
    for path in paths:
        with h5py.File(path, "r") as f:
            bare_bags.append(torch.from_numpy(f["features"][:])[None])  # (1, N, D)
    targets = [torch.tensor([y]) for y in labels]
    model = build_aggregator(name, IN_DIM, 2, seed=0).train()
    opt = make_optimizer("adamw", model.parameters(), 2e-4)
    sched = cosine_schedule(opt, epochs * len(paths))
    order = np.random.default_rng(0).permutation(len(paths))

    def bare_epoch() -> float:
        t0 = time.perf_counter()
        for i in order:
            loss = F.cross_entropy(model.aggregate(bare_bags[i], None, None).logits, targets[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        return time.perf_counter() - t0

    trainer_times: list[float] = []
    bare_times: list[float] = []
    last = time.perf_counter()

    def between_epochs(epoch: int, row: dict) -> None:
        nonlocal last
        trainer_times.append(time.perf_counter() - last)  # the trainer's whole epoch: steps, history, checkpoint
        bare_times.append(bare_epoch())
        last = time.perf_counter()

    train_two_stage(bags, {s: p for s, p in zip(ids, paths)}, config, out_dir, epoch_callback=between_epochs,
                    predict_test=False)
    return trainer_times[1:], bare_times[1:]  # epoch 0: cache fill and warm-up


# ----------------------------------------------------------------------------- 2./3. inference


def feature_dim(name: str) -> int:
    """1024 for the MIL aggregators; a slide encoder's own patch-feature size (TITAN 768, GigaPath 1536, ...)."""
    from baselines.encoders_slide import SLIDE_ENCODERS
    from baselines.mil import AGGREGATORS

    encoder = AGGREGATORS.get(name).defaults.get("encoder")
    return SLIDE_ENCODERS.get(encoder).patch_dim if encoder else IN_DIM


def bag(name: str, model: object, n: int) -> dict[str, object]:
    """The forward's inputs for a (1, n, D) bag; coords-using models (TITAN, GigaPath) get a square
    row-major patch grid."""
    import torch

    inputs: dict[str, object] = {"x": torch.randn(1, n, feature_dim(name), generator=torch.Generator().manual_seed(n))}
    if getattr(model, "uses_coords", False):
        from baselines.mil.base import square_grid

        inputs["coords"] = square_grid(n)
    return inputs


def infer(name: str, n: int, repeats: int, **params) -> tuple[float, float]:
    """Best-of-`repeats` seconds per bag (robust to other load on the machine) and
    the largest peak RSS growth (MiB) of an eval forward on a (1, n, D) bag."""
    import torch

    from baselines.mil import build_aggregator
    from bench.evaluation.costs import PeakMemory, peak_memory_mb

    model = build_aggregator(name, feature_dim(name), 2, seed=0, **params).eval()
    inputs = bag(name, model, n)
    times, growth = [], []
    for _ in range(repeats):
        release_free_memory()
        with PeakMemory() as peak, torch.no_grad():
            start_rss = peak_memory_mb()  # the reset set the peak to the current RSS
            t0 = time.perf_counter()
            model(**inputs)
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
    parser.add_argument("--train-epochs", type=int, default=4, help="trainer epochs (the first is not timed)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new", nargs="+", default=None, metavar="NAME",
                        help="section 4: only these of the new aggregators (default: all of them)")
    parser.add_argument("--slide", nargs="+", default=None, metavar="NAME",
                        help="section 5: only these slide encoders (default: all of them)")
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script runs")
    parser.add_argument("--only", choices=("all", "train", "inference", "new", "slide"), default="all",
                        help="run only the training-throughput part, only inference and A+, only the new "
                             "aggregators' train step and inference, or only the slide encoders (default: all)")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.train_bags, args.train_instances, args.repeats = [500, 2_000], 2, 2_000, 1
        args.train_epochs = 3

    import torch

    from bench.evaluation.costs import device_name

    print(f"# bench_aggregators {datetime.date.today()} on {device_name()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average at start {os.getloadavg()[0]:.2f}")

    if args.only in ("all", "train"):
        train_section(args)
    if args.only in ("all", "inference"):
        inference_section(args)
    if args.only in ("all", "new"):
        new_aggregators_section(args)
    if args.only in ("all", "slide"):
        slide_section(args)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


def train_section(args: argparse.Namespace) -> None:
    print(f"\n## training throughput, bags of {args.train_instances:,} x {IN_DIM}, batch size 1, AdamW + cosine, "
          f"{args.train_bags} bags x {args.train_epochs - 1} timed epochs\n")
    print("| aggregator | bare loop (bags/s) | trainer, cached (bags/s) | ratio | "
          "trainer, read per step (bags/s) | ratio |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_bags(Path(tmp), args.train_bags, args.train_instances, seed=0)
        for name in ("abmil", "transmil"):
            cells, bare_best = [], math.inf
            for cache in (True, False):
                trainer, bare = train_throughput(name, paths, args.train_epochs, cache, Path(tmp) / f"{name}-{cache}")
                bare_best = min(bare_best, *bare)
                cells.append(min(trainer))
            rb = args.train_bags / bare_best
            rc, rd = (args.train_bags / t for t in cells)
            print(f"| {name} | {rb:.2f} | {rc:.2f} | {rc / rb:.3f} | {rd:.2f} | {rd / rb:.3f} |", flush=True)


def inference_section(args: argparse.Namespace) -> None:
    from baselines.mil import AGGREGATORS

    print("\n## inference, one bag of N x 1024 (eval, no_grad): seconds per bag / peak RSS growth (MiB)\n")
    print("| aggregator | " + " | ".join(f"N = {n:,}" for n in args.sizes) + " |")
    print("|---|" + "---|" * len(args.sizes))
    for name in AGGREGATORS.names():
        if "encoder" in AGGREGATORS.get(name).defaults:
            continue  # slide encoders: section 5, at their own feature size
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


# ----------------------------------------------------------------------------- 4. the aggregators of issue 19

NEW_AGGREGATORS = ("rrt-mil", "wikg", "clam-mb", "dtfd-mil", "maxmil", "abmilx-feat", "2dmamba")
LIMIT_MIB = 24 * 1024  # the 24 GiB the cost columns are judged against


def train_step(name: str, n: int) -> tuple[float, float, float]:
    """Seconds and peak RSS growth (MiB) of one training step on a (1, n, D) bag, 2 classes (a probe's
    step trains only its linear head, the encoder runs without gradient), and the part of that growth that
    does not depend on n: the gradients and AdamW's two moment buffers of the trainable parameters (MiB)."""
    import torch
    import torch.nn.functional as F

    from baselines.mil import AGGREGATORS, build_aggregator
    from bench.evaluation.costs import PeakMemory, peak_memory_mb

    model = build_aggregator(name, feature_dim(name), 2, seed=0).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    inputs = bag(name, model, n)
    label = torch.tensor([1])
    w = AGGREGATORS.get(name).aux_weight
    release_free_memory()
    with PeakMemory() as peak:
        start_rss = peak_memory_mb()
        t0 = time.perf_counter()
        out = model(**inputs, label=label)
        loss = F.cross_entropy(out.logits, label)
        if out.aux_loss is not None:
            loss = (1 - w) * loss + w * out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        seconds = time.perf_counter() - t0
    fixed = 3 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**20
    return seconds, peak.mb - start_rss, fixed


class Guard:
    """Runs a measurement unless the peak it would reach passes 24 GiB or 80% of the free memory; then it is
    skipped and flagged with that estimate. The estimate is linear in N (a lower bound where attention memory
    grows faster than linearly): through the last two sizes the step ran at where there are two, else the
    step's size-independent memory (a training step's gradients and AdamW buffers, reported by the step) plus
    the rest of the one peak measured, scaled with N."""

    def __init__(self) -> None:
        self.measured: dict[str, tuple[int, float, float]] = {}  # key -> (N, MiB, fixed MiB) of the last run
        self.previous: dict[str, tuple[int, float]] = {}  # key -> (N, MiB) of the run before it

    def estimate(self, key: str, n: int) -> float | None:
        if key not in self.measured:
            return None
        n1, mib1, fixed = self.measured[key]
        if key in self.previous and self.previous[key][0] < n1:
            n0, mib0 = self.previous[key]
            return mib1 + max(mib1 - mib0, 0.0) * (n - n1) / (n1 - n0)
        return fixed + max(mib1 - fixed, 0.0) * n / n1

    def run(self, key: str, n: int, step: Callable[[], tuple[float, ...]]) -> tuple[str, str, float | None, float]:
        """(seconds cell, MiB cell, seconds or None, MiB or the estimate / inf) of `step` at n instances;
        `step` returns (seconds, MiB) or (seconds, MiB, size-independent MiB)."""
        need = self.estimate(key, n)
        if need is not None and need > min(0.8 * mem_available_mib(), LIMIT_MIB):
            sizes = [self.measured[key][0]] + ([self.previous[key][0]] if key in self.previous else [])
            return (f"skipped: >= {need / 1024:,.0f} GiB (estimated from N = "
                    f"{' and '.join(f'{m:,}' for m in sorted(sizes))})"), "-", None, need
        try:
            seconds, mib, *rest = step()
        except (MemoryError, RuntimeError) as exc:  # an allocation that does not fit
            return f"failed: {type(exc).__name__}", "-", None, math.inf
        if key in self.measured:
            self.previous[key] = self.measured[key][:2]
        self.measured[key] = (n, max(mib, 1.0), rest[0] if rest else 0.0)
        return f"{seconds:.3f}", f"{mib:,.0f}", seconds, mib


def new_aggregators_section(args: argparse.Namespace) -> None:
    print("\n## aggregators of issue 19: one training step / one eval forward on a bag of N x 1024, "
          "seconds and peak RSS growth (MiB); ratio = time / ABMIL's in this run\n")
    print("| aggregator | N | train step s | train MiB | x ABMIL | eval s | eval MiB | x ABMIL | 24 GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    guard = Guard()
    for n in args.sizes:
        base_train, *_ = train_step("abmil", n)
        base_eval, _ = infer("abmil", n, repeats=1)
        for name in args.new or NEW_AGGREGATORS:
            ts, tm, tsec, tmib = guard.run(f"{name} train", n, lambda: train_step(name, n))
            es, em, esec, emib = guard.run(f"{name} eval", n, lambda: infer(name, n, repeats=1))
            fits = "yes" if max(tmib, emib) < LIMIT_MIB else "no (flag)"
            t_ratio = f"{tsec / base_train:.1f}" if tsec is not None else "-"
            e_ratio = f"{esec / base_eval:.1f}" if esec is not None else "-"
            print(f"| {name} | {n:,} | {ts} | {tm} | {t_ratio} | {es} | {em} | {e_ratio} | {fits} |", flush=True)


# ----------------------------------------------------------------------------- 5. slide encoders as aggregators


def slide_need_mib(name: str, n: int) -> float:
    """Memory a slide encoder's forward needs beyond its weights at n patches (estimate, MiB): TITAN's full
    attention holds a float64 distance matrix (M, M), the float32 ALiBi bias (H, 1+M, 1+M) and its masked
    copy; the others attend within segments or to a fixed set of latents (linear in n)."""
    if name.removesuffix("-ft") != "titan":
        return 0.0
    t, heads = n + 1, 12
    return (8 * n * n + 2 * 4 * heads * t * t) / 2**20


def slide_section(args: argparse.Namespace) -> None:
    from baselines.encoders_slide import SLIDE_ENCODERS
    from baselines.mil import AGGREGATORS

    names = [n for n in AGGREGATORS.names() if "encoder" in AGGREGATORS.get(n).defaults and not n.endswith("-ft")]
    if args.slide:
        names = [n for n in names if n in args.slide]
    print("\n## slide encoders as aggregators (published sizes, random init, fp32), one bag of N patch features "
          "at the encoder's own feature size: probe train step (linear head only), fine-tune train step, "
          "eval forward; seconds and peak RSS growth (MiB); ratio = time / ABMIL's on N x 1024 in this run\n")
    print("| slide encoder | D | N | probe step s | probe MiB | fine-tune step s | fine-tune MiB | x ABMIL | eval s | "
          "eval MiB | x ABMIL | 24 GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    guard = Guard()
    calibrate = max(2, min(args.sizes) // 2)  # a smaller size first, unprinted: two points for the memory estimate
    for name in names:
        if slide_need_mib(name, calibrate) < LIMIT_MIB:
            guard.run(f"{name} probe", calibrate, lambda: train_step(name, calibrate))
            guard.run(f"{name} ft", calibrate, lambda: train_step(f"{name}-ft", calibrate))
            guard.run(f"{name} eval", calibrate, lambda: infer(name, calibrate, repeats=1))

    for n in args.sizes:
        base_train, *_ = train_step("abmil", n)
        base_eval, _ = infer("abmil", n, repeats=1)
        for name in names:
            d = SLIDE_ENCODERS.get(AGGREGATORS.get(name).defaults["encoder"]).patch_dim
            need = slide_need_mib(name, n)
            if need > 0.8 * mem_available_mib() or need > LIMIT_MIB:
                print(f"| {name} | {d} | {n:,} | skipped: needs >= {need / 1024:,.0f} GiB (full attention over "
                      f"{n:,} tokens) | - | - | - | - | - | - | - | no (flag) |", flush=True)
                continue
            ps, pm, _, pmib = guard.run(f"{name} probe", n, lambda: train_step(name, n))
            fs, fm, fsec, fmib = guard.run(f"{name} ft", n, lambda: train_step(f"{name}-ft", n))
            es, em, esec, emib = guard.run(f"{name} eval", n, lambda: infer(name, n, repeats=1))
            fits = "yes" if max(pmib, fmib, emib) < LIMIT_MIB else "no (flag)"
            f_ratio = f"{fsec / base_train:.1f}" if fsec is not None else "-"
            e_ratio = f"{esec / base_eval:.1f}" if esec is not None else "-"
            print(f"| {name} | {d} | {n:,} | {ps} | {pm} | {fs} | {fm} | {f_ratio} | {es} | {em} | {e_ratio} | {fits} |",
                  flush=True)


if __name__ == "__main__":
    main()
