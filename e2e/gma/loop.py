"""The GMA training loop, written once for every rank and for the chunked mode.

`train_loop` runs on each process of a torchrun job (`DistTopology`: rank 0
trains the aggregator, ranks 1..N the encoder under DDP) and, with a
`LocalTopology`, in the caller's process (chunked mode). Per epoch:

1. training: one `gma_step` per training bag (order from `task.epoch_indices`,
   tiles from `sample_tiles`, both derived from the seed, epoch and step only),
   then each side steps its optimiser and cosine schedule;
2. validation: every patch of every validation slide encoded (shares spread
   over the encoder ranks), the aggregator on the whole bag, the task metrics
   on rank 0; the primary metric is broadcast so that every rank's
   `ModelSelector` keeps the same epoch (rank 0 the aggregator's weights, the
   encoder ranks the encoder's);
3. checkpoint: the encoder side writes `checkpoint/encoder-<epoch>/`, then rank 0
   `checkpoint/aggregator/` (the commit: a resumed job starts after the epoch
   rank 0 recorded, and the encoder checkpoint of that epoch is kept until the
   next commit); the best weights so far go to `checkpoint/best-*.safetensors`;
4. rank 0 logs the epoch (the parent's epoch callback; Optuna pruning).

At the end the selected weights are restored, validation and test are
predicted once (test only with `predict_test`), weights are written to
`encoder.safetensors` / `aggregator.safetensors` and rank 0 assembles costs
with every rank's step time, communication time and peak memory. Rank 0 also
writes `attention.h5` (the test slides' attention over all their patches,
`bench.evaluation.heatmaps`) for aggregators with attention (not mean/max).

Randomness: torch is reseeded from (seed, epoch, rank) at every epoch, so a
resumed job continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common.errors import ConfigError, DataError

CHECKPOINT = "checkpoint"


@dataclass
class RankData:
    """What a rank knows about the slides: patch counts, pixels (encoder side), lesion labels (rank 0).

    Attributes:
        counts: slide id -> number of patches at the training magnification.
        pixels: PixelFn (slide id, indices) -> (n, 3, S, S) float tensor; None on rank 0.
        lesions: (slide id) -> (N,) 0/1 instance labels or None (real data), for attention statistics.
        geometry: (slide id) -> `bench.evaluation.heatmaps.SlideGeometry` (coords of the rows of its bag,
            patch size, slide file), rank 0 only: for attention.h5; None writes no attention maps.
        cohort_root: the cohort folder, recorded in attention.h5.
    """

    counts: Mapping[str, int]
    pixels: Callable[[str, np.ndarray], Any] | None
    lesions: Callable[[str], Any] | None = None
    transform: Callable[[Any], Any] | None = None  # applied on the device after the copy (CUDA: uint8 pixels)
    geometry: Callable[[str], Any] | None = None
    cohort_root: str | None = None


@dataclass
class LoopSetup:
    """Everything `train_loop` needs besides the topology."""

    config: Any  # GMAConfig
    config_hash: str
    task: Any
    parts: Mapping[str, Any]  # "train" / "val" / "test" -> bag frames (FoldBags.parts)
    data: RankData
    out_dir: Path
    predict_test: bool = True
    on_epoch: Callable[[int, dict], None] | None = None  # rank 0: the epoch callback or the event log
    heartbeat: Callable[..., None] | None = None
    fault: Mapping[str, Any] | None = None
    enc_group: Any = None  # the encoder ranks' process group (DDP, SyncBatchNorm)


@dataclass
class RankCosts:
    """Per-rank cost counters."""

    steps: int = 0
    step_seconds: float = 0.0
    comm_seconds: float = 0.0
    read_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- models


def build_encoder_side(setup: LoopSetup, topo: Any, device: Any) -> tuple[Any, Any, Any]:
    """(encoder module, EncoderSide, embed dim) for this rank; DDP-wrapped in a distributed job."""
    import torch

    from baselines.encoders import get_encoder
    from e2e.gma.core import EncoderSide, has_batchnorm, set_train_mode

    c = setup.config
    spec = get_encoder(c.encoder)
    if c.input_size != spec.input_size:
        spec = spec.with_input_size(c.input_size)
    model = spec.create_model(c.weights, random_init=c.random_init, seed=c.seed).to(device)
    if c.batchnorm == "sync" and has_batchnorm(model):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=setup.enc_group)
    set_train_mode(model, c.batchnorm)
    wrapped = model
    if topo.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=ids, process_group=setup.enc_group,
                                          forward_sync_buffers=c.batchnorm != "frozen")
    side = EncoderSide(wrapped, setup.data.pixels, device, spec.embed_dim, precision=c.precision, chunk=c.chunk,
                       recompute=c.mode == "chunked" or c.recompute,
                       scale=topo.n_encoders if topo.distributed else 1.0, transform=setup.data.transform)
    return model, side, spec.embed_dim


def build_aggregator_side(setup: LoopSetup, device: Any, in_dim: int) -> tuple[Any, Any]:
    from baselines.mil import build_aggregator
    from e2e.gma.core import AggregatorSide

    c = setup.config
    model = build_aggregator(c.aggregator, in_dim=in_dim, n_outputs=setup.task.n_outputs, seed=c.seed,
                             **dict(c.aggregator_params)).to(device)
    return model, AggregatorSide(model, setup.task, device, c.precision)


# ----------------------------------------------------------------------------- checkpoints


class Checkpoints:
    """The two-sided checkpoint layout (see module docstring)."""

    def __init__(self, out_dir: Path, config_hash: str) -> None:
        self.root = out_dir / CHECKPOINT
        self.config_hash = config_hash

    def _ckpt(self, name: str) -> Any:
        from bench.evaluation.training import Checkpoint

        return Checkpoint(self.root / name, self.config_hash)

    def committed_epoch(self) -> int | None:
        """The last epoch rank 0 committed, or None."""
        import torch

        ck = self._ckpt("aggregator")
        if not ck.exists():
            return None
        state = torch.load(ck.directory / "state.pt", map_location="cpu", weights_only=True)
        if state.get("config_hash") != self.config_hash:
            raise ConfigError(
                f"checkpoint in {ck.directory} belongs to another configuration (config hash "
                f"{state.get('config_hash')} != {self.config_hash}); refusing to resume from it. Delete "
                f"{self.root} or use another run directory")
        return int(state["epoch"])

    def save(self, side: str, epoch: int, module: Any, state: dict[str, Any]) -> None:
        name = "aggregator" if side == "aggregator" else f"encoder-{epoch}"
        self._ckpt(name).save(epoch, {side: module}, state)

    def load(self, side: str, epoch: int, module: Any) -> dict[str, Any]:
        ck = self._ckpt("aggregator" if side == "aggregator" else f"encoder-{epoch}")
        if not ck.exists():
            raise ConfigError(f"checkpoint {ck.directory} is missing although rank 0 committed epoch {epoch}; "
                              f"delete {self.root} to start over")
        state = ck.load({side: module})
        if int(state["epoch"]) != epoch:
            raise ConfigError(f"checkpoint {ck.directory} holds epoch {state['epoch']}, expected {epoch}; "
                              f"delete {self.root} to start over")
        return state

    def prune_encoders(self, keep: int) -> None:
        for d in self.root.glob("encoder-*"):
            if d.name != f"encoder-{keep}":
                shutil.rmtree(d, ignore_errors=True)

    def save_best(self, side: str, epoch: int, state: Mapping[str, Any]) -> None:
        from bench.evaluation.training import save_safetensors

        save_safetensors(self.root / f"best-{side}.safetensors", state, {"epoch": epoch,
                                                                          "config_hash": self.config_hash})

    def load_best(self, side: str, epoch: int | None) -> dict[str, Any] | None:
        import json

        from bench.evaluation.training import load_safetensors

        path = self.root / f"best-{side}.safetensors"
        if epoch is None or not path.exists():
            return None
        weights, meta = load_safetensors(path)
        if meta.get("config_hash") != self.config_hash or int(json.loads(meta.get("epoch", "-1"))) != epoch:
            return None
        return weights


# ----------------------------------------------------------------------------- inference


def predict_bags(topo: Any, frame: Any, data: RankData, enc: Any, agg_model: Any, device: Any, precision: str,
                 heartbeat: Callable[..., None] | None = None, attention: bool = False,
                 heads: list[np.ndarray | None] | None = None) -> tuple[np.ndarray | None, list[np.ndarray]]:
    """Logits (B, C) of every bag of `frame` on rank 0 (None elsewhere), + attention per bag if asked.

    With a list as `heads`, rank 0 appends each bag's per-head attention (H, N) (None for single-head models).

    Every patch of every slide is encoded in chunks without gradients, the
    shares spread over the encoder ranks; rank 0 runs the aggregator on the
    whole bag (all slides of a patient concatenated).
    """
    import torch

    from bench.evaluation.heatmaps import head_rows
    from bench.evaluation.training import autocast
    from e2e.gma.core import all_tiles, encode_all

    if topo.is_encoder:
        enc.raw.eval()
    if topo.is_aggregator:
        agg_model.eval()
    logits, attn = [], []
    for b, slide_ids in enumerate(frame["slide_ids"]):
        counts = [int(data.counts[s]) for s in slide_ids]
        feats = encode_all(topo, all_tiles(slide_ids, counts), enc)  # (N, D) on rank 0
        if topo.is_aggregator:
            with torch.no_grad(), autocast(device, precision):
                out = agg_model(feats.unsqueeze(0).to(device))  # (1, N, D) -> (1, C)
            logits.append(out.logits.float().cpu().numpy()[0])
            if attention:
                attn.append(out.attention.float().cpu().numpy()[0])
            if heads is not None:
                heads.append(head_rows(out.head_attention))
            if heartbeat is not None:
                heartbeat(bag=b)
    if not topo.is_aggregator:
        return None, []
    return np.stack(logits) if logits else np.zeros((0, 0)), attn


# ----------------------------------------------------------------------------- the loop


def _history_row(epoch: int, train_loss: float, metrics: Mapping[str, float], seconds: float, lr: float,
                 note: str | None) -> dict[str, Any]:
    row: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss, "lr": lr, "seconds": seconds}
    row.update({f"val_{k}": v for k, v in metrics.items()})
    if note:
        row["val_note"] = note
    return row


def train_loop(topo: Any, device: Any, setup: LoopSetup) -> dict[str, Any] | None:
    """Train, select, predict; returns the result on rank 0 (None on encoder ranks). See module docstring."""
    import torch

    from bench.evaluation.costs import count_flops, count_parameters, device_name, peak_memory_kind, peak_memory_mb, \
        reset_peak_memory
    from bench.evaluation.training import ModelSelector, check_finite, cosine_schedule, epoch_seed, make_optimizer
    from e2e.gma.core import check_ranks, gma_step, sample_tiles, set_train_mode
    from e2e.gma.launch import inject_fault

    c, task = setup.config, setup.task
    rank = topo.rank
    reset_peak_memory(device)
    wall_start = time.perf_counter()
    from baselines.encoders import get_encoder

    embed_dim = get_encoder(c.encoder).embed_dim
    enc_model = enc = agg_model = agg = None
    if topo.is_encoder:
        enc_model, enc, embed_dim = build_encoder_side(setup, topo, device)
    if topo.is_aggregator:
        agg_model, agg = build_aggregator_side(setup, device, embed_dim)
    if topo.distributed:
        topo.feature_dim = embed_dim
        infos = topo.collect({"rank": rank, "feature_dim": int(embed_dim), "config_hash": setup.config_hash,
                              "host": socket.gethostname(), "device": str(device)})
        check_ranks(infos)
    train = setup.parts["train"]
    val = setup.parts["val"]
    train_targets = task.targets_from_frame(train)
    val_targets = task.targets_from_frame(val) if len(val) else None
    total_steps = max(1, c.epochs * len(train))
    sides: dict[str, tuple[Any, Any, Any]] = {}  # side -> (module, optimizer, scheduler)
    for side, model in (("encoder", enc_model), ("aggregator", agg_model)):
        if model is not None:
            opt = make_optimizer(c.optimizer, [p for p in model.parameters() if p.requires_grad], c.lr,
                                 c.weight_decay)
            sides[side] = (model, opt, cosine_schedule(opt, total_steps))
    selector = ModelSelector(task.primary_metric, task.higher_is_better[task.primary_metric], patience=c.patience)
    ckpts = Checkpoints(setup.out_dir, setup.config_hash)
    history: list[dict[str, Any]] = []
    elapsed_before = 0.0
    start_epoch = 0

    # --- resume: rank 0's committed epoch decides for everyone
    committed = topo.broadcast(ckpts.committed_epoch() if rank == 0 else None)
    if committed is not None:
        for side, (model, opt, sched) in sides.items():
            state = ckpts.load(side, committed, model)
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            selector.load_state_dict(state["selector"])
            best = ckpts.load_best(side, selector.best_epoch)
            if best is not None:
                selector.best_state = {**(selector.best_state or {}), side: best}
            if side == "aggregator":
                history = list(state.get("history", []))
                elapsed_before = float(state.get("train_seconds", 0.0))
        start_epoch = committed + 1

    costs = RankCosts()
    flops = 0
    if topo.is_encoder:
        flops += count_flops(enc.raw, torch.zeros(1, 3, c.input_size, c.input_size, device=device)) * c.tiles
    if topo.is_aggregator:
        flops += count_flops(agg_model, torch.zeros(1, c.tiles, embed_dim, device=device))
    stop = bool(selector.should_stop) if committed is not None else False
    epoch = start_epoch - 1
    for epoch in range(start_epoch, c.epochs):
        if stop:
            break
        t_epoch = time.perf_counter()
        torch.manual_seed(epoch_seed(c.seed, epoch, rank))
        if enc_model is not None:
            set_train_mode(enc_model, c.batchnorm)
        if agg_model is not None:
            agg_model.train()
        order = task.epoch_indices(train_targets, c.seed + epoch)
        plan = [sample_tiles(ids, [int(setup.data.counts[s]) for s in ids], c.tiles, c.seed, epoch, step)
                for step, ids in enumerate(tuple(train.iloc[int(b)]["slide_ids"]) for b in order)]
        read_ahead = enc is not None and c.workers > 0 and not enc.recompute
        loss_sum = 0.0
        for step, b in enumerate(order):
            row = train.iloc[int(b)]
            tiles = plan[step]
            if read_ahead:
                enc.read_next(topo.share(plan[step + 1]) if step + 1 < len(plan) else None)
            inject_fault(setup.fault, rank, epoch, step)
            if topo.distributed:
                topo.where = f"epoch {epoch}, step {step} (bag {row['bag_id']})"
            t0, comm0, read0 = time.perf_counter(), topo.comm_seconds, enc.read_seconds if enc else 0.0
            for _, opt, _ in sides.values():
                opt.zero_grad(set_to_none=True)
            out = gma_step(topo, tiles, train_targets.subset(int(b)), enc, agg)
            if out is not None:
                check_finite(out.loss, "training loss", epoch, step)
                loss_sum += out.loss
            for _, opt, sched in sides.values():
                opt.step()
                sched.step()
            costs.steps += 1
            costs.step_seconds += time.perf_counter() - t0
            costs.comm_seconds += topo.comm_seconds - comm0
            costs.read_seconds += (enc.read_seconds if enc else 0.0) - read0
            if setup.heartbeat is not None:
                setup.heartbeat(epoch=epoch, step=step)
        if topo.distributed:
            topo.where = f"epoch {epoch}, validation"
        metrics: dict[str, float] = {}
        note = None
        if val_targets is not None:
            logits, _ = predict_bags(topo, val, setup.data, enc, agg_model, device, c.precision, setup.heartbeat)
            if rank == 0:
                try:
                    metrics = task.metrics(val_targets, task.scores(logits))
                except DataError as exc:  # e.g. a class missing from a tiny validation split
                    note = str(exc)
        value = topo.broadcast(metrics.get(task.primary_metric, math.nan) if rank == 0 else None)
        improved = selector.update(epoch, float(value) if value is not None else math.nan,
                                   {side: m for side, (m, _, _) in sides.items()})
        seconds = time.perf_counter() - t_epoch
        if rank == 0:
            lr = sides["aggregator"][1].param_groups[0]["lr"]
            history.append(_history_row(epoch, loss_sum / max(1, len(order)), metrics, seconds, lr, note))
        # checkpoint: encoder side first, then rank 0 commits
        elapsed = elapsed_before + time.perf_counter() - wall_start
        for side in ("encoder", "aggregator"):
            if side in sides and (side == "aggregator" or rank <= 1):
                model, opt, sched = sides[side]
                if improved:
                    ckpts.save_best(side, epoch, selector.best_state[side])  # type: ignore[index]
                state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                         "selector": selector.state_dict()}
                if side == "aggregator":
                    state.update(history=history, train_seconds=elapsed)
                    topo.barrier()  # the encoder checkpoint of this epoch is on disk
                ckpts.save(side, epoch, model, state)
            elif side == "aggregator":
                topo.barrier()
        topo.barrier()  # rank 0 committed `epoch`
        if rank <= 1 and "encoder" in sides:
            ckpts.prune_encoders(keep=epoch)
        if rank == 0 and setup.on_epoch is not None:
            setup.on_epoch(epoch, dict(history[-1]))
        stop = selector.should_stop
    train_seconds = elapsed_before + time.perf_counter() - wall_start
    if enc is not None:
        enc.close()

    # --- selected weights, final predictions, weights files
    if selector.best_state is not None:
        selector.restore({side: m for side, (m, _, _) in sides.items()})
    result: dict[str, Any] = {}
    if topo.distributed:
        topo.where = "final validation"
    if val_targets is not None:
        logits, _ = predict_bags(topo, val, setup.data, enc, agg_model, device, c.precision, setup.heartbeat)
        if rank == 0:
            result["val"] = task.prediction_frame(val["bag_id"], val["patient_id"], val_targets, task.scores(logits))
    infer_seconds = math.nan
    if setup.predict_test:
        test = setup.parts["test"]
        if topo.distributed:
            topo.where = "test prediction"
        t0 = time.perf_counter()
        from baselines.train import has_attention_map

        maps = rank == 0 and setup.data.geometry is not None and has_attention_map(agg_model)
        heads: list[np.ndarray | None] | None = [] if maps else None
        logits, attention = predict_bags(topo, test, setup.data, enc, agg_model, device, c.precision,
                                         setup.heartbeat, attention=True, heads=heads)
        n_slides = sum(len(s) for s in test["slide_ids"])
        infer_seconds = (time.perf_counter() - t0) / max(1, n_slides)
        if rank == 0:
            targets = task.targets_from_frame(test)
            result["test"] = task.prediction_frame(test["bag_id"], test["patient_id"], targets, task.scores(logits))
            result["attention"] = summarize_test_attention(test, attention, setup.data)
            if heads is not None:
                why = write_attention_maps(setup.out_dir, test, attention, heads, setup.data, c.aggregator)
                if why:
                    result["attention_maps"] = why
    from bench.evaluation.training import save_safetensors

    meta = {"config_hash": setup.config_hash, "best_epoch": selector.best_epoch}
    if "encoder" in sides and rank <= 1:
        save_safetensors(setup.out_dir / "encoder.safetensors", sides["encoder"][0].state_dict(), meta)
    if "aggregator" in sides:
        save_safetensors(setup.out_dir / "aggregator.safetensors", sides["aggregator"][0].state_dict(), meta)

    mine = {
        "rank": rank, "role": "aggregator+encoder" if (topo.is_aggregator and topo.is_encoder)
        else ("aggregator" if topo.is_aggregator else "encoder"),
        "host": socket.gethostname(), "device": device_name(device), "steps": costs.steps,
        "step_seconds": costs.step_seconds / max(1, costs.steps),
        "comm_seconds": costs.comm_seconds / max(1, costs.steps),
        "comm_share": costs.comm_seconds / costs.step_seconds if costs.step_seconds > 0 else 0.0,
        "read_seconds": costs.read_seconds / max(1, costs.steps),
        "peak_memory_mb": peak_memory_mb(device), "peak_memory_kind": peak_memory_kind(device),
        "params": count_parameters(enc_model).total if enc_model is not None else 0,
        "agg_params": count_parameters(agg_model).total if agg_model is not None else 0,
        "trainable": sum(count_parameters(m).trainable for m in (enc_model, agg_model) if m is not None),
        "flops": int(flops), "pid": os.getpid(),
    }
    ranks = topo.collect(mine)
    if rank != 0:
        return None
    enc_rank = next(r for r in ranks if "encoder" in r["role"])
    result.update(
        history=history, best_epoch=selector.best_epoch, best_value=selector.best_value,
        train_seconds=train_seconds, infer_seconds_per_slide=infer_seconds, ranks=ranks,
        params=enc_rank["params"] + mine["agg_params"],
        trainable_params=enc_rank["trainable"] + (mine["trainable"] if topo.distributed else 0),
        flops=enc_rank["flops"] + (mine["flops"] if topo.distributed else 0),
        peak_memory_mb=max(r["peak_memory_mb"] for r in ranks), peak_memory_kind=mine["peak_memory_kind"],
        device=(f"{topo.world_size} x {mine['device']}" if topo.distributed else mine["device"]),
        last_epoch=epoch,
    )
    return result


def write_attention_maps(out_dir: Path, test: Any, attention: Sequence[np.ndarray],
                         heads: Sequence[np.ndarray | None], data: RankData, aggregator: str) -> str | None:
    """Rank 0: attention.h5 of the test bags (split per slide); returns why it was not written, or None."""
    from bench.common.errors import BenchError, WriteError
    from bench.evaluation.heatmaps import ATTENTION_FILE, bag_attention, write_attention

    assert data.geometry is not None
    try:
        slides = [s for bag_id, ids, a, h in zip(test["bag_id"], test["slide_ids"], attention, heads)
                  for s in bag_attention(str(bag_id), list(ids), a, h, data.geometry)]
        write_attention(Path(out_dir) / ATTENTION_FILE, slides, aggregator=aggregator, paradigm="gma",
                        cohort_root=data.cohort_root)
    except WriteError:
        raise
    except (BenchError, KeyError) as exc:
        return f"not written: {type(exc).__name__}: {exc}"
    return None


def summarize_test_attention(test: Any, attention: Sequence[np.ndarray], data: RankData) -> dict[str, Any]:
    """Attention statistics on the test bags (lesion AUC / MAX-N where the cohort has lesion masks)."""
    from baselines.mil.attention_stats import summarize_attention

    if not attention:
        return {}
    labels: list[Any] = []
    for slide_ids, a in zip(test["slide_ids"], attention):
        per_slide = [data.lesions(s) if data.lesions is not None else None for s in slide_ids]
        if any(p is None for p in per_slide):
            labels.append(None)
            continue
        y = np.concatenate([np.asarray(p) for p in per_slide])
        labels.append(y if y.shape[0] == a.shape[0] else None)
    return summarize_attention(list(attention), labels if any(y is not None for y in labels) else None)
