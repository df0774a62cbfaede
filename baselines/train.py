"""Two-stage training: one MIL aggregator trained on bags of pre-extracted features.

One loop for every registered aggregator (`baselines.mil`) and every task
(`bench.evaluation.tasks`); the runner and `bench train` call it once per fold:

    >>> config = TwoStageConfig.from_params("abmil", {"epochs": 75, "lr": 2e-4})
    >>> result = train_two_stage(bags, files, config, out_dir)   # doctest: +SKIP
    >>> result.predictions["test"], result.weights["aggregator"]  # doctest: +SKIP

What the loop does (ABMILX paper, appendix B.3, "Two-Stage Framework"):

- every instance of a bag is used, bag batch size 1 (bags differ in size);
  a survival bag is a patient: the features of all its slides concatenated;
- AdamW (lr 2e-4 for ResNet features, 1e-4 for foundation-model features:
  the suite sets it), no weight decay, cosine annealing stepped per bag;
  200 epochs for grading, 75 for subtyping and survival (`bench train` defaults);
- loss = (1 - w) * task loss + w * aux loss with w = `model.aux_weight`
  (CLAM-SB instance clustering, DSMIL max-instance); the label reaches the
  aggregator only for classification and grading;
- classification oversampling through `task.epoch_indices` (the paper's 2:1 ILC);
- mixed precision (autocast, bf16 by default) on CUDA only; CPU runs fp32 and is
  deterministic: same config, same numbers.

Departures from the paper, on purpose: the paper does not say which epoch it
reports; here the weights are selected on the validation split only
(`ModelSelector` on the task's primary metric) and the test split is predicted
once, after training, with those weights. Optional linear warm-up and early
stopping (`patience`) are not in the paper and are off by default. The paper
measures memory with fp16; the default here is bf16 autocast (no loss scaler
needed; fp16 gets a `GradScaler`).

Data: bags are held in memory (pinned on CUDA) when their float32 features fit
in `max_cache_gb` and read from their HDF5 files at every step otherwise; the
test files are not opened at all when `predict_test=False` (sweeps).

Failure and resume: a NaN loss stops the run with a `TrainingError` naming the
epoch; bad features (NaN, a dimension other than the rest, an empty bag, a
missing file) are a `DataError` naming the slide, raised before training when
bags are cached. A checkpoint is written after every epoch into
`out_dir/checkpoint/` (tagged with the config hash, split sha256 and fold); a
rerun with the same config resumes from it and gives the same weights as an
uninterrupted run (each epoch reseeds torch); it is removed after a successful run.

Attention maps: the test prediction also writes `out_dir/attention.h5` (per test slide its attention,
per-head attention, the coords of the feature file and the patch geometry; format in
`bench.evaluation.heatmaps`) for every aggregator with attention, i.e. all but mean/max pooling.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from baselines.features import read_features
from bench.common.errors import ConfigError, DataError, MissingFileError
from bench.evaluation.training import EpochCallback, FoldBags, TrainResult

if TYPE_CHECKING:
    import pandas as pd
    import torch

PARAM_KEYS = ("optimizer", "lr", "weight_decay", "epochs", "warmup_epochs", "patience", "precision", "cache_bags",
              "max_cache_gb")
OPTIMIZERS = ("adamw", "adam", "sgd")
PRECISIONS = ("bf16", "fp16", "fp32")
# fields that change how a run is executed but not its numbers: a checkpoint survives a change of them
_RUN_ONLY = ("device", "cache_bags", "max_cache_gb")
InstanceLabels = Callable[[str, np.ndarray], "np.ndarray | None"]


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"two-stage {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _number(name: str, value: Any, *, positive: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        raise ConfigError(f"two-stage {name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class TwoStageConfig:
    """Settings of one two-stage run (validated on construction; `to_dict` goes into the run record).

    Attributes:
        aggregator / aggregator_params: a registered aggregator and overrides of its defaults.
        optimizer, lr, weight_decay, epochs: appendix B.3 of the ABMILX paper by default.
        warmup_epochs: linear warm-up before the cosine decay (0: none, as in the paper).
        patience: stop after this many epochs without a better validation value (None: off).
        precision: autocast dtype on CUDA ("bf16", "fp16" with a loss scaler, "fp32"); CPU is fp32.
        seed: weights, data order and dropout; same seed, same CPU numbers.
        device: "auto", "cpu", "cuda" or "cuda:N".
        cache_bags / max_cache_gb: keep the bags' float32 features in memory when they fit.
    """

    aggregator: str
    aggregator_params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    optimizer: str = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    epochs: int = 75
    warmup_epochs: int = 0
    patience: int | None = None
    precision: str = "bf16"
    seed: int = 0
    device: str = "auto"
    cache_bags: bool = True
    max_cache_gb: float = 8.0

    def __post_init__(self) -> None:
        from baselines.mil import AGGREGATORS

        spec = AGGREGATORS.get(self.aggregator)  # ConfigError listing the known names
        if not isinstance(self.aggregator_params, Mapping):
            raise ConfigError(f"two-stage aggregator_params must be a table, got {self.aggregator_params!r}")
        unknown = sorted(set(self.aggregator_params) - set(spec.defaults))
        if unknown:
            raise ConfigError(f"unknown parameter {unknown[0]!r} for aggregator {self.aggregator!r}; "
                              f"valid: {', '.join(spec.defaults)}")
        object.__setattr__(self, "aggregator_params", MappingProxyType(dict(self.aggregator_params)))
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"two-stage optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"two-stage precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        _number("lr", self.lr, positive=True)
        _number("weight_decay", self.weight_decay, positive=False)
        _number("max_cache_gb", self.max_cache_gb, positive=False)
        _int("epochs", self.epochs, 1)
        _int("warmup_epochs", self.warmup_epochs, 0)
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise ConfigError(f"two-stage warmup_epochs ({self.warmup_epochs}) must be smaller than epochs "
                              f"({self.epochs}), or the cosine decay never starts")
        if self.patience is not None:
            _int("patience", self.patience, 1)
        _int("seed", self.seed, 0)
        if not isinstance(self.cache_bags, bool):
            raise ConfigError(f"two-stage cache_bags must be true or false, got {self.cache_bags!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ConfigError(f"two-stage device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    @classmethod
    def from_params(cls, aggregator: str, params: Mapping[str, Any], *,
                    aggregator_params: Mapping[str, Any] | None = None, seed: int = 0,
                    device: str = "auto") -> TwoStageConfig:
        """From a suite's trainer parameters ([defaults.two-stage] + the method's params).

        Raises:
            ConfigError: a key outside `PARAM_KEYS` (named, with the allowed ones) or a bad value.
        """
        import difflib

        unknown = [k for k in params if k not in PARAM_KEYS]
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), PARAM_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown two-stage parameter {unknown[0]!r}{hint}; allowed: {', '.join(PARAM_KEYS)}")
        return cls(aggregator=aggregator, aggregator_params=dict(aggregator_params or {}), seed=seed, device=device,
                   **dict(params))

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["aggregator_params"] = dict(self.aggregator_params)
        return out

    def result_hash(self, bags: FoldBags, in_dim: int) -> str:
        """Hash of everything the numbers depend on (a checkpoint of another hash is refused)."""
        from bench.common.files import config_hash

        d = {k: v for k, v in self.to_dict().items() if k not in _RUN_ONLY}
        d.update(split=[bags.split_sha256, bags.fold], in_dim=int(in_dim), task=bags.task.to_dict(),
                 bags={p: [str(b) for b in bags.parts[p]["bag_id"]] for p in ("train", "val")})
        return config_hash(d)


# ----------------------------------------------------------------------------- bags


class BagFeatures:
    """The features of the bags a run uses: sizes from the file headers, tensors from memory or disk.

    A bag is a tuple of slide ids (one slide, or a survival patient's slides,
    concatenated in that order). With `cache`, every bag is read once, up front,
    so bad files fail before any training.
    """

    def __init__(self, bags: list[tuple[str, ...]], files: Mapping[str, Path], *, cache: bool, max_cache_gb: float,
                 pin: bool = False) -> None:
        self.files = {s: Path(files[s]) if s in files else None for b in bags for s in b}
        self.sizes: dict[str, int] = {}
        dims: dict[str, int] = {}
        for slide, path in self.files.items():
            if path is None:
                raise DataError(f"slide {slide!r} has no feature file; extract its features (bench extract) or "
                                "leave the slide out of the split")
            self.sizes[slide], dims[slide] = _header(slide, path)
        values = list(dims.values())
        self.dim = max(set(values), key=values.count)
        odd = next((s for s, d in dims.items() if d != self.dim), None)
        if odd is not None:
            example = next(s for s, d in dims.items() if d == self.dim)
            raise DataError(f"slide {odd!r} has {dims[odd]}-dimensional features but the other slides of this run "
                            f"have {self.dim} (e.g. {example!r}); one run needs features of one encoder: "
                            f"re-extract {self.files[odd]}")
        self.nbytes = 4 * self.dim * sum(self.sizes.values())
        self.cached = bool(cache) and self.nbytes <= max_cache_gb * 2**30
        self.pin = pin
        self.coords: dict[str, np.ndarray] = {}
        self.geometry: dict[str, tuple[int, float]] = {}  # slide -> (patch size at level 0, magnification)
        self._memory: dict[tuple[str, ...], torch.Tensor] = {}
        if self.cached:
            for bag in dict.fromkeys(bags):
                self._memory[bag] = self._read(bag)

    def n_instances(self, bag: tuple[str, ...]) -> int:
        return sum(self.sizes[s] for s in bag)

    def _read(self, bag: tuple[str, ...]) -> torch.Tensor:
        import torch

        feats = []
        for slide in bag:
            try:
                f = read_features(self.files[slide])
            except (DataError, MissingFileError) as exc:
                raise DataError(f"slide {slide!r}: {exc}") from None
            if f.features.shape != (self.sizes[slide], self.dim):
                raise DataError(f"slide {slide!r}: features {f.features.shape} changed since the run started "
                                f"({self.sizes[slide]}, {self.dim}); was it re-extracted meanwhile?")
            self.coords[slide] = f.coords
            if slide not in self.geometry:
                from bench.evaluation.heatmaps import patch_geometry

                self.geometry[slide] = patch_geometry(f.attrs, f.coords)
            feats.append(f.features)
        x = torch.from_numpy(feats[0] if len(feats) == 1 else np.concatenate(feats))[None]  # (1, N, D)
        return x.pin_memory() if self.pin else x

    def get(self, bag: tuple[str, ...], device: Any) -> torch.Tensor:
        """(1, N, D) float32 features of `bag` on `device`."""
        x = self._memory.get(bag)
        if x is None:
            x = self._read(bag)
        return x.to(device, non_blocking=True)

    def grid(self, bag: tuple[str, ...], device: Any) -> torch.Tensor:
        """(1, N, 2) float32 patch-grid positions (column, row) of `bag`, for aggregators with `uses_coords`.

        Level-0 pixel coordinates / the slide's patch side at level 0, so one step = one patch whatever
        the scanner's resolution; absolute, as the authors' TITAN and GigaPath take them. A bag of several
        slides (a survival patient) lays them side by side in that order: each later slide is shifted so
        its columns start two patches right of the previous slide's rightmost patch, so no two patches
        share a position and distances within a slide are kept (the authors encode one slide at a time).
        """
        import torch

        if any(s not in self.coords for s in bag):
            self._read(bag)  # coords and geometry come with the features
        parts, offset = [], 0.0
        for slide in bag:
            ps0 = max(int(self.geometry[slide][0]), 1)
            g = np.asarray(self.coords[slide], dtype=np.float64)[:, :2] / ps0
            if len(g):
                if parts:  # a later slide of the bag: shift it right of the previous ones
                    g[:, 0] += offset - g[:, 0].min()
                offset = float(g[:, 0].max()) + 2.0
            parts.append(g)
        g = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if len(g) != self.n_instances(bag):
            raise DataError(f"bag {bag!r}: {len(g)} coords for {self.n_instances(bag)} patches; "
                            "the feature file's coords and features disagree, re-extract it")
        return torch.from_numpy(g.astype(np.float32))[None].to(device)


def _header(slide: str, path: Path) -> tuple[int, int]:
    """(N, D) of a feature file without reading it; a clear error for an empty or unreadable one."""
    import h5py

    if not path.is_file():
        raise DataError(f"slide {slide!r}: feature file {path} does not exist; extract its features (bench extract)")
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise DataError(f"slide {slide!r}: {path} has no 'features' dataset; it is not a feature file")
            shape = tuple(f["features"].shape)
    except OSError as exc:
        raise DataError(f"slide {slide!r}: cannot read feature file {path} ({exc}); extract it again") from None
    while len(shape) > 2 and shape[0] == 1:  # (1, N, D) as some tools write
        shape = shape[1:]
    if len(shape) != 2:
        raise DataError(f"slide {slide!r}: features in {path} must be a 2-D array (N, D), got shape {shape}")
    if shape[0] == 0:
        raise DataError(f"slide {slide!r}: empty bag, {path} holds 0 patches; re-tile the slide or leave it out")
    return int(shape[0]), int(shape[1])


# ----------------------------------------------------------------------------- one step, one prediction pass


class TwoStageLoop:
    """The model, its optimiser and the bags: one training step and one prediction pass.

    `train_two_stage` drives it epoch by epoch; the training-throughput benchmark
    times `train_step` as the trainer's data path.
    """

    def __init__(self, model: torch.nn.Module, task: Any, bags: BagFeatures, config: TwoStageConfig,
                 device: torch.device, steps_per_epoch: int) -> None:
        import torch

        from bench.evaluation.training import cosine_schedule, make_optimizer

        self.model, self.task, self.bags, self.device = model, task, bags, device
        self.precision = config.precision if device.type == "cuda" else "fp32"
        self.optimizer = make_optimizer(config.optimizer, [p for p in model.parameters() if p.requires_grad],
                                        config.lr, config.weight_decay)
        self.scheduler = cosine_schedule(self.optimizer, config.epochs * steps_per_epoch,
                                         warmup_steps=config.warmup_epochs * steps_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.categorical = task.kind in ("classification", "grading")

    def train_step(self, bag: tuple[str, ...], bag_id: str, target: Any, epoch: int, step: int) -> float:
        """One optimiser step on one bag; returns its loss. `target`: Targets of this bag."""
        import torch

        from bench.evaluation.training import autocast, check_finite

        x = self.bags.get(bag, self.device)  # (1, N, D)
        label = torch.as_tensor(target.label, device=self.device).long().reshape(1) if self.categorical else None
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            out = self._forward(x, bag_id, label, bag)
            loss = self.task.loss(out.logits.float(), target)
            if out.aux_loss is not None:
                w = float(self.model.aux_weight)
                loss = (1.0 - w) * loss + w * out.aux_loss.float()
        value = float(loss.detach())
        check_finite(value, "training loss", epoch, step)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.scheduler.step()
        return value

    def _forward(self, x: torch.Tensor, bag_id: str, label: torch.Tensor | None = None,
                 bag: tuple[str, ...] | None = None) -> Any:
        try:
            if bag is not None and getattr(self.model, "uses_coords", False):
                return self.model(x, label=label, coords=self.bags.grid(bag, self.device))
            return self.model(x, label=label)
        except DataError as exc:  # check_bag's message knows the batch position, not the bag
            raise DataError(f"bag {bag_id!r}: {exc}") from None

    def predict(self, frame: pd.DataFrame, heads: list[np.ndarray | None] | None = None
                ) -> tuple[np.ndarray, list[np.ndarray], float]:
        """(logits (B, K), attention per bag (N,), seconds of aggregator forward) in eval mode.

        With a list as `heads`, each bag's per-head attention (H, N) (None for single-head models) is appended.
        """
        import torch

        from bench.evaluation.heatmaps import head_rows
        from bench.evaluation.training import autocast

        self.model.eval()
        logits, attention, seconds = [], [], 0.0
        try:
            with torch.no_grad():
                for bag_id, ids in zip(frame["bag_id"], frame["slide_ids"]):
                    x = self.bags.get(tuple(ids), self.device)  # (1, N, D)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    t0 = time.perf_counter()
                    with autocast(self.device, self.precision):
                        out = self._forward(x, str(bag_id), bag=tuple(ids))
                    logits.append(out.logits.float()[0].cpu().numpy())  # (K,), synchronises
                    seconds += time.perf_counter() - t0
                    attention.append(out.attention.float()[0].cpu().numpy())  # (N,)
                    if heads is not None:
                        heads.append(head_rows(out.head_attention))  # (H, N) or None
        finally:
            self.model.train()
        k = int(self.task.n_outputs)
        return (np.stack(logits) if logits else np.zeros((0, k))), attention, seconds


# ----------------------------------------------------------------------------- the trainer


def train_two_stage(bags: FoldBags, features: Mapping[str, Path], config: TwoStageConfig, out_dir: Path, *,
                    instance_labels: InstanceLabels | None = None, epoch_callback: EpochCallback | None = None,
                    predict_test: bool = True, cohort: Any = None) -> TrainResult:
    """Train `config.aggregator` on the feature bags of one fold (see the module docstring).

    Args:
        bags: train/val/test bags with the task fitted on train (`bench.evaluation.training.fold_bags`).
        features: slide id -> feature file (ours, CLAM's or TRIDENT's layout).
        out_dir: receives `aggregator.safetensors` (selected weights) and, while training, `checkpoint/`.
        instance_labels: (slide id, coords (N, 2)) -> (N,) 0/1 lesion labels or None; scores attention.
        epoch_callback: called after every epoch with (epoch, history row); its exceptions propagate
            (Optuna's TrialPruned), the epoch's checkpoint is already written.
        predict_test: False for sweeps: the test bags are never read; predictions hold "val" only.
        cohort: the cohort (`bench.data.cohort.Cohort`), optional: attention.h5 then records the cohort folder
            and each slide's file, so `bench heatmap` finds the slides wherever the cohort lives.

    Raises:
        DataError: a slide without a (readable, finite, non-empty) feature file, feature
            dimensions that differ, a label outside the task's classes.
        ConfigError: a checkpoint in `out_dir` of another configuration.
        TrainingError: the loss became NaN or infinite (with the epoch).
    """
    import torch

    from baselines.mil import build_aggregator
    from bench.common.console import progress
    from bench.evaluation.costs import (Costs, count_flops, count_parameters, device_name, peak_memory_mb, reset_peak_memory,
                             software_versions)
    from bench.evaluation.training import (CHECKPOINT_DIR, Checkpoint, ModelSelector, epoch_seed, resolve_device,
                                           save_safetensors, seed_everything)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    task = bags.task
    device = resolve_device(config.device)
    parts = {p: bags.parts[p] for p in ("train", "val", "test") if p != "test" or predict_test}
    targets = {}
    for p, df in parts.items():
        try:
            targets[p] = task.targets_from_frame(df) if len(df) else None
        except DataError as exc:
            raise DataError(f"{p} bags of fold {bags.fold} ({bags.split_path}): {exc}") from None
    keys = {p: [tuple(ids) for ids in df["slide_ids"]] for p, df in parts.items()}
    if not keys["train"]:
        raise DataError(f"fold {bags.fold} of {bags.split_path} has no training bag")
    seed_everything(config.seed, deterministic=device.type == "cpu")
    peak_kind = reset_peak_memory(device)
    wall_start = time.perf_counter()
    store = BagFeatures([k for p in parts for k in keys[p]], features, cache=config.cache_bags,
                        max_cache_gb=config.max_cache_gb, pin=device.type == "cuda")
    model = build_aggregator(config.aggregator, store.dim, task.n_outputs, seed=config.seed,
                             **config.aggregator_params).to(device).train()
    train_targets = targets["train"]
    n_steps = len(task.epoch_indices(train_targets, config.seed))  # oversampling makes an epoch longer
    loop = TwoStageLoop(model, task, store, config, device, n_steps)
    per_bag = [train_targets.subset(i) for i in range(len(keys["train"]))]
    train_ids = [str(b) for b in parts["train"]["bag_id"]]
    has_val = targets["val"] is not None
    selector = ModelSelector(task.primary_metric, task.higher_is_better[task.primary_metric],
                             patience=config.patience)
    chash = config.result_hash(bags, store.dim)
    ckpt = Checkpoint(out_dir / CHECKPOINT_DIR, chash)
    history: list[dict[str, Any]] = []
    start_epoch, elapsed_before, resumed_from = 0, 0.0, None
    if ckpt.exists():  # another config's checkpoint raises ConfigError here
        state = ckpt.load({"aggregator": model})
        loop.optimizer.load_state_dict(state["optimizer"])
        loop.scheduler.load_state_dict(state["scheduler"])
        if loop.scaler is not None and state.get("scaler"):
            loop.scaler.load_state_dict(state["scaler"])
        selector.load_state_dict(state["selector"])
        if state.get("best_state") is not None:
            selector.best_state = {"aggregator": state["best_state"]}
        history = list(state["history"])
        elapsed_before = float(state["train_seconds"])
        start_epoch = resumed_from = int(state["epoch"]) + 1

    bar = progress(range(start_epoch, config.epochs), desc=f"two-stage {config.aggregator}", unit="epoch",
                   total=config.epochs, initial=start_epoch)
    stopped_early = has_val and selector.should_stop
    for epoch in bar:
        if stopped_early:
            break
        t_epoch = time.perf_counter()
        torch.manual_seed(epoch_seed(config.seed, epoch))  # dropout of this epoch, whether resumed or not
        model.train()
        order = task.epoch_indices(train_targets, config.seed + epoch)
        loss_sum = 0.0
        for step, b in enumerate(order):
            b = int(b)
            loss_sum += loop.train_step(keys["train"][b], train_ids[b], per_bag[b], epoch, step)
        row: dict[str, Any] = {"epoch": epoch, "train_loss": loss_sum / len(order),
                               "lr": float(loop.optimizer.param_groups[0]["lr"])}
        if has_val:
            row.update(_validate(loop, parts["val"], targets["val"]))
            selector.update(epoch, row.get(f"val_{task.primary_metric}", math.nan), {"aggregator": model})
            stopped_early = selector.should_stop
        row["seconds"] = time.perf_counter() - t_epoch
        history.append(row)
        ckpt.save(epoch, {"aggregator": model}, {
            "optimizer": loop.optimizer.state_dict(), "scheduler": loop.scheduler.state_dict(),
            "scaler": loop.scaler.state_dict() if loop.scaler is not None else None,
            "selector": selector.state_dict(),
            "best_state": selector.best_state["aggregator"] if selector.best_state else None,
            "history": history, "train_seconds": elapsed_before + time.perf_counter() - wall_start})
        bar.set_postfix(_postfix(row, task.primary_metric))
        if epoch_callback is not None:
            epoch_callback(epoch, dict(row))
    train_seconds = elapsed_before + time.perf_counter() - wall_start
    peak_mb = peak_memory_mb(device)

    # --- selected weights, then the predictions made with them
    last_epoch = int(history[-1]["epoch"]) if history else None
    extra: dict[str, Any] = {"last_epoch": last_epoch, "stopped_early": bool(stopped_early),
                             "resumed_from_epoch": resumed_from, "in_dim": store.dim, "steps_per_epoch": n_steps,
                             "bags_in_memory": store.cached, "bag_gb": store.nbytes / 2**30}
    if selector.best_state is not None:
        selector.restore({"aggregator": model})
        best_epoch, best_value = selector.best_epoch, selector.best_value
        extra["selection"] = f"best validation {task.primary_metric} (epoch {best_epoch})"
    else:
        best_epoch, best_value = last_epoch, None
        why = "no validation bags" if not has_val else f"validation {task.primary_metric} undefined in every epoch"
        extra["selection"] = f"last epoch ({why})"
    weights = save_safetensors(out_dir / "aggregator.safetensors", model.state_dict(), {
        "config_hash": chash, "best_epoch": best_epoch, "aggregator": config.aggregator, "in_dim": store.dim,
        "n_outputs": int(task.n_outputs), "aggregator_params": dict(config.aggregator_params),
        "task": task.to_dict()})
    predictions: dict[str, pd.DataFrame] = {}
    timed: dict[str, tuple[list[np.ndarray], float]] = {}
    maps = has_attention_map(model)
    for p in ("val", "test"):
        if p in parts and targets[p] is not None:
            heads: list[np.ndarray | None] | None = [] if p == "test" and maps else None
            logits, attention, seconds = loop.predict(parts[p], heads=heads)
            predictions[p] = task.prediction_frame(parts[p]["bag_id"], parts[p]["patient_id"], targets[p],
                                                   task.scores(logits))
            timed[p] = (attention, seconds)
            if heads is not None:
                _write_attention_maps(out_dir, parts[p], attention, heads, store, config, cohort, extra)
    scored = "test" if "test" in timed else ("val" if "val" in timed else None)
    extra["attention_split"] = scored
    attention_stats: dict[str, Any] = {}
    infer_seconds = math.nan
    if scored is not None:
        attention, seconds = timed[scored]
        infer_seconds = seconds / max(1, sum(len(k) for k in keys[scored]))
        attention_stats = _attention_summary(attention, keys[scored], store, instance_labels)

    params = count_parameters(model)
    n_ref = max(1, round(float(np.mean([store.n_instances(k) for k in keys["train"]]))))
    # ones, not zeros: TITAN drops all-zero grid cells as background
    example: dict[str, Any] = {"x": torch.ones(1, n_ref, store.dim, device=device)}
    if getattr(model, "uses_coords", False):
        from baselines.mil.base import square_grid

        example["coords"] = square_grid(n_ref, device)
    flops = count_flops(model, example)
    costs = Costs(train_seconds=train_seconds, infer_seconds_per_slide=infer_seconds, peak_memory_mb=peak_mb,
                  params=params.total, flops=flops, device=device_name(device), trainable_params=params.trainable,
                  peak_memory_kind=peak_kind)
    costs = _with_extraction(costs, bags, parts, scored, store, extra)
    extra["flops_bag_size"] = n_ref
    extra["versions"] = software_versions()
    shutil.rmtree(ckpt.directory, ignore_errors=True)
    return TrainResult(predictions=predictions, history=history, best_epoch=best_epoch, best_value=best_value,
                       weights={"aggregator": weights}, costs=costs.to_dict(), attention=attention_stats,
                       params=config.to_dict(), extra=extra)


def has_attention_map(model: Any) -> bool:
    """Whether an aggregator's attention is worth a heatmap: every one but mean/max pooling, whose
    `attention` is only the pooling's weights (uniform, or the share of maxima), not a learned score."""
    from baselines.mil.pooling import MaxPoolMIL, MeanPoolMIL

    return not isinstance(model, (MeanPoolMIL, MaxPoolMIL))


def _write_attention_maps(out_dir: Path, frame: pd.DataFrame, attention: list[np.ndarray],
                          heads: list[np.ndarray | None], store: BagFeatures, config: TwoStageConfig, cohort: Any,
                          extra: dict[str, Any]) -> None:
    """attention.h5 of the test bags (split per slide); a failure is noted in `extra`, never fails the run."""
    from bench.common.errors import BenchError, WriteError
    from bench.evaluation.heatmaps import ATTENTION_FILE, SlideGeometry, bag_attention, write_attention

    def geometry(slide: str) -> SlideGeometry:
        ps0, mag = store.geometry[slide]
        path = mpp = None
        if cohort is not None:
            try:
                path, mpp = str(cohort.slide_path(slide)), cohort.slide_mpp(slide)
            except DataError:
                pass
        return SlideGeometry(store.coords[slide], ps0, mag, path, mpp)

    try:
        slides = [s for bag_id, ids, a, h in zip(frame["bag_id"], frame["slide_ids"], attention, heads)
                  for s in bag_attention(str(bag_id), list(ids), a, h, geometry)]
        write_attention(out_dir / ATTENTION_FILE, slides, aggregator=config.aggregator, paradigm="two-stage",
                        cohort_root=None if cohort is None else str(Path(cohort.root).resolve()))
    except WriteError:
        raise
    except (BenchError, KeyError) as exc:
        extra["attention_maps"] = f"not written: {type(exc).__name__}: {exc}"


def _validate(loop: TwoStageLoop, frame: pd.DataFrame, targets: Any) -> dict[str, Any]:
    """val_<metric> for every task metric (NaN with a note when undefined) and val attention statistics."""
    from baselines.mil.attention_stats import summarize_attention

    task = loop.task
    logits, attention, _ = loop.predict(frame)
    out: dict[str, Any] = {}
    try:
        out.update({f"val_{k}": v for k, v in task.metrics(targets, task.scores(logits)).items()})
    except DataError as exc:  # e.g. a class missing from a tiny validation split, or diverged scores
        out.update({f"val_{k}": math.nan for k in task.metric_names})
        out["val_note"] = str(exc)
    try:
        stats = summarize_attention(attention)
        out["val_attention_sparsity"], out["val_attention_max_n_all"] = stats["sparsity"], stats["max_n_all"]
    except DataError as exc:
        out["val_attention_note"] = str(exc)
    return out


def _postfix(row: Mapping[str, Any], metric: str) -> dict[str, str]:
    out = {"loss": f"{row['train_loss']:.4f}"}
    if f"val_{metric}" in row:
        out[metric] = f"{row[f'val_{metric}']:.4f}"
    return out


def _attention_summary(attention: list[np.ndarray], keys: list[tuple[str, ...]], store: BagFeatures,
                       instance_labels: InstanceLabels | None) -> dict[str, Any]:
    """Sparsity, MAX-N and (with lesion labels, concatenated per patient) attention AUC over the bags."""
    from baselines.mil.attention_stats import summarize_attention

    labels: list[np.ndarray | None] | None = None
    if instance_labels is not None:
        labels = []
        for bag in keys:
            per_slide = [instance_labels(s, store.coords[s]) for s in bag]
            if any(y is None for y in per_slide):
                labels.append(None)
                continue
            for s, y in zip(bag, per_slide):
                if np.shape(y) != (store.sizes[s],):
                    raise DataError(f"slide {s!r}: instance labels of shape {np.shape(y)} for "
                                    f"{store.sizes[s]} patches")
            labels.append(np.concatenate([np.asarray(y, dtype=np.int64) for y in per_slide]))
        if all(y is None for y in labels):
            labels = None
    try:
        return dict(summarize_attention(attention, labels))
    except DataError as exc:  # attention the statistics cannot use (e.g. NaN): keep the run, say why
        return {"note": str(exc)}


def _with_extraction(costs: Any, bags: FoldBags, parts: Mapping[str, Any], scored: str | None,
                     store: BagFeatures, extra: dict[str, Any]) -> Any:
    """Charge the run for feature extraction where the files record it (ours do; CLAM/TRIDENT do not)."""
    from baselines.features import extraction_seconds

    fit = [s for p in ("train", "val") for ids in parts[p]["slide_ids"] for s in ids]
    test = [s for ids in parts[scored]["slide_ids"] for s in ids] if scored == "test" else []
    slides = list(dict.fromkeys(fit + test))
    seconds = extraction_seconds({s: store.files[s] for s in slides})
    lacking = [s for s in slides if s not in seconds]
    if lacking:
        extra["feature_extraction"] = (f"not included: {len(lacking)} of {len(slides)} feature files record no "
                                       f"extraction time (CLAM/TRIDENT files), e.g. {lacking[0]!r}")
        return costs
    return costs.with_feature_extraction(seconds, fit_slides=fit, test_slides=test)


__all__ = ["PARAM_KEYS", "TwoStageConfig", "BagFeatures", "TwoStageLoop", "has_attention_map", "train_two_stage"]
