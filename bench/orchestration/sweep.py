"""`bench sweep`: Optuna hyperparameter search for one method of a suite, on validation only.

    bench sweep --suite subtyping --method two-stage/resnet50-trunc/abmil --trials 20

- Search space: the method's `[methods.search]` table in the suite; a key
  `aggregator.<p>` targets the aggregator's parameter `p`, any other key the trainer's.
- Objective: the best validation value of the task's primary metric over the
  epochs of a trial (the value model selection would pick). Trials train with
  `predict_test=False`: the test part of the split is never read, so a sweep
  cannot leak the test set into the choice of parameters. Tuning is nested:
  every split (seed x fold) has its own study on its own train/validation parts
  (`--seed` / `--fold` restrict to one), and `bench run --params best` uses on
  each split the parameters tuned on that split.
- Study: stored in SQLite at `sweeps/<suite>/<method>/<dataset>/<split>/study.db` by
  default; `--storage` takes any Optuna RDB URL (PostgreSQL, MySQL), so several
  machines can work on one study. TPE sampler seeded with `seed + number of
  trials already in the study` (a resumed sweep does not replay the same random
  start-up points); median pruner fed the per-epoch validation metric.
- Resumable: rerunning adds `--trials` more trials to the same study. Trials
  send a heartbeat; the trial of a killed worker is marked failed and retried
  (up to twice) by the next worker. A trial that raises or goes NaN is recorded
  as failed and the study goes on.
- Results: `best.json` (best parameters, value, trial counts, parameter
  importances) and `trials.csv` next to the study; `bench run --params best`
  trains with the best parameters, and `bench leaderboard` shows the sweep.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.common.console import info, warn
from bench.common.errors import ConfigError, TrainingError
from bench.common.files import write_json_atomic, write_text_atomic
from bench.data.layout import Layout
from bench.evaluation.records import split_tag
from bench.evaluation.sweeps import sweep_dir
from bench.orchestration.suite import MethodSpec, SearchParam, Suite

HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 120
MAX_RETRY = 2


def default_storage(layout: Layout, suite: str, method: str, dataset: str, split: str) -> str:
    return f"sqlite:///{(sweep_dir(layout, suite, method, dataset, split) / 'study.db').resolve()}"


def study_name(suite: str, method: str, dataset: str, split: str) -> str:
    return f"{suite}:{dataset}:{method}:{split}"


def suggest(trial: Any, name: str, space: SearchParam) -> Any:
    """One Optuna suggestion from a suite search-space entry."""
    if space.type == "categorical":
        return trial.suggest_categorical(name, list(space.choices))
    if space.type == "int":
        step = int(space.step) if space.step else 1
        return trial.suggest_int(name, int(space.low), int(space.high), step=step, log=space.log)
    return trial.suggest_float(name, float(space.low), float(space.high), step=space.step, log=space.log)


@contextlib.contextmanager
def _setup_lock(storage: str) -> Iterator[None]:
    """Hold an exclusive lock beside a SQLite study file while the storage is set up.

    Two sweeps that start at once on a new file otherwise race to create its
    tables (one fails with "table studies already exists"). Other databases
    handle concurrent set-up themselves or are retried by `open_study`.
    """
    prefix = "sqlite:///"
    path = storage[len(prefix):] if storage.startswith(prefix) else ""
    if not path or path.startswith(":memory:"):
        yield
        return
    import fcntl

    lock = Path(f"{path}.setup-lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # blocks until the other sweep has set the file up
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _rdb_storage(storage: str) -> Any:
    import inspect

    from optuna.storages import RDBStorage, RetryFailedTrialCallback

    engine_kwargs = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {}
    retry = RetryFailedTrialCallback(max_retry=MAX_RETRY)
    # optuna >= 4.9 names the callback for trials whose heartbeat stopped (a killed worker)
    key = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback"
           in inspect.signature(RDBStorage).parameters else "failed_trial_callback")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the retry callback's own deprecation notice
        return RDBStorage(storage, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                          engine_kwargs=engine_kwargs, **{key: retry})


def open_study(storage: str, name: str, seed: int, *, create: bool = True, attempts: int = 3) -> Any:
    """Load or create the study behind `storage` with heartbeats, retries, TPE and the median pruner.

    Several sweeps may open one study at once (several machines on one
    PostgreSQL/MySQL study, or two terminals on one SQLite file): set-up is
    serialised for SQLite and retried `attempts` times elsewhere.
    """
    last: Exception | None = None
    for attempt in range(attempts):
        try:
            with _setup_lock(storage):
                return _open_study(storage, name, seed, create=create)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - sqlalchemy raises many types for a bad URL or a set-up race
            last = exc
            time.sleep(0.5 * (attempt + 1))
    raise ConfigError(f"cannot open Optuna storage {storage!r}: {last}. Use an RDB URL such as "
                      "sqlite:///path/study.db or postgresql://user@host/db") from None


def _open_study(storage: str, name: str, seed: int, *, create: bool) -> Any:
    import optuna

    rdb = _rdb_storage(storage)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    # The sampler seed moves with the study's size: a resumed or parallel sweep does not replay
    # the random start-up points already tried.
    existing = 0
    try:
        existing = len(optuna.load_study(study_name=name, storage=rdb).trials)
    except KeyError:
        pass
    sampler = optuna.samplers.TPESampler(seed=seed + existing)
    return optuna.create_study(study_name=name, storage=rdb, sampler=sampler, pruner=pruner, direction="maximize",
                               load_if_exists=create)


def summarize_study(study: Any, *, dataset: str, method: str, metric: str, storage: str) -> dict[str, Any]:
    """The `best.json` content of a study (counts, best trial, importances)."""
    import optuna
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None
    importances: dict[str, float] = {}
    if len(complete) >= 2 and best is not None and best.params:
        try:
            importances = {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
        except Exception as exc:  # noqa: BLE001 - importances are a nicety; a degenerate study may refuse them
            warn(f"parameter importances not computed: {exc}")
    return {
        "study": study.study_name, "storage": _redact(storage), "dataset": dataset, "method": method,
        "metric": f"val_{metric}", "direction": "maximize", "n_trials": len(trials),
        "n_complete": count[TrialState.COMPLETE], "n_pruned": count[TrialState.PRUNED],
        "n_failed": count[TrialState.FAIL],
        "best_value": None if best is None else float(best.value),
        "best_trial": None if best is None else best.number,
        "best_params": None if best is None else dict(best.params),
        "importances": importances,
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _redact(url: str) -> str:
    """A storage URL without its password (best.json is meant to be shared)."""
    if "://" in url and "@" in url.split("://", 1)[1]:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url


def _val_value(logged: Mapping[str, Any], metric: str) -> float | None:
    for key in (f"val_{metric}", metric):
        v = logged.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            return float(v)
    val = logged.get("val")
    if isinstance(val, Mapping) and isinstance(val.get(metric), (int, float)):
        return float(val[metric])
    return None


def run_sweep(suite: Suite, method_name: str, n_trials: int, options: Any, *, dataset: str | None = None,
              storage: str | None = None, seed: int | None = None, fold: int | None = None,
              timeout: float | None = None, keep_trials: bool = False) -> dict[str, dict[str, Any]]:
    """Add `n_trials` trials to the study of every split (seed x fold) of (suite, method, dataset).

    Nested tuning: each split has its own study, trained and scored on that split's train and
    validation parts only, so the parameters `bench run --params best` uses on a split were never
    tuned on data that holds that split's test patients (with k folds, fold 0's train part holds
    the test patients of every other fold; with several seeds, likewise across seeds).

    Args:
        options: bench.orchestration.runner.RunOptions (workdir, data root, device).
        dataset: which dataset to tune on (default: the suite's only dataset; required when it has several).
        seed / fold: tune only this seed / fold (default: every seed of the suite and every fold it runs).
        keep_trials: keep each trial's weights (by default only its history is kept).

    Returns:
        split tag (e.g. "kfold-seed0-fold2") -> the new `best.json` content of its study.
    """
    from bench.orchestration.runner import prepare_fold

    if not isinstance(n_trials, int) or n_trials < 1:
        raise ConfigError(f"--trials must be a positive integer, got {n_trials!r}")
    method: MethodSpec = suite.method(method_name)
    if not method.search:
        raise ConfigError(f"method {method_name!r} of suite {suite.name!r} has no search space; add a "
                          "[methods.search] table to the suite (e.g. lr = {{ type = \"float\", low = 1e-5, "
                          "high = 1e-3, log = true }})")
    if dataset is None:
        if len(suite.datasets) != 1:
            raise ConfigError(f"suite {suite.name!r} has several datasets ({', '.join(d.name for d in suite.datasets)}); "
                              "choose one with --dataset")
        dataset = suite.datasets[0].name
    ds = suite.dataset(dataset)
    seeds = suite.seeds if seed is None else (int(seed),)
    results: dict[str, dict[str, Any]] = {}
    for s in seeds:
        first = prepare_fold(suite, method.name, ds.name, options, seed=s, fold=fold)
        folds = [first.fold] if fold is not None else list(ds.folds or first.prep.splits[s].folds)
        for f in folds:
            job = first if f == first.fold else first.with_fold(f)
            tag = split_tag(job.prep.splits[s].protocol, s, f)
            results[tag] = _sweep_split(job, tag, n_trials, options, storage=storage, timeout=timeout,
                                        keep_trials=keep_trials)
    return results


def _sweep_split(job: Any, tag: str, n_trials: int, options: Any, *, storage: str | None, timeout: float | None,
                 keep_trials: bool) -> dict[str, Any]:
    """Add `n_trials` trials to the study of one split; returns its `best.json` content."""
    import optuna

    from bench.evaluation.training import discard_checkpoint

    suite, method, ds, seed, fold = job.suite, job.method, job.prep.spec, job.seed, job.fold
    bags, splits = job.bags, job.prep.splits[seed]
    layout = Layout(options.workdir)
    folder = sweep_dir(layout, suite.name, method.name, ds.name, tag)
    folder.mkdir(parents=True, exist_ok=True)
    storage = storage or default_storage(layout, suite.name, method.name, ds.name, tag)
    if bags.parts["val"].empty:
        raise ConfigError(f"dataset {ds.name!r}: split {splits.path.name} fold {fold} has no validation part, and "
                          "a sweep is scored on validation only; set split.val_fraction > 0 in the suite")
    metric = bags.task.primary_metric
    study = open_study(storage, study_name(suite.name, method.name, ds.name, tag), seed)

    def objective(trial: Any) -> float:
        values = {k: suggest(trial, k, space) for k, space in method.search.items()}
        out = folder / "trials" / f"{trial.number:04d}"

        def report(epoch: int, logged: dict) -> None:
            value = _val_value(logged, metric)
            if value is None:
                return
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch} (val {metric} {value:.4f})")

        try:
            result = job.train(values, out, epoch_callback=report, predict_test=False)
        finally:
            if not keep_trials:
                for w in out.glob("*.safetensors"):
                    w.unlink()
                discard_checkpoint(out)
        if "test" in result.predictions:  # a trainer bug would leak the test set into the choice
            raise TrainingError("a sweep trial predicted the test split; refusing its value")
        if result.best_value is None or not math.isfinite(result.best_value):
            raise TrainingError(f"trial {trial.number} produced no finite validation {metric}")
        write_json_atomic(out / "history.json", {"params": values, "history": result.history,
                                                 "best_epoch": result.best_epoch})
        trial.set_user_attr("best_epoch", result.best_epoch)
        return float(result.best_value)

    info(f"sweep {study.study_name}: {n_trials} more trial(s) on {ds.name} {tag} (val {metric}); "
         f"storage {_redact(storage)}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=n_trials, timeout=timeout, catch=(Exception,), gc_after_trial=True)
    best = summarize_study(study, dataset=ds.name, method=method.name, metric=metric, storage=storage)
    # what the study saw: a reader (and a test) can check that no test patient of this split was used
    tuned_on = sorted({str(p) for part in ("train", "val") for p in bags.parts[part]["patient_id"]})
    best["split"] = {"tag": tag, "path": str(splits.path), "sha256": splits.sha256, "seed": seed, "fold": fold}
    best["tuned_on_patients"] = tuned_on
    write_json_atomic(folder / "best.json", best)
    write_text_atomic(folder / "trials.csv", study.trials_dataframe().to_csv(index=False))
    return best


__all__ = ["run_sweep", "default_storage", "study_name", "open_study", "summarize_study",
           "suggest"]
