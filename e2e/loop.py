"""The E2E training loop behind `e2e.train.train_e2e`: models, steps, validation, checkpoints, result.

Randomness: every item of the data path is a function of (seed, epoch, step, bag)
(`e2e.batches`) and torch is reseeded from (seed, epoch) at every epoch (dropout), so
a run is the same on CPU for a fixed seed, with any number of workers, and a resumed
run continues exactly as an uninterrupted one.

The test prediction writes `out_dir/attention.h5` (attention of every test slide at the main scale, over all
its patches; `bench.evaluation.heatmaps`) for aggregators with attention (all but mean/max pooling).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common.errors import DataError
from bench.evaluation.training import EpochCallback, FoldBags, TrainResult


def _attention_stats(part: Any, pred: Any, lesions: Callable[[str], Any] | None) -> dict[str, Any]:
    """summarize_attention over the predicted bags, lesion labels where the cohort has masks."""
    from baselines.mil.attention_stats import summarize_attention

    if not pred.attention:
        return {}
    labels: list[Any] = []
    for pos, a in zip(pred.positions, pred.attention):
        slides = part.iloc[pos]["slide_ids"]
        skipped = {s for s, _ in pred.skipped}
        per = [lesions(s) if lesions is not None else None for s in slides if s not in skipped]
        y = None if not per or any(p is None for p in per) else np.concatenate([np.asarray(p) for p in per])
        labels.append(y if y is not None and y.shape[0] == a.shape[0] else None)
    return summarize_attention(pred.attention, labels if any(y is not None for y in labels) else None)


def write_attention_maps(out_dir: Path, part: Any, pred: Any, source: Any, magnification: float, cohort: Any,
                         aggregator: str, paradigm: str = "e2e") -> str | None:
    """attention.h5 of the predicted test bags (split per slide); returns why it was not written, or None.

    The attention of a bag runs over the patches of its slides at `magnification` (every row of the source's
    coords), concatenated in bag order (`PartPrediction.slides`).
    """
    from bench.common.errors import BenchError, WriteError
    from bench.evaluation.heatmaps import ATTENTION_FILE, SlideGeometry, bag_attention, write_attention

    def geometry(slide: str) -> SlideGeometry:
        size = int(source.patch_size_level0(slide, magnification))  # LiveSource and PackedSource have it
        path = mpp = None
        try:
            path, mpp = str(cohort.slide_path(slide)), cohort.slide_mpp(slide)
        except (AttributeError, DataError):
            pass
        return SlideGeometry(np.asarray(source.coords(slide, magnification)), size, float(magnification), path, mpp)

    heads = pred.heads or [None] * len(pred.attention)
    try:
        slides = [s for pos, ids, a, h in zip(pred.positions, pred.slides, pred.attention, heads)
                  for s in bag_attention(str(part.iloc[pos]["bag_id"]), ids, a, h, geometry)]
        root = getattr(cohort, "root", None)
        write_attention(Path(out_dir) / ATTENTION_FILE, slides, aggregator=aggregator, paradigm=paradigm,
                        cohort_root=None if root is None else str(Path(root).resolve()))
    except WriteError:
        raise
    except (BenchError, AttributeError, KeyError) as exc:
        return f"not written: {type(exc).__name__}: {exc}"
    return None


def _val_row(task: Any, part: Any, pred: Any, lesions: Any) -> tuple[dict[str, Any], str | None]:
    row: dict[str, Any] = {}
    note = None
    if pred.frame is None:
        return row, "no validation bag could be read"
    targets, scores = task.targets_and_scores_from_frame(pred.frame)
    try:
        row.update({f"val_{k}": v for k, v in task.metrics(targets, scores).items()})
    except DataError as exc:  # e.g. one class only in a tiny validation split
        note = str(exc)
    row["val_loss"] = pred.loss
    stats = _attention_stats(part, pred, lesions)
    row.update({f"val_{k}": stats.get(k) for k in ("sparsity", "max_n_all", "max_n", "attention_auc")})
    if pred.skipped:
        row["val_skipped"] = len(pred.skipped)
    return row, note


def _fixed_inference(c: Any, encoder: torch.nn.Module, aggregator: torch.nn.Module, device: torch.device,
                     precision: str, predict_test: bool) -> dict[str, Any]:
    """The paper's fixed inference benchmark (10,000 patches of 224 px), or why it was not run."""
    from e2e.inference import FIXED_PATCHES, fixed_inference_benchmark

    wanted = c.fixed_benchmark if c.fixed_benchmark is not None else device.type == "cuda"
    if not predict_test:
        return {"measured": False, "reason": "sweep trial (no test predictions): not run"}
    if not wanted:
        why = ("fixed_benchmark = false" if c.fixed_benchmark is False else
               f"not run on {device.type} by default ({FIXED_PATCHES:,} patches at 224 px take minutes on a CPU); "
               "set fixed_benchmark = true, or run benchmarks/bench_e2e.py --fixed-inference")
        return {"measured": False, "reason": why}
    out = fixed_inference_benchmark(encoder, aggregator, chunk=c.infer_chunk, device=device, precision=precision)
    return {"measured": True, **out}


def run_training(bags: FoldBags, cohort: Any, tiles_dirs: Mapping[float, Path], config: Any, out_dir: Path, *,
                 source: Any, counts: Mapping[str, Mapping[float, int]], epoch_callback: EpochCallback | None,
                 predict_test: bool, pack_skipped: list, select_note: Any) -> TrainResult:
    from baselines.encoders import build_encoder
    from baselines.mil import build_aggregator
    from baselines.train import has_attention_map
    from bench.evaluation.costs import Costs, PeakMemory, count_parameters, device_name
    from bench.evaluation.training import (
        CHECKPOINT_DIR, Checkpoint, ModelSelector, autocast, check_finite, cosine_schedule, make_optimizer, resolve_device,
        save_safetensors, seed_everything,
    )
    from e2e.batches import EpochOrder, StepData, make_loader
    from e2e.inference import predict_part, step_flops
    from e2e.sampling import MRISampler
    from bench.evaluation.training import epoch_seed
    from e2e.forward import batchnorm_buffers, encoder_forward, set_encoder_mode
    from e2e.inference import FLOPS_SAMPLES
    from e2e.patches import coords_dir

    c = config
    task = bags.task
    device = resolve_device(c.device)
    cuda = device.type == "cuda"
    precision = c.precision if cuda else "fp32"
    seed_everything(c.seed)
    chash = c.result_hash(bags)

    # --- models
    loaded = build_encoder(c.encoder, c.weights, random_init=c.random_init, seed=c.seed, trainable=True,
                           input_size=c.input_size)
    encoder = loaded.model.to(device)
    if cuda:
        encoder = encoder.to(memory_format=torch.channels_last)
    aggregator = build_aggregator(c.aggregator, in_dim=int(loaded.spec.embed_dim), n_outputs=task.n_outputs,
                                  seed=c.seed, **dict(c.aggregator_params)).to(device)
    modules = {"encoder": encoder, "aggregator": aggregator}
    aux_weight = float(getattr(aggregator, "aux_weight", 0.0))
    categorical = getattr(task, "kind", "") != "survival"

    # --- data
    train = bags.parts["train"]
    val = bags.parts["val"]
    train_targets = task.targets_from_frame(train)
    order = EpochOrder(task, train_targets, c.seed)
    steps_per_epoch = max(1, math.ceil(len(order(0)) / c.slides_per_step))
    sampler = MRISampler(c.sampling_scales, c.samples, c.seed)
    data = StepData(source, list(train["bag_id"]), list(train["slide_ids"]), counts, order, sampler,
                    c.slides_per_step, steps_per_epoch, c.epochs, c.input_size, loaded.spec.mean, loaded.spec.std,
                    c.augment, loaded.transform, c.seed)
    lesions = None  # slide id -> lesion labels of its main-scale patches (synthetic cohorts)
    if getattr(cohort, "has_masks", False):
        lesions = cohort.lesion_labeler(coords_dir(tiles_dirs, c.magnification))

    # --- optimisation state, resume
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    optimizer = make_optimizer(c.optimizer, params, c.lr, c.weight_decay)
    scheduler = cosine_schedule(optimizer, c.epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and precision == "fp16")
    selector = ModelSelector(task.primary_metric, task.higher_is_better[task.primary_metric], patience=c.patience)
    ckpt = Checkpoint(out_dir / CHECKPOINT_DIR, chash)
    history: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    start_epoch, elapsed_before = 0, 0.0
    if ckpt.exists():
        state = ckpt.load(modules)  # refuses another configuration
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        selector.load_state_dict(state["selector"])
        selector.best_state = state.get("best") or None
        history, skipped = list(state["history"]), list(state["skipped"])
        elapsed_before = float(state["train_seconds"])
        start_epoch = int(state["epoch"]) + 1

    # train-mode BatchNorm: the checkpointed recomputation updates the running statistics a second time
    bn = batchnorm_buffers(encoder) if c.checkpointing and c.bn == "train" else []
    loader, epochs = make_loader(data, c.workers, pin_memory=cuda)
    wall = time.perf_counter()
    stop = selector.should_stop
    with PeakMemory(device) as peak:
        try:
            for epoch in range(start_epoch, c.epochs):
                if stop:
                    break
                t_epoch = time.perf_counter()
                torch.manual_seed(epoch_seed(c.seed, epoch))
                set_encoder_mode(encoder, c.bn)  # frozen BatchNorm stays in eval mode
                aggregator.train()
                epochs.set_epoch(epoch)
                loss_sum, n_bags, n_steps, n_skipped = 0.0, 0, 0, 0
                for item in loader:
                    step = int(item["step"])
                    for b in item["bags"]:
                        for slide, reason in b["skipped"]:
                            skipped.append({"epoch": epoch, "step": step, "slide": slide, "reason": reason})
                            n_skipped += 1
                    ready = [b for b in item["bags"] if b["x"] is not None]
                    if not ready:
                        continue  # every bag of the step unreadable: no update (counted above)
                    optimizer.zero_grad(set_to_none=True)
                    for b in ready:
                        x = b["x"].to(device, non_blocking=True)  # (n, 3, S, S)
                        if cuda:
                            x = x.contiguous(memory_format=torch.channels_last)
                        target = train_targets.subset([int(b["position"])]).to_torch(device)
                        with autocast(device, precision):
                            feats = encoder_forward(encoder, x, c.checkpointing, bn=c.bn,
                                                   chunk=c.checkpoint_chunk)  # (n, D)
                        saved = [t.clone() for t in bn]  # BatchNorm buffers after this forward
                        out = aggregator(feats.float().unsqueeze(0), label=target.label if categorical else None)
                        loss = task.loss(out.logits.float(), target)  # (1, C) -> scalar
                        if out.aux_loss is not None:
                            loss = (1 - aux_weight) * loss + aux_weight * out.aux_loss
                        check_finite(loss, "training loss", epoch, step)
                        scaler.scale(loss / len(ready)).backward()
                        for t, s in zip(bn, saved):  # the recomputation updated them a second time
                            t.copy_(s)
                        loss_sum += float(loss.detach())
                        n_bags += 1
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    n_steps += 1
                lr = optimizer.param_groups[0]["lr"]
                row: dict[str, Any] = {"epoch": epoch, "train_loss": loss_sum / n_bags if n_bags else math.nan,
                                       "lr": lr, "steps": n_steps, "skipped": n_skipped}
                note = None
                value = math.nan
                if len(val):
                    pred = predict_part(encoder, aggregator, loaded.transform, val, task, source, c.magnification,
                                        chunk=c.infer_chunk, device=device, precision=precision)
                    val_row, note = _val_row(task, val, pred, lesions)
                    row.update(val_row)
                    got = row.get(f"val_{task.primary_metric}")
                    value = float(got) if got is not None else math.nan
                if note:
                    row["val_note"] = note
                row["seconds"] = time.perf_counter() - t_epoch
                selector.update(epoch, value, modules)
                history.append(row)
                elapsed = elapsed_before + time.perf_counter() - wall
                ckpt.save(epoch, modules, {
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "selector": selector.state_dict(), "best": selector.best_state,
                    "history": history, "skipped": skipped, "train_seconds": elapsed,
                })
                if epoch_callback is not None:
                    epoch_callback(epoch, dict(row))
                stop = selector.should_stop
        finally:
            del loader  # shuts the persistent workers down, also on errors
    train_seconds = elapsed_before + time.perf_counter() - wall
    epochs_run = len(history)

    # --- selected weights, predictions once, costs
    selector.restore(modules)
    meta = {"config_hash": chash, "best_epoch": selector.best_epoch}
    weights = {name: save_safetensors(out_dir / f"{name}.safetensors", m.state_dict(), meta)
               for name, m in modules.items()}
    predictions: dict[str, Any] = {}
    # "skipped_reads", not "skipped_slides": the runner records the slides its stages skipped under that name
    extra: dict[str, Any] = {"skipped_reads": skipped, "n_skipped_reads": len(skipped),
                             "steps_per_epoch": steps_per_epoch,
                             "scales": [[m, n] for (m, _), n in zip(sampler.scales, sampler.counts)],
                             "source": c.source, "selection": select_note(len(val) > 0, selector.best_epoch,
                                                                          epochs_run)}
    if pack_skipped:
        extra["pack_skipped"] = [list(s) for s in pack_skipped]
    if len(val):
        pred = predict_part(encoder, aggregator, loaded.transform, val, task, source, c.magnification,
                            chunk=c.infer_chunk, device=device, precision=precision)
        if pred.frame is not None:
            predictions["val"] = pred.frame
        infer, attention = pred.seconds_per_slide, _attention_stats(val, pred, lesions)
        attention = {**attention, "split": "val"} if attention else {}
    else:
        infer, attention = math.nan, {}
    if predict_test:
        test = bags.parts["test"]
        maps = has_attention_map(aggregator)
        pred = predict_part(encoder, aggregator, loaded.transform, test, task, source, c.magnification,
                            chunk=c.infer_chunk, device=device, precision=precision, keep_heads=maps)
        if pred.frame is not None:
            predictions["test"] = pred.frame
        if maps and pred.positions:
            why = write_attention_maps(out_dir, test, pred, source, c.magnification, cohort, c.aggregator)
            if why:
                extra["attention_maps"] = why
        infer = pred.seconds_per_slide
        attention = {**_attention_stats(test, pred, lesions), "split": "test"}
        if pred.skipped:
            extra["test_skipped"] = [list(s) for s in pred.skipped]
    n_enc, n_agg = count_parameters(encoder), count_parameters(aggregator)
    costs = Costs(train_seconds=train_seconds, infer_seconds_per_slide=infer, peak_memory_mb=float(peak.mb),
                  params=n_enc.total + n_agg.total, trainable_params=n_enc.trainable + n_agg.trainable,
                  flops=step_flops(encoder, aggregator, FLOPS_SAMPLES, c.input_size), device=device_name(device),
                  peak_memory_kind=peak.kind)
    extra["flops_reference"] = {"samples": FLOPS_SAMPLES, "input_size": c.input_size}
    extra["fixed_inference"] = _fixed_inference(c, encoder, aggregator, device, precision, predict_test)
    return TrainResult(predictions=predictions, history=history, best_epoch=selector.best_epoch,
                       best_value=selector.best_value, weights=weights, costs=costs.to_dict(), attention=attention,
                       params=c.to_dict(), extra=extra)


__all__ = ["run_training", "write_attention_maps"]
