"""Run records: one folder per run, the only input of the leaderboards.

    runs/<suite>/<dataset>/<paradigm>/<encoder>/<aggregator>/<split>/
        run.json             what ran, on which split file, how well, at what cost
        predictions.csv      test predictions (the `bench.evaluation.tasks` predictions table)
        predictions-val.csv  validation predictions of the selected weights
        *.safetensors        weights written by the trainer
        attention.h5         per-patch attention of the test slides (`bench heatmap`), where the model has it
        run-failed.json      a failed rerun, kept beside a finished run.json that it does not replace
        run-skipped.json     a run this machine cannot run (e.g. 2DMamba without its CUDA kernel), with the reason

`write_run` turns a trainer's `TrainResult` into a record: the test predictions get
their bootstrap intervals here (`bench.evaluation.metrics.bootstrap_metrics`, patient-level,
seeded), so every paradigm is evaluated by the same code. A failed run is recorded
too, with `status = "failed"` and its error, never dropped: the runner skips a run
only when its record is `ok` and has the same config hash (`is_current`).

run.json (schema 1), keys:
    schema, suite, dataset, task {kind, primary_metric, metrics, higher_is_better,
    classes, spec}, method {name, paradigm, encoder, aggregator, params,
    aggregator_params, weights_id, random_init, params_source}, paradigm, encoder,
    aggregator, params, split {path, sha256, protocol, seed, fold, tag}, seed,
    config_hash, status, error, started, ended, metrics {name: MetricCI fields}
    (test split), operating_point {rule, threshold, val_balanced_accuracy, n_val | why}
    (binary classification: chosen on validation predictions only), val {metric, best_epoch,
    best_value}, costs, attention, history,
    weights, n_test, versions, device, host, synthetic, command, extra.

Nothing here imports a model package (DESIGN.md: core modules never do).
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common.errors import DataError, MissingFileError
from bench.common.files import write_json_atomic, write_text_atomic
from bench.data.layout import Layout

if TYPE_CHECKING:
    import pandas as pd

    from bench.evaluation.training import TrainResult

SCHEMA = 1
RUN_FILE = "run.json"
# a failed rerun of a finished run: written beside run.json, which keeps the finished result
FAILED_FILE = "run-failed.json"
SKIPPED_FILE = "run-skipped.json"  # a run this machine cannot run (bench run writes it; the leaderboard lists it)
PREDICTIONS = {"test": "predictions.csv", "val": "predictions-val.csv"}
STATUSES = ("ok", "failed")


def split_tag(protocol: str, seed: int, fold: int) -> str:
    """The folder name of one fold of one split file, e.g. `holdout-seed0-fold0`."""
    return f"{protocol}-seed{int(seed)}-fold{int(fold)}"


def _jsonable(obj: Any) -> Any:
    """Plain JSON values: numpy scalars and arrays, paths, tuples; NaN/inf become null."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy scalar or array, torch tensor
        return _jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


@dataclass(frozen=True)
class RunRecord:
    """One run.json (as read back) and the folder it lives in."""

    run_dir: Path
    data: Mapping[str, Any]
    name: str = RUN_FILE  # run.json, or run-failed.json for a failed rerun kept beside a finished record

    @property
    def path(self) -> Path:
        return self.run_dir / self.name

    @property
    def status(self) -> str:
        return str(self.data.get("status"))

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def metrics(self) -> dict[str, dict[str, Any]]:
        return dict(self.data.get("metrics") or {})

    @property
    def costs(self) -> dict[str, Any]:
        return dict(self.data.get("costs") or {})

    @property
    def method(self) -> str:
        return str(self.data["method"]["name"])

    @property
    def dataset(self) -> str:
        return str(self.data["dataset"])

    @property
    def split(self) -> str:
        return str(self.data["split"]["tag"])

    def task(self) -> Any:
        """The task of the run, rebuilt from the record (for paired comparisons)."""
        from bench.evaluation.tasks import make_task

        return make_task(**dict(self.data["task"]["spec"]))

    def predictions(self, part: str = "test") -> pd.DataFrame:
        """The predictions table of `part` ("test" or "val")."""
        import pandas as pd

        if part not in PREDICTIONS:
            raise ValueError(f"part must be one of {sorted(PREDICTIONS)}, got {part!r}")
        path = self.run_dir / PREDICTIONS[part]
        if not path.is_file():
            raise MissingFileError(f"run {self.run_dir} has no {PREDICTIONS[part]} (status {self.status}); "
                                   "rerun it with `bench run ... --force`")
        return pd.read_csv(path, dtype={"bag_id": str, "patient_id": str})


def load_run(run_dir: str | Path, name: str = RUN_FILE) -> RunRecord:
    """Read `run_dir/run.json` (or `name`, e.g. FAILED_FILE); a missing or damaged file is an error naming it."""
    run_dir = Path(run_dir)
    path = run_dir / name
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingFileError(f"no run record at {path}") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"run record {path} cannot be read ({exc}); delete the folder and rerun") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise DataError(f"run record {path} is not a schema-{SCHEMA} record (schema "
                        f"{data.get('schema') if isinstance(data, dict) else None!r}); rerun it with --force")
    return RunRecord(run_dir, data, name)


def iter_runs(workdir: str | Path, suite: str | None = None, *, failed_reruns: bool = False) -> list[RunRecord]:
    """Every readable record under `workdir/runs[/suite]`, sorted by suite, dataset, method, split.

    Damaged records are left out with a warning (they are rerun by the next `bench run`).
    `failed_reruns` adds the failed reruns kept beside finished records (`run-failed.json`).
    """
    from bench.common.console import warn

    root = Layout(Path(workdir)).runs_root(suite)
    if not root.is_dir():
        return []
    records = []
    names = (RUN_FILE, FAILED_FILE) if failed_reruns else (RUN_FILE,)
    for path in sorted(p for name in names for p in root.rglob(name)):
        try:
            records.append(load_run(path.parent, path.name))
        except (DataError, MissingFileError) as exc:
            warn(str(exc))
    records.sort(key=lambda r: (str(r.data.get("suite")), r.dataset, r.method, r.split, not r.ok))
    return records


def is_current(run_dir: str | Path, config_hash: str) -> bool:
    """True when `run_dir` holds a finished (ok) record of the same configuration."""
    try:
        record = load_run(run_dir)
    except (DataError, MissingFileError):
        return False
    return (record.ok and record.data.get("config_hash") == config_hash
            and (record.run_dir / PREDICTIONS["test"]).is_file())


def _task_block(task: Any) -> dict[str, Any]:
    spec = task.to_dict()
    classes = spec.get("classes")
    if classes is None and hasattr(task, "classes") and task.kind != "survival":
        classes = list(task.classes)
    return {"kind": task.kind, "primary_metric": task.primary_metric, "metrics": list(task.metric_names),
            "higher_is_better": dict(task.higher_is_better), "classes": classes, "spec": spec}


def _host() -> dict[str, str]:
    from bench.evaluation.costs import cpu_model

    return {"platform": platform.platform(), "cpu": cpu_model(), "python": platform.python_version()}


def write_run(run_dir: str | Path, *, suite: str, dataset: str, task: Any, method: Mapping[str, Any],
              split: Mapping[str, Any], seed: int, config_hash: str, result: TrainResult | None, status: str,
              error: str | None, started: str, ended: str, n_bootstrap: int = 1000, bootstrap_seed: int = 0,
              synthetic: bool = False, command: str | None = None,
              extra: Mapping[str, Any] | None = None) -> RunRecord:
    """Evaluate `result` on its test predictions and write the run's record (atomically).

    Args:
        task: the task fitted on the training part (`FoldBags.task`).
        method: name, paradigm, encoder, aggregator, params, aggregator_params, weights_id, ...
        split: path, sha256, protocol, seed, fold of the split file.
        result: the trainer's result; None for a run that failed before producing one.
        status: "ok" or "failed"; an ok run needs test predictions.
        n_bootstrap / bootstrap_seed: resamples of the test set for the intervals.

    Raises:
        DataError: an ok result without test predictions, or predictions the bootstrap refuses
            (the caller records the run as failed then).
    """
    from bench.evaluation.costs import software_versions
    from bench.evaluation.metrics import bootstrap_metrics

    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # A finished result is replaced only by a newer finished result: a failing rerun (a typo in a
    # parameter, a crash) is recorded beside it and leaves run.json, predictions and weights as they were.
    keep_finished = status == "failed" and _finished(run_dir)
    metrics: dict[str, Any] = {}
    n_test = 0
    operating_point = None
    if status == "ok":
        if result is None or "test" not in result.predictions:
            raise DataError(f"run {run_dir}: the trainer returned no test predictions")
        if hasattr(task, "with_operating_point"):  # chosen on validation predictions only, before the test is scored
            task, operating_point = task.with_operating_point(result.predictions.get("val"))
        test = result.predictions["test"]
        n_test = len(test)
        metrics = {m: ci.to_dict() for m, ci in
                   bootstrap_metrics(task, test, n_resamples=n_bootstrap, seed=bootstrap_seed).items()}
    # predictions first, the record last: a record never points at missing files
    for part, name in ({} if keep_finished else PREDICTIONS).items():
        frame = result.predictions.get(part) if result is not None else None
        path = run_dir / name
        if frame is not None and status == "ok":
            write_text_atomic(path, frame.to_csv(index=False))
        elif path.exists():
            path.unlink()  # a failed rerun leaves no stale predictions behind
    params = dict(result.params) if result is not None and result.params else dict(method.get("params") or {})
    costs = dict(result.costs) if result is not None else {}
    data = {
        "schema": SCHEMA, "suite": suite, "dataset": dataset, "task": _task_block(task),
        "method": dict(method), "paradigm": method.get("paradigm"), "encoder": method.get("encoder"),
        "aggregator": method.get("aggregator"), "params": params,
        "split": {**dict(split), "tag": split_tag(split["protocol"], split["seed"], split["fold"])},
        "seed": int(seed), "config_hash": config_hash, "status": status, "error": error,
        "operating_point": operating_point,
        "started": started, "ended": ended, "metrics": metrics,
        "val": {"metric": task.primary_metric, "best_epoch": getattr(result, "best_epoch", None),
                "best_value": getattr(result, "best_value", None)},
        "costs": costs, "attention": dict(result.attention) if result is not None else {},
        "history": list(result.history) if result is not None else [],
        "weights": {k: Path(v).name for k, v in (result.weights.items() if result is not None and not keep_finished
                                                 else ())},
        "n_test": n_test, "bootstrap": {"n_resamples": int(n_bootstrap), "seed": int(bootstrap_seed)},
        "versions": software_versions(), "device": costs.get("device"), "host": _host(),
        "synthetic": bool(synthetic), "command": command,
        "extra": {**dict(extra or {}), **(dict(result.extra) if result is not None else {})},
    }
    if keep_finished:
        data["extra"]["kept_finished_record"] = RUN_FILE
        write_json_atomic(run_dir / FAILED_FILE, _jsonable(data))
        return load_run(run_dir, FAILED_FILE)
    write_json_atomic(run_dir / RUN_FILE, _jsonable(data))
    if status == "ok":
        (run_dir / FAILED_FILE).unlink(missing_ok=True)  # an older failed rerun is superseded
    return load_run(run_dir)


def _finished(run_dir: Path) -> bool:
    """True when `run_dir` holds an ok record whose test predictions exist."""
    try:
        record = load_run(run_dir)
    except (DataError, MissingFileError):
        return False
    return record.ok and (run_dir / PREDICTIONS["test"]).is_file()


def format_interval(mean: float, low: float, high: float) -> str:
    """`mean [low, high]` with 3 decimals: how runs, the console and the leaderboards show an interval."""
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def _fmt_ci(ci: Mapping[str, Any] | None) -> str:
    return format_interval(ci["mean"], ci["low"], ci["high"]) if ci else ""


def runs_table(records: list[RunRecord]) -> str:
    """The records as a GitHub-Markdown table (what `bench runs` prints)."""
    from tabulate import tabulate

    rows = []
    for r in records:
        primary = r.data["task"]["primary_metric"]
        costs = r.costs
        rows.append([
            r.data.get("suite"), r.dataset, r.method, r.split, r.status,
            f"{primary} {_fmt_ci(r.metrics.get(primary))}" if r.ok else (r.data.get("error") or "")[:70],
            f"{costs['train_seconds']:.1f}" if costs.get("train_seconds") is not None else "",
            f"{costs['infer_seconds_per_slide']:.3f}" if costs.get("infer_seconds_per_slide") is not None else "",
            str(r.data.get("ended") or "")[:19],
        ])
    return tabulate(rows, headers=["suite", "dataset", "method", "split", "status", "test (primary) / error",
                                   "train s", "infer s/slide", "ended"], tablefmt="github")


__all__ = ["RunRecord", "SCHEMA", "PREDICTIONS", "RUN_FILE", "FAILED_FILE", "SKIPPED_FILE", "split_tag", "write_run", "load_run", "iter_runs", "is_current",
           "runs_table", "format_interval"]
