"""Pieces every trainer shares: seeding, devices, optimisers, schedules, model
selection on the validation split, NaN guards, safetensors weights, checkpoints
and the result every trainer returns.

The two-stage trainer (`baselines/train.py`), the end-to-end trainer
(`e2e/train.py`) and the gather/scatter trainer (`e2e/gma.py`) each have one
loop; what they have in common lives here so the three stay alike.

Honest statistics: `ModelSelector` sees validation metrics only. A trainer
predicts the test split once, after training, with the selected weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.common.errors import ConfigError, DataError, TrainingError
from bench.common.files import atomic_path

if TYPE_CHECKING:
    import pandas as pd
    import torch

# Called after every epoch with (epoch, logged values); may raise (e.g. optuna.TrialPruned).
EpochCallback = Callable[[int, dict], None]


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch; on CPU also ask torch for deterministic kernels."""
    import torch

    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def epoch_seed(seed: int, epoch: int, *keys: int) -> int:
    """The torch seed of one epoch (dropout, augmentation) from the run's seed, the epoch and any
    further keys (e.g. a GMA rank): the same whether the run was resumed or not."""
    return int(np.random.SeedSequence([int(seed), int(epoch), *map(int, keys)]).generate_state(1)[0])


def resolve_device(device: str | None = "auto") -> torch.device:
    """`auto` -> CUDA when available, else CPU; an unavailable CUDA request is an error."""
    import torch

    name = (device or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None


def autocast(device: torch.device, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (bf16/fp16); a no-op on CPU or for fp32."""
    import torch

    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def make_optimizer(name: str, params: Any, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW / Adam / SGD (momentum 0.9), the optimisers of the ABMILX paper's appendix B.3."""
    import torch

    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"learning rate must be a positive number, got {lr!r}")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay!r}")
    key = name.lower()
    if key == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if key == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if key == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=0.9)
    raise ConfigError(f"unknown optimizer {name!r}; choose adamw, adam or sgd")


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                    min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine annealing to `min_lr_ratio * lr` over `total_steps`, after a linear warm-up."""
    import torch

    if total_steps <= 0:
        raise ConfigError(f"total_steps must be positive, got {total_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def check_finite(value: float | torch.Tensor, what: str, epoch: int, step: int | None = None) -> None:
    """Raise TrainingError (with epoch and step) when a loss or metric is NaN or infinite."""
    v = float(value.detach()) if hasattr(value, "detach") else float(value)
    if not math.isfinite(v):
        where = f"epoch {epoch}" + (f", step {step}" if step is not None else "")
        raise TrainingError(
            f"{what} became {v} at {where}; training stopped. Lower the learning rate, check the "
            "features/patches for NaN, or use fp32.", epoch=epoch)


class ModelSelector:
    """Keeps the weights of the best validation epoch; optional early stopping.

    Ties keep the later epoch: on a small validation split the metric is coarse (7 patients give
    a C-index in steps of 1/12, 10 bags an accuracy in steps of 0.1), so equal values cannot tell
    epochs apart and the later one has trained longer; keeping the earlier one kept untrained
    epoch-0 weights whenever the metric never rose (the demo's survival runs). A tie does not
    reset the early-stopping patience. A NaN validation value never counts.
    """

    def __init__(self, metric: str, higher_is_better: bool = True, patience: int | None = None,
                 min_delta: float = 0.0) -> None:
        if patience is not None and patience < 1:
            raise ConfigError(f"patience must be >= 1 or None, got {patience}")
        self.metric = metric
        self.higher_is_better = higher_is_better
        self.patience = patience
        self.min_delta = min_delta
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict[str, dict[str, Any]] | None = None
        self._since_best = 0

    def update(self, epoch: int, value: float, modules: Mapping[str, torch.nn.Module]) -> bool:
        """Record one epoch's validation value; returns True when its weights are now the kept ones."""
        improved = math.isfinite(value) and (
            self.best_value is None
            or (value > self.best_value + self.min_delta if self.higher_is_better else value < self.best_value - self.min_delta)
        )
        tie = not improved and math.isfinite(value) and self.best_value is not None and value == self.best_value
        if improved or tie:
            self.best_value, self.best_epoch = float(value), epoch
            self.best_state = {name: {k: v.detach().clone().cpu() for k, v in m.state_dict().items()}
                               for name, m in modules.items()}
        self._since_best = 0 if improved else self._since_best + 1
        return improved or tie

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self._since_best >= self.patience

    def restore(self, modules: Mapping[str, torch.nn.Module]) -> None:
        """Load the best weights back into the modules (no-op before the first update)."""
        if self.best_state is None:
            return
        for name, m in modules.items():
            m.load_state_dict(self.best_state[name])

    def state_dict(self) -> dict[str, Any]:
        return {"best_value": self.best_value, "best_epoch": self.best_epoch, "since_best": self._since_best}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best_value, self.best_epoch = state["best_value"], state["best_epoch"]
        self._since_best = int(state["since_best"])


# --- files -----------------------------------------------------------------------------------


def save_safetensors(path: str | Path, state_dict: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a state dict as safetensors, atomically; metadata values become strings."""
    from safetensors.torch import save_file

    tensors, seen = {}, set()
    for k, v in state_dict.items():
        v = v.detach().contiguous().cpu()
        if v.numel() and v.data_ptr() in seen:  # a shared (tied) weight, e.g. PRISM's repeated layers: its own copy
            v = v.clone()
        seen.add(v.data_ptr())
        tensors[k] = v
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of a safetensors file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise DataError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except (SafetensorError, OSError) as exc:
        raise DataError(f"cannot read weights file {path}: {exc}; delete it to retrain") from None


CHECKPOINT_DIR = "checkpoint"  # a trainer's resumable state inside its run folder


def discard_checkpoint(run_dir: str | Path) -> None:
    """Remove a run's resume checkpoint once its record is written (the final weights stay beside it)."""
    import shutil

    shutil.rmtree(Path(run_dir) / CHECKPOINT_DIR, ignore_errors=True)


@dataclass
class Checkpoint:
    """A resumable training state: module weights (safetensors) + optimiser/scheduler/selector state.

    Written as `<dir>/<name>.safetensors` per module and `<dir>/state.pt` (tensors and
    plain values only, loaded with `weights_only=True`), all tagged with the run's config
    hash so a checkpoint of another configuration is refused.
    """

    directory: Path
    config_hash: str

    def save(self, epoch: int, modules: Mapping[str, torch.nn.Module], state: Mapping[str, Any]) -> None:
        import torch

        self.directory.mkdir(parents=True, exist_ok=True)
        for name, m in modules.items():
            save_safetensors(self.directory / f"{name}.safetensors", m.state_dict(),
                             {"epoch": epoch, "config_hash": self.config_hash})
        with atomic_path(self.directory / "state.pt") as tmp:
            torch.save({"epoch": epoch, "config_hash": self.config_hash, **state}, tmp)

    def exists(self) -> bool:
        return (self.directory / "state.pt").exists()

    def load(self, modules: Mapping[str, torch.nn.Module]) -> dict[str, Any]:
        """Load weights into `modules` and return the saved state (with `epoch`)."""
        import torch

        state = torch.load(self.directory / "state.pt", map_location="cpu", weights_only=True)
        if state.get("config_hash") != self.config_hash:
            raise ConfigError(
                f"checkpoint in {self.directory} belongs to another configuration "
                f"(config hash {state.get('config_hash')} != {self.config_hash}); refusing to resume from it. "
                "Delete the folder or use another run directory.")
        for name, m in modules.items():
            weights, meta = load_safetensors(self.directory / f"{name}.safetensors")
            if meta.get("config_hash") != self.config_hash or int(json.loads(meta.get("epoch", "-1"))) != state["epoch"]:
                raise ConfigError(f"checkpoint file {name}.safetensors in {self.directory} does not match state.pt; "
                                  "delete the folder to start over")
            m.load_state_dict(weights)
        return state


# --- the result of any trainer ---------------------------------------------------------------


@dataclass
class TrainResult:
    """What a trainer hands to the runner, which turns it into a run record.

    Attributes:
        predictions: per split ("val", "test") a predictions table (see bench.evaluation.tasks).
        history: one dict per epoch (train loss, validation metrics, attention statistics...).
        best_epoch / best_value: the epoch chosen on the validation split and its value.
        weights: name -> safetensors file of the selected weights.
        costs: bench.evaluation.costs.Costs.to_dict() (train seconds, inference s/slide, peak memory, ...).
        attention: summary statistics of attention on the test split (sparsity, MAX-N, lesion AUC).
        params: the resolved hyperparameters actually used.
        extra: anything paradigm-specific (per-rank costs for GMA, ...).
    """

    predictions: dict[str, pd.DataFrame] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    best_value: float | None = None
    weights: dict[str, Path] = field(default_factory=dict)
    costs: dict[str, Any] = field(default_factory=dict)
    attention: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


# --- the bags of one fold: the data contract of every trainer ------------------------------


@dataclass(frozen=True, eq=False)
class FoldBags:
    """The train/val/test bags of one fold of a split file, and the task fitted on train.

    Every trainer (two-stage, E2E, GMA) receives this and nothing else about labels
    or splits, so the three paradigms see the same bags of the same file.

    Attributes:
        task: the task fitted on the *train* part only (survival bin edges,
            balanced class weights); validation and test never inform it.
        parts: "train", "val", "test" -> one row per bag: `bag_id`, `patient_id`,
            `slide_ids` (tuple of slide ids; survival bags are patients), and the
            task's target columns. "val" may be empty (a split without a val part).
        split_path / split_sha256 / fold: which split file and fold they came from.
        dropped: (slide_id, reason) of slides left out because they have no data
            (untiled, unreadable, no features); a bag that loses all its slides is dropped.
    """

    task: Any
    parts: Mapping[str, pd.DataFrame]
    split_path: Path
    split_sha256: str
    fold: int
    dropped: tuple[tuple[str, str], ...] = ()

    def targets(self, part: str):
        """Targets of one part (survival bins from the fitted task)."""
        return self.task.targets_from_frame(self.parts[part])

    def slide_ids(self, part: str | None = None) -> list[str]:
        """Slides of one part (all parts when None), in bag order."""
        names = [part] if part is not None else ["train", "val", "test"]
        return [s for p in names for ids in self.parts[p]["slide_ids"] for s in ids]

    def summary(self) -> dict[str, int]:
        return {p: len(df) for p, df in self.parts.items()}


def fold_bags(task: Any, labels: pd.DataFrame, splits: Any, fold: int,
              available: Any = None, unavailable_reason: str = "no data for this slide") -> FoldBags:
    """Bags of `fold` of `splits` (bench.data.splits.Splits) for `task`, fitted on train.

    Args:
        task: an unfitted task (bench.evaluation.tasks.make_task).
        labels: slide-level table with slide_id, patient_id and the task's targets
            (`Cohort.table`).
        available: slide ids that have data (coords or features); others are
            dropped and listed in `FoldBags.dropped`. None keeps every slide.
        unavailable_reason: the reason recorded for slides outside `available`.

    Raises:
        DataError: the split lists slides that are not in `labels`, the train part
            is empty after dropping, or a part loses every bag.
    """
    table = labels.copy()
    table["slide_id"] = table["slide_id"].astype(str)
    rows = splits.table[splits.table["fold"] == fold]
    if rows.empty:
        raise ConfigError(f"split {splits.path} has no fold {fold}; folds: {splits.folds}")
    unknown = sorted(set(rows["slide_id"]) - set(table["slide_id"]))
    if unknown:
        raise DataError(f"split {splits.path} lists {len(unknown)} slide(s) not in the labels table, e.g. "
                        f"{unknown[:3]}; the split belongs to another cohort: write a new one with `bench split`")
    part_of = dict(zip(rows["slide_id"], rows["part"]))
    dropped: list[tuple[str, str]] = []
    keep = set(part_of)
    if available is not None:
        have = {str(s) for s in available}
        dropped = [(s, unavailable_reason) for s in sorted(keep - have)]
        keep &= have
    table = table[table["slide_id"].isin(keep)]
    bags = task.bag_frame(table)
    bags["part"] = [part_of[ids[0]] for ids in bags["slide_ids"]]
    parts = {p: bags[bags["part"] == p].drop(columns="part").reset_index(drop=True) for p in ("train", "val", "test")}
    for p in ("train", "test"):
        if parts[p].empty:
            raise DataError(f"fold {fold} of {splits.path} has no {p} bag with data"
                            + (f" ({len(dropped)} slide(s) dropped: {dropped[0][1]})" if dropped else ""))
    fitted = task.fit(task.targets_from_frame(parts["train"]))
    return FoldBags(task=fitted, parts=parts, split_path=Path(splits.path), split_sha256=splits.sha256,
                    fold=int(fold), dropped=tuple(dropped))
