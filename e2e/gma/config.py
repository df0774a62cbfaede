"""GMA settings and job files: `GMAConfig` (validated parameters of one run), and the JSON /
TOML job a rank reads (`bags_to_dict`, `cohort_to_dict`, `job_from_config`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from bench.common.checks import check_choice, check_int, check_positive
from bench.common.errors import ConfigError
from bench.evaluation.training import FoldBags

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
        from bench.common.files import config_hash

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

    from bench.evaluation.tasks import make_task

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
    from bench.data.cohort import load_cohort

    return load_cohort(d["root"], name=d["name"], task=d["task"], classes=d["classes"], labels=d["labels"],
                       slide_dir=d["slide_dir"])

# ----------------------------------------------------------------------------- hand-written TOML jobs


def job_from_config(path: Path) -> dict[str, Any]:
    """A job from a hand-written TOML file (multi-node runs without `bench train`); see README."""
    import tomllib

    from bench.data.splits import load_splits
    from bench.data.tiling import Tiling
    from bench.evaluation.tasks import make_task
    from bench.evaluation.training import fold_bags

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

