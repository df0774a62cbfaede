"""GMA: end-to-end training on whole slides with gather/scatter over many processes.

The GMA paper (Campanella et al., "Beyond Multiple Instance Learning", section 2
and listing 1): rank 0 runs the aggregator, ranks 1..N the encoder under DDP;
per step and bag, K tiles are split across the encoder ranks, their features
gathered to rank 0, the feature gradient scattered back (see `e2e.gma_core`).

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

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from bench.checks import check_choice, check_int, check_positive
from bench.errors import BenchError, ConfigError, DataError
from bench.training import EpochCallback, FoldBags, TrainResult

JOB_FOLDER = "gma"
MODES = ("distributed", "chunked")
BATCHNORM = ("frozen", "sync")
PRECISIONS = ("fp32", "bf16")
BACKENDS = ("auto", "gloo", "nccl")
PARAM_KEYS = ("optimizer", "lr", "weight_decay", "epochs", "tiles", "nproc", "mode", "chunk", "recompute", "batchnorm",
              "precision", "backend", "timeout_s", "workers", "patience", "source")
# fields that change how a job runs but not its numbers: a checkpoint survives a change of them
_RUN_ONLY = ("timeout_s", "workers", "device", "backend")


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    return check_int(f"GMA {name}", value, minimum)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    return check_choice(f"GMA {name}", value, choices)


@dataclass(frozen=True)
class GMAConfig:
    """Settings of one GMA run (validated on construction; `to_dict` goes into the run record).

    Attributes:
        encoder / aggregator / aggregator_params / weights / random_init: the models.
        optimizer, lr, weight_decay, epochs: both sides use the same optimiser settings.
        tiles: K, tiles per bag per step (a patient bag spreads them over its slides).
        nproc: world size, 1 aggregator rank + N encoder ranks (distributed mode).
        mode: "distributed" (torchrun) or "chunked" (one device; `nproc` unused).
        chunk: tiles per encoder forward in chunked mode, when re-encoding shares
            (`recompute`) and at inference.
        recompute: distributed mode: each encoder rank encodes its share in chunks
            without activations and re-encodes it with gradients (memory flat in K,
            one extra forward; the paper keeps the share's activations).
        batchnorm: "frozen" (running statistics, a per-tile map: exact equivalence)
            or "sync" (SyncBatchNorm over the encoder ranks: statistics of all K
            tiles as on one device; CUDA, distributed, no recompute).
        precision: "bf16" autocast on CUDA or "fp32" (CPU always runs fp32).
        backend: "auto" (NCCL on GPUs, gloo on CPU), "gloo" or "nccl".
        timeout_s: a collective waiting longer than this fails (dead or hung rank);
            must exceed the longest step and a slide's inference on one rank.
        workers: > 0: each encoder rank reads the next step's share in a background
            thread while it computes the current step (one reader thread; distributed
            mode without recompute); 0: the training thread reads.
        patience: early stopping on the validation metric (None: off).
        source: patch source, "live" (OpenSlide) or "packed" (JPEG store), see `e2e.patches`.
    """

    encoder: str
    aggregator: str = "gma"
    aggregator_params: Mapping[str, Any] = field(default_factory=dict)
    weights: str | None = None
    random_init: bool = False
    optimizer: str = "adamw"
    lr: float = 5e-5
    weight_decay: float = 0.0
    epochs: int = 30
    tiles: int = 2048
    nproc: int = 3
    mode: str = "distributed"
    chunk: int = 64
    recompute: bool = False
    batchnorm: str = "frozen"
    magnification: float = 20.0
    patch_size: int = 256
    input_size: int = 224
    precision: str = "bf16"
    backend: str = "auto"
    timeout_s: float = 300.0
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    patience: int | None = None
    source: str = "live"

    def __post_init__(self) -> None:
        if not isinstance(self.encoder, str) or not self.encoder:
            raise ConfigError(f"GMA encoder must be a registered encoder name, got {self.encoder!r}")
        if not isinstance(self.aggregator_params, Mapping):
            raise ConfigError(f"GMA aggregator_params must be a table, got {self.aggregator_params!r}")
        object.__setattr__(self, "aggregator_params", MappingProxyType(dict(self.aggregator_params)))
        for key in ("epochs", "tiles", "nproc", "chunk", "patch_size", "input_size"):
            _positive_int(key, getattr(self, key))
        _positive_int("workers", self.workers, 0)
        _positive_int("seed", self.seed, 0)
        if self.patience is not None:
            _positive_int("patience", self.patience)
        _choice("mode", self.mode, MODES)
        _choice("batchnorm", self.batchnorm, BATCHNORM)
        _choice("backend", self.backend, BACKENDS)
        if self.precision == "fp16":
            raise ConfigError("GMA precision 'fp16' is not supported (it needs a loss scaler shared by the aggregator "
                              "and encoder ranks); use 'bf16' or 'fp32'")
        _choice("precision", self.precision, PRECISIONS)
        if not isinstance(self.recompute, bool) or not isinstance(self.random_init, bool):
            raise ConfigError(f"GMA recompute and random_init must be true or false, got {self.recompute!r}, "
                              f"{self.random_init!r}")
        for key in ("lr", "timeout_s", "magnification"):
            check_positive(f"GMA {key}", getattr(self, key))
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, (int, float)) \
                or not self.weight_decay >= 0:
            raise ConfigError(f"GMA weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.mode == "distributed":
            if self.nproc < 2:
                raise ConfigError(f"GMA distributed mode needs a world size >= 2 (1 aggregator + N >= 1 encoder "
                                  f"ranks), got nproc={self.nproc}; use nproc >= 3, or mode='chunked' on one device")
            if self.tiles < self.nproc - 1:
                raise ConfigError(f"GMA tiles (K={self.tiles}) must be at least the number of encoder ranks "
                                  f"({self.nproc - 1}) so that every rank encodes a tile per step")
        if self.batchnorm == "sync" and (self.mode == "chunked" or self.recompute):
            raise ConfigError("GMA batchnorm='sync' computes statistics over all K tiles of a step, but chunked "
                              "mode and recompute encode chunk by chunk (statistics per chunk, not equivalent); "
                              "use batchnorm='frozen'")

    @classmethod
    def from_params(cls, encoder: str, aggregator: str, params: Mapping[str, Any], *, tiling: Any,
                    aggregator_params: Mapping[str, Any] | None = None, weights: str | None = None,
                    random_init: bool = False, seed: int = 0, device: str = "auto") -> GMAConfig:
        """From a suite's trainer parameters ([defaults.gma] + the method's params) and its e2e tiling.

        GMA trains at the tiling's main magnification (`tiling.scales`, the E2E
        multi-scale sampling, does not apply). nproc 1 without a mode means chunked mode.
        """
        import difflib

        unknown = [k for k in params if k not in PARAM_KEYS]
        if unknown:
            close = difflib.get_close_matches(unknown[0], PARAM_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown GMA parameter {unknown[0]!r}{hint}; known: {', '.join(PARAM_KEYS)}")
        values = dict(params)
        if "mode" not in values and values.get("nproc") == 1:
            values["mode"] = "chunked"
        return cls(encoder=encoder, aggregator=aggregator, aggregator_params=dict(aggregator_params or {}),
                   weights=weights, random_init=random_init, seed=seed, device=device,
                   magnification=float(tiling.magnification), patch_size=int(tiling.patch_size),
                   input_size=int(tiling.input_size), **values)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["aggregator_params"] = dict(self.aggregator_params)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> GMAConfig:
        return cls(**dict(values))

    def result_hash(self, bags: FoldBags | None = None, extra: Mapping[str, Any] | None = None) -> str:
        """Hash of everything the numbers depend on (checkpoints of another hash are refused)."""
        from bench.files import config_hash

        d = {k: v for k, v in self.to_dict().items() if k not in _RUN_ONLY}
        if bags is not None:
            d["split"] = [bags.split_sha256, bags.fold]
        return config_hash({**d, **dict(extra or {})})


# ----------------------------------------------------------------------------- job files


def bags_to_dict(bags: FoldBags) -> dict[str, Any]:
    """FoldBags as JSON: the fitted task (`task.to_dict()`), the part tables, the split identity."""
    parts = {}
    for name, df in bags.parts.items():
        rows = df.to_dict(orient="list")
        rows["slide_ids"] = [list(s) for s in df["slide_ids"]]
        parts[name] = {k: [v.item() if hasattr(v, "item") else v for v in col] for k, col in rows.items()}
    return {"task": bags.task.to_dict(), "parts": parts, "split_path": str(bags.split_path),
            "split_sha256": bags.split_sha256, "fold": bags.fold, "dropped": [list(d) for d in bags.dropped]}


def bags_from_dict(d: Mapping[str, Any]) -> FoldBags:
    import pandas as pd

    from bench.tasks import make_task

    task_d = dict(d["task"])
    kind = task_d.pop("kind")
    for key in ("classes", "class_weights", "bin_edges"):
        if isinstance(task_d.get(key), list):
            task_d[key] = tuple(task_d[key])
    parts = {}
    for name, cols in d["parts"].items():
        df = pd.DataFrame({k: v for k, v in cols.items() if k != "slide_ids"})
        df.insert(2 if len(df.columns) >= 2 else len(df.columns), "slide_ids", [tuple(s) for s in cols["slide_ids"]])
        parts[name] = df
    return FoldBags(task=make_task(kind, **task_d), parts=parts, split_path=Path(d["split_path"]),
                    split_sha256=d["split_sha256"], fold=int(d["fold"]),
                    dropped=tuple(tuple(x) for x in d.get("dropped", [])))


def cohort_to_dict(cohort: Any) -> dict[str, Any]:
    # absolute paths: the ranks may start in another folder, and `labels_file` / `slide_dir` already
    # include the root (a relative root would be joined twice)
    return {"root": str(Path(cohort.root).resolve()), "name": cohort.name, "task": cohort.task,
            "classes": list(cohort.classes) if cohort.classes else None,
            "labels": str(Path(cohort.labels_file).resolve()), "slide_dir": str(Path(cohort.slide_dir).resolve())}


def cohort_from_dict(d: Mapping[str, Any]) -> Any:
    from bench.cohort import load_cohort

    return load_cohort(d["root"], name=d["name"], task=d["task"], classes=d["classes"], labels=d["labels"],
                       slide_dir=d["slide_dir"])


# ----------------------------------------------------------------------------- data


def open_rank_data(config: GMAConfig, cohort: Any, tiles_dirs: Mapping[float, Path], slide_ids: list[str], *,
                   pixels: bool, lesions: bool, device: Any = None) -> tuple[Any, Any]:
    """(RankData, source) for the slides: patch counts; pixels for encoder roles; lesion labels for rank 0.

    On CUDA the pixels travel as uint8 (4x fewer bytes) and are normalised on the
    GPU (`RankData.transform`); on CPU the reader normalises them, in the
    read-ahead thread when there is one.

    Raises:
        DataError: a slide with zero patches (before any training starts).
    """
    import torch

    from e2e.gma_train import RankData
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
        def lesion_fn(slide_id: str) -> Any:
            if hasattr(source, "patch_size_level0"):
                size0 = source.patch_size_level0(slide_id, mag)
            else:
                from bench.tiling import read_coords

                size0 = read_coords(tiles_dir / f"{slide_id}.h5").patch_size_level0
            return cohort.lesion_labels(slide_id, source.coords(slide_id, mag), size0)

    return RankData(counts=counts, pixels=pixel_fn, lesions=lesion_fn, transform=on_device), source


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
    from e2e.gma_train import LoopSetup, train_loop

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_models(config, bags)
    parts = {p: df for p, df in bags.parts.items() if p != "test" or predict_test}
    slide_ids = [s for df in parts.values() for ids in df["slide_ids"] for s in ids]
    chash = config.result_hash(bags)

    if config.mode == "chunked":
        from bench.training import resolve_device
        from e2e.gma_core import LocalTopology

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
    job = {"kind": "train", "config": config.to_dict(), "config_hash": chash, "bags": bags_to_dict(bags),
           "cohort": cohort_to_dict(cohort),
           "tiles_dirs": {str(float(m)): str(Path(p).resolve()) for m, p in tiles_dirs.items()},
           "out": str(Path(out_dir).resolve()), "folder": str(Path(folder).resolve()),
           "predict_test": bool(predict_test),
           "fault": dict(fault) if fault else None}

    def on_event(event: dict) -> None:
        if event.get("event") == "epoch" and epoch_callback is not None:
            epoch_callback(int(event["epoch"]), dict(event["values"]))

    from e2e.gma_launch import run_job

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
    from bench.files import atomic_path, write_json_atomic

    for part in ("val", "test"):
        if part in raw:
            with atomic_path(folder / f"predictions-{part}.csv") as tmp:
                raw[part].to_csv(tmp, index=False)
    rest = {k: v for k, v in raw.items() if k not in ("val", "test")}
    rest["parts"] = [p for p in ("val", "test") if p in raw]
    write_json_atomic(folder / "result.json", rest)


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
    from bench.costs import Costs, software_versions

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
               "tiles_per_step": config.tiles, "last_epoch": raw.get("last_epoch"), "versions": software_versions()})


# ----------------------------------------------------------------------------- rank entry point


def run_train_rank(job: Mapping[str, Any]) -> None:
    """One rank of a training job (called under torchrun by `main`)."""
    import torch.distributed as dist

    from e2e.gma_core import DistTopology
    from e2e.gma_launch import EventLog, init_distributed, progress_file
    from e2e.gma_train import LoopSetup, train_loop

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
    try:
        setup = LoopSetup(config=config, config_hash=job["config_hash"], task=bags.task, parts=bags.parts, data=data,
                          out_dir=Path(job["out"]), predict_test=bool(job["predict_test"]),
                          on_epoch=(lambda e, v: events.write("epoch", epoch=e, values=v)) if rank == 0 else None,
                          heartbeat=events.heartbeat if rank == 0 else None, fault=job.get("fault"),
                          enc_group=enc_group)
        topo = DistTopology(device, 0)
        topo.progress_path = progress_file(folder, rank)
        raw = train_loop(topo, device, setup)
        if rank == 0:
            assert raw is not None
            write_result(folder, raw)
            events.write("done")
        dist.barrier()
    finally:
        source.close()
    dist.destroy_process_group()


def _job_from_config(path: Path) -> dict[str, Any]:
    """A job from a hand-written TOML file (multi-node runs without `bench train`); see README."""
    import tomllib

    from bench.splits import load_splits
    from bench.suite import Tiling
    from bench.tasks import make_task
    from bench.training import fold_bags

    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read GMA config {path}: {exc}") from None
    allowed = ("cohort", "tiles", "split", "fold", "out", "encoder", "aggregator", "aggregator_params", "weights",
               "random_init", "seed", "device", "magnification", "patch_size", "input_size", "task", "params",
               "predict_test")
    unknown = [k for k in raw if k not in allowed]
    missing = [k for k in ("cohort", "tiles", "split", "out", "encoder") if k not in raw]
    if unknown or missing:
        raise ConfigError(f"GMA config {path}: " + (f"unknown key(s) {unknown}; " if unknown else "")
                          + (f"missing key(s) {missing}; " if missing else "") + f"allowed: {', '.join(allowed)}")
    cohort = cohort_from_dict({"root": raw["cohort"], "name": None, "task": None, "classes": None,
                               "labels": "labels.csv", "slide_dir": "slides"})
    task = make_task(cohort.task, **dict(raw.get("task", {})),
                     **({"classes": cohort.classes} if cohort.task == "classification" else {}))
    bags = fold_bags(task, cohort.table, load_splits(raw["split"]), int(raw.get("fold", 0)))

    tiling = Tiling(magnification=float(raw.get("magnification", 20.0)), patch_size=int(raw.get("patch_size", 256)),
                    input_size=int(raw.get("input_size", 224)))
    config = GMAConfig.from_params(raw["encoder"], raw.get("aggregator", "gma"), dict(raw.get("params", {})),
                                   tiling=tiling, aggregator_params=raw.get("aggregator_params"),
                                   weights=raw.get("weights"), random_init=bool(raw.get("random_init", False)),
                                   seed=int(raw.get("seed", 0)), device=str(raw.get("device", "auto")))
    out = Path(raw["out"])
    return {"kind": "train", "config": config.to_dict(), "config_hash": config.result_hash(bags),
            "bags": bags_to_dict(bags), "cohort": cohort_to_dict(cohort),
            "tiles_dirs": {str(config.magnification): str(raw["tiles"])}, "out": str(out),
            "folder": str(out / JOB_FOLDER), "predict_test": bool(raw.get("predict_test", True)), "fault": None}


def main(argv: list[str] | None = None) -> int:
    """Rank entry point: `torchrun --nproc-per-node N+1 -m e2e.gma --job FILE` (or `--config FILE.toml`)."""
    parser = argparse.ArgumentParser(prog="python -m e2e.gma", description=main.__doc__)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--job", help="job file written by train_gma / bench check-gma (JSON)")
    which.add_argument("--config", help="hand-written TOML: cohort, tiles, split, out, encoder, [params] ...")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0") or 0)
    folder: Path | None = None
    try:
        if args.job:
            try:
                job = json.loads(Path(args.job).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise ConfigError(f"cannot read GMA job file {args.job}: {exc}") from None
        else:
            job = _job_from_config(Path(args.config))
        folder = Path(job.get("folder") or job["out"])
        from e2e.gma_launch import torchrun_env

        torchrun_env()  # missing rendezvous variables / world size < 2: refuse before building anything
        if job.get("kind") == "check":
            from e2e.gma_check import run_rank

            run_rank(job)
        elif job.get("kind") == "train":
            run_train_rank(job)
        else:
            raise ConfigError(f"GMA job file {args.job} has unknown kind {job.get('kind')!r}; expected train or check")
        return 0
    except BaseException as exc:  # noqa: BLE001 - every failure is reported to the parent, then re-raised/returned
        if folder is not None and os.environ.get("WORLD_SIZE"):
            from e2e.gma_launch import write_error

            write_error(folder, rank, exc)
        if isinstance(exc, BenchError):
            print(f"rank {rank}: error: {exc}", file=sys.stderr, flush=True)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
