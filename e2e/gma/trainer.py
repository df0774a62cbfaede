"""GMA: end-to-end training on whole slides with gather/scatter over many processes.

The GMA paper (Campanella et al., "Beyond Multiple Instance Learning", section 2
and listing 1): rank 0 runs the aggregator, ranks 1..N the encoder under DDP;
per step and bag, K tiles are split across the encoder ranks, their features
gathered to rank 0, the feature gradient scattered back (see `e2e.gma.core`).

    config = GMAConfig(encoder="resnet18-trunc", tiles=256, nproc=3)
    result = train_gma(bags, cohort, {20.0: tiles_dir}, config, out_dir)

Modes:

- ``distributed`` (default): `train_gma` writes a job file into
  `out_dir/gma/` and starts ``python -m torch.distributed.run --standalone
  --nproc-per-node <nproc> -m e2e.gma --job <file>`` (gloo on CPU, NCCL on
  GPUs, one GPU per rank); it streams the ranks' output, calls the epoch
  callback as rank 0 logs epochs, and reads back what rank 0 wrote. Several
  nodes: run torchrun yourself on every node with the same job file on a
  shared filesystem (README, "GMA on several nodes").
- ``chunked``: the same computation in this process on one device, the K tiles
  encoded in chunks of `chunk` and re-encoded with gradients (beyond the paper).

`python -m e2e.gma --job FILE` is the rank entry point; `--config FILE.toml`
builds the job from a cohort folder, a split file and trainer parameters
(multi-node runs without the harness's runner).

Departures from the paper: tiles of a patient bag (survival) are spread over
its slides in proportion to their patch counts (K per bag, not per slide);
BatchNorm is frozen by default (SyncBatchNorm on request, CUDA only); the
optimiser, schedule and selection are the harness's (cosine schedule,
validation-only model selection); features travel in fp32 under bf16 autocast.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.common.errors import ConfigError, DataError
from bench.evaluation.training import EpochCallback, FoldBags, TrainResult
from e2e.gma.config import (JOB_FOLDER, GMAConfig, bags_from_dict, bags_to_dict, cohort_from_dict,
                            cohort_to_dict)
# ----------------------------------------------------------------------------- data


def open_rank_data(config: GMAConfig, cohort: Any, tiles_dirs: Mapping[float, Path], slide_ids: list[str], *,
                   pixels: bool, lesions: bool, device: Any = None) -> tuple[Any, Any]:
    """(RankData, source) for the slides: patch counts; pixels for encoder roles; lesion labels and the
    patch geometry of attention maps for rank 0 (`lesions`).

    On CUDA the pixels travel as uint8 (4x fewer bytes) and are normalised on the
    GPU (`RankData.transform`); on CPU the reader normalises them, in the
    read-ahead thread when there is one.

    Raises:
        DataError: a slide with zero patches (before any training starts).
    """
    import torch

    from e2e.gma.loop import RankData
    from e2e.patches import coords_dir, open_source

    mag = float(config.magnification)
    tiles_dir = coords_dir(tiles_dirs, mag)
    source = open_source(config.source, cohort, {mag: tiles_dir})
    try:
        counts = {s: int(source.n_patches(s, mag)) for s in dict.fromkeys(slide_ids)}
    except BaseException:
        source.close()
        raise
    empty = [s for s, n in counts.items() if n <= 0]
    if empty:
        source.close()
        raise DataError(f"{len(empty)} slide(s) have no tissue patches at {mag:g}x ({tiles_dir}): "
                        f"{', '.join(empty[:5])}; a GMA step needs at least one patch per slide. Re-tile them "
                        "with a lower tissue threshold or leave them out of the cohort")
    pixel_fn, on_device = None, None
    if pixels:
        from baselines.encoders import get_encoder

        spec = get_encoder(config.encoder)
        if config.input_size != spec.input_size:
            spec = spec.with_input_size(config.input_size)
        transform = spec.transform()
        if device is not None and torch.device(device).type == "cuda":
            on_device = transform

            def pixel_fn(slide_id: str, indices: Any) -> Any:
                return torch.from_numpy(source.read(slide_id, mag, indices)).pin_memory()  # (n, P, P, 3) uint8
        else:
            def pixel_fn(slide_id: str, indices: Any) -> Any:
                return transform(source.read(slide_id, mag, indices))  # (n, P, P, 3) uint8 -> (n, 3, S, S)

    lesion_fn = None
    if lesions and getattr(cohort, "has_masks", False):
        labeler = cohort.lesion_labeler(tiles_dir)

        def lesion_fn(slide_id: str) -> Any:
            return labeler(slide_id, source.coords(slide_id, mag))

    geometry_fn, cohort_root = None, None
    if lesions:  # rank 0 (or the chunked mode's one process): what attention.h5 records per slide
        from bench.evaluation.heatmaps import SlideGeometry

        root = getattr(cohort, "root", None)
        cohort_root = None if root is None else str(Path(root).resolve())

        def geometry_fn(slide_id: str) -> Any:
            path = mpp = None
            try:
                path, mpp = str(cohort.slide_path(slide_id)), cohort.slide_mpp(slide_id)
            except (AttributeError, DataError):
                pass
            return SlideGeometry(source.coords(slide_id, mag), int(source.patch_size_level0(slide_id, mag)), mag,
                                 path, mpp)

    return RankData(counts=counts, pixels=pixel_fn, lesions=lesion_fn, transform=on_device,
                    geometry=geometry_fn, cohort_root=cohort_root), source


# ----------------------------------------------------------------------------- train_gma


def train_gma(bags: FoldBags, cohort: Any, tiles_dirs: Mapping[float, Path], config: GMAConfig, out_dir: Path, *,
              epoch_callback: EpochCallback | None = None, predict_test: bool = True,
              fault: Mapping[str, Any] | None = None, echo: bool = True) -> TrainResult:
    """Train encoder + aggregator end to end with gather/scatter (see the module docstring).

    Bad input (zero-patch slides, missing coords, a bad config) is refused here,
    before any process starts. A resumable checkpoint is written every epoch in
    `out_dir/checkpoint/`; calling again with the same arguments resumes.

    Args:
        fault: test hook, {"rank", "epoch", "step", "kind": "kill" | "hang" | "raise"}.
        echo: forward the ranks' output to stderr (distributed mode).

    Raises:
        ConfigError / DataError / SlideError / MissingFileError: bad input.
        TrainingError: a rank failed, died or hung (within `timeout_s`), or the loss became NaN.
    """
    from e2e.gma.loop import LoopSetup, train_loop

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_models(config, bags)
    parts = {p: df for p, df in bags.parts.items() if p != "test" or predict_test}
    slide_ids = [s for df in parts.values() for ids in df["slide_ids"] for s in ids]
    chash = config.result_hash(bags)

    if config.mode == "chunked":
        from bench.evaluation.training import resolve_device
        from e2e.gma.core import LocalTopology

        device = resolve_device(config.device)
        data, source = open_rank_data(config, cohort, tiles_dirs, slide_ids, pixels=True, lesions=True,
                                      device=device)
        try:
            setup = LoopSetup(config=config, config_hash=chash, task=bags.task, parts=bags.parts, data=data,
                              out_dir=out_dir, predict_test=predict_test, on_epoch=epoch_callback, fault=fault)
            raw = train_loop(LocalTopology(), device, setup)
        finally:
            source.close()
        assert raw is not None
        return _train_result(raw, config, out_dir)

    # distributed: pre-check the data here (fast, clear errors), then launch
    data, source = open_rank_data(config, cohort, tiles_dirs, slide_ids, pixels=False, lesions=False)
    source.close()
    folder = out_dir / JOB_FOLDER
    # paths as given: run_job makes every path of the job (launch.JOB_PATHS) absolute when it writes the file
    job = {"kind": "train", "config": config.to_dict(), "config_hash": chash, "bags": bags_to_dict(bags),
           "cohort": cohort_to_dict(cohort), "tiles_dirs": {str(float(m)): str(p) for m, p in tiles_dirs.items()},
           "out": str(out_dir), "folder": str(folder), "predict_test": bool(predict_test),
           "fault": dict(fault) if fault else None}

    def on_event(event: dict) -> None:
        if event.get("event") == "epoch" and epoch_callback is not None:
            epoch_callback(int(event["epoch"]), dict(event["values"]))

    from e2e.gma.launch import run_job

    (folder / "result.json").unlink(missing_ok=True)
    run_job(job, folder, config.nproc, timeout_s=config.timeout_s, on_event=on_event, echo=echo)
    return _train_result(read_result(folder), config, out_dir)


def _check_models(config: GMAConfig, bags: FoldBags) -> None:
    """Unknown encoder/aggregator names and bad aggregator parameters fail here, not on the ranks."""
    from baselines.encoders import get_encoder
    from baselines.mil import AGGREGATORS

    get_encoder(config.encoder)
    spec = AGGREGATORS.get(config.aggregator)
    unknown = sorted(set(config.aggregator_params) - set(spec.defaults))
    if unknown:
        raise ConfigError(f"unknown parameter {unknown[0]!r} for aggregator {config.aggregator!r}; valid: "
                          f"{', '.join(spec.defaults)}")
    import torch

    cuda = config.device != "cpu" and torch.cuda.is_available()
    if config.batchnorm == "sync" and not cuda:
        raise ConfigError("GMA batchnorm='sync' uses SyncBatchNorm, which runs on CUDA only; use "
                          "batchnorm='frozen' on CPU")
    if config.mode == "distributed" and cuda and config.nproc > torch.cuda.device_count():
        raise ConfigError(f"GMA nproc={config.nproc} needs one GPU per process, but this machine has "
                          f"{torch.cuda.device_count()}; lower nproc, or run torchrun on several nodes (README)")
    if bags.parts["train"].empty:
        raise DataError("GMA needs at least one training bag")


def write_result(folder: Path, raw: Mapping[str, Any]) -> None:
    """Rank 0's result: predictions as CSV, the rest as JSON (read back by `read_result`)."""
    from bench.common.files import atomic_path, write_text_atomic

    for part in ("val", "test"):
        if part in raw:
            with atomic_path(folder / f"predictions-{part}.csv") as tmp:
                raw[part].to_csv(tmp, index=False)
    rest = {k: v for k, v in raw.items() if k not in ("val", "test")}
    rest["parts"] = [p for p in ("val", "test") if p in raw]
    # NaN allowed (read back by json.loads in `read_result`): infer_seconds_per_slide is NaN without a
    # test prediction (predict_test=False), and a metric can be NaN
    write_text_atomic(folder / "result.json", json.dumps(rest, indent=2) + "\n")


def read_result(folder: Path) -> dict[str, Any]:
    import pandas as pd

    path = folder / "result.json"
    if not path.exists():
        raise DataError(f"the GMA job ended without writing {path}; see its output above")
    raw = json.loads(path.read_text(encoding="utf-8"))
    for part in raw.pop("parts", []):
        raw[part] = pd.read_csv(folder / f"predictions-{part}.csv", dtype={"bag_id": str, "patient_id": str})
    return raw


def _train_result(raw: Mapping[str, Any], config: GMAConfig, out_dir: Path) -> TrainResult:
    from bench.evaluation.costs import Costs, software_versions

    costs = Costs(train_seconds=float(raw["train_seconds"]),
                  infer_seconds_per_slide=float(raw["infer_seconds_per_slide"])
                  if raw.get("infer_seconds_per_slide") is not None else math.nan,
                  peak_memory_mb=float(raw["peak_memory_mb"]), params=int(raw["params"]),
                  flops=int(raw["flops"]) if raw.get("flops") else None, device=str(raw["device"]),
                  trainable_params=int(raw["trainable_params"]), peak_memory_kind=str(raw["peak_memory_kind"]))
    predictions = {p: raw[p] for p in ("val", "test") if p in raw}
    return TrainResult(
        predictions=predictions, history=list(raw["history"]), best_epoch=raw.get("best_epoch"),
        best_value=raw.get("best_value"),
        weights={"encoder": out_dir / "encoder.safetensors", "aggregator": out_dir / "aggregator.safetensors"},
        costs=costs.to_dict(), attention=dict(raw.get("attention") or {}), params=config.to_dict(),
        extra={"ranks": raw["ranks"], "mode": config.mode, "world_size": len(raw["ranks"]),
               "tiles_per_step": config.tiles, "last_epoch": raw.get("last_epoch"), "versions": software_versions(),
               **({"attention_maps": raw["attention_maps"]} if raw.get("attention_maps") else {})})


# ----------------------------------------------------------------------------- one rank of a train job


def run_train_rank(job: Mapping[str, Any]) -> None:
    """One rank of a training job (called under torchrun by `main`)."""
    import torch.distributed as dist

    from e2e.gma.core import DistTopology
    from e2e.gma.launch import EventLog, ensure_launcher, init_distributed, progress_file
    from e2e.gma.loop import LoopSetup, train_loop

    config = GMAConfig.from_dict(job["config"])
    device, _ = init_distributed(config.backend, config.timeout_s, config.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != config.nproc:
        raise ConfigError(f"the job was written for nproc={config.nproc} processes but torchrun started {world}; "
                          f"use --nproc-per-node {config.nproc} (times nodes)")
    enc_group = dist.new_group(ranks=list(range(1, world)))
    folder = Path(job["folder"])
    events = EventLog(folder / "events.jsonl" if rank == 0 else None)
    if rank == 0:
        events.write("started", world=world)
    bags = bags_from_dict(job["bags"])
    cohort = cohort_from_dict(job["cohort"])
    tiles_dirs = {float(m): Path(p) for m, p in job["tiles_dirs"].items()}
    parts = {p: df for p, df in bags.parts.items() if p != "test" or job["predict_test"]}
    slide_ids = [s for df in parts.values() for ids in df["slide_ids"] for s in ids]
    data, source = open_rank_data(config, cohort, tiles_dirs, slide_ids, pixels=rank > 0, lesions=rank == 0,
                                  device=device)

    # every step, bag and epoch: stop (LauncherGone, nothing written) when the launcher is gone; the
    # watchdog thread (start_watchdog) catches it between these calls, e.g. before the weights files
    def heartbeat(**values: Any) -> None:
        ensure_launcher(job)
        if rank == 0:
            events.heartbeat(**values)

    def on_epoch(epoch: int, values: dict) -> None:
        ensure_launcher(job)
        events.write("epoch", epoch=epoch, values=values)

    try:
        setup = LoopSetup(config=config, config_hash=job["config_hash"], task=bags.task, parts=bags.parts, data=data,
                          out_dir=Path(job["out"]), predict_test=bool(job["predict_test"]),
                          on_epoch=on_epoch if rank == 0 else None, heartbeat=heartbeat, fault=job.get("fault"),
                          enc_group=enc_group)
        topo = DistTopology(device, 0)
        topo.progress_path = progress_file(folder, rank)
        raw = train_loop(topo, device, setup)
        if rank == 0:
            assert raw is not None
            ensure_launcher(job, check_job_file=True)  # a later launch may have taken the folder over
            write_result(folder, raw)
            events.write("done")
        dist.barrier()
    finally:
        source.close()
    dist.destroy_process_group()
