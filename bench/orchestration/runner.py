"""`bench run`: every stage of a suite, cached and resumable.

For each dataset of a suite:

1. **cohort**: `--data-root DIR` -> `DIR/<dataset.data>/` (labels.csv + slides/); without
   it, a synthetic cohort of the matching kind is written to `<workdir>/data/<dataset>`
   (demo suites only; a given `--data-root` that is wrong is an error, never a silent
   fall-back to synthetic data).
2. **tile** every magnification the methods need (two-stage tiling; E2E main + context
   scales; GMA main scale).
3. **split** one file per seed (`splits/<dataset>/<protocol>-seed<k>.csv`), written once
   and verified afterwards; every method reads the same file.
4. **extract** features once per two-stage encoder (and weights).
5. **train + evaluate** every method x seed x fold: a run record under
   `runs/<suite>/<dataset>/<method>/<split>/` (bench.evaluation.records). A run whose record is
   current (same config hash) is skipped; a failing method is recorded as failed
   and the others go on; Ctrl-C keeps everything finished (trainers checkpoint
   every epoch, so the next run resumes the interrupted one).
6. **leaderboard** `leaderboards/<suite>.md` (+ plots), printed at the end.

Each stage is cached by its own outputs (coords/feature files carry their config
hash, split files their sha256, run records the run's config hash).
"""

from __future__ import annotations

import dataclasses
import json
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import __version__
from bench.common.console import info, warn
from bench.evaluation.costs import StageTimer
from bench.evaluation.records import SKIPPED_FILE
from bench.common.errors import BenchError, ConfigError, MissingFileError, WriteError
from bench.common.files import config_hash
from bench.data.layout import Layout, mag_tag
from bench.orchestration.claims import LeaseLost
from bench.orchestration.suite import DatasetSpec, MethodSpec, Suite, thaw

if TYPE_CHECKING:
    from bench.data.cohort import Cohort
    from bench.data.splits import Splits
    from bench.evaluation.training import EpochCallback, FoldBags, TrainResult

SYNTHETIC_KIND = {"classification": "subtyping", "grading": "grading", "survival": "survival"}
# Random initialisation of a two-stage encoder uses one fixed seed, so every training seed
# reads the same features (the features are an input of the method, not part of its seed).
FEATURE_INIT_SEED = 0


@dataclass(frozen=True)
class RunOptions:
    """What `bench run` was asked to do (besides the suite)."""

    workdir: Path = Path("workdir")
    data_root: Path | None = None
    datasets: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    seeds: tuple[int, ...] | None = None
    device: str = "auto"
    params: str = "suite"  # "suite" | "best" (parameters from `bench sweep`)
    leaderboards: Path | None = Path("leaderboards")
    force: bool = False
    extract_workers: int | None = None  # None: chosen by ExtractOptions.settings
    command: str | None = None
    features_dir: Path | None = None  # `bench train --features DIR`: two-stage features read there, never written

    def __post_init__(self) -> None:
        if self.params not in ("suite", "best"):
            raise ConfigError(f"--params must be 'suite' or 'best', got {self.params!r}")


@dataclass
class RunOutcome:
    dataset: str
    method: str
    split: str
    status: str  # "ok", "failed", "cached", "skipped" (an optional extra this machine cannot run)
    run_dir: Path
    primary: str | None = None
    error: str | None = None
    record: Path | None = None  # the record written (run.json, or run-failed.json beside a finished one)


@dataclass
class SuiteReport:
    outcomes: list[RunOutcome] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stage_notes: dict[str, list[str]] = field(default_factory=dict)  # stage -> settings it ran with
    leaderboard: Path | None = None
    skipped_slides: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    @property
    def failed(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


# ----------------------------------------------------------------------------- datasets


@dataclass
class PreparedDataset:
    """A dataset after the cohort, tiling and split stages."""

    spec: DatasetSpec
    cohort: Cohort
    synthetic: bool
    tiles: dict[tuple[float, int], Path]  # (magnification, patch size) -> coords folder
    tiled: dict[tuple[float, int], set[str]]  # slides with a coords file there
    splits: dict[int, Splits]  # seed -> split file
    skipped: list[tuple[str, str]]


def cohort_folder(ds: DatasetSpec, data_root: Path | None, layout: Layout) -> tuple[Path, bool]:
    """(cohort folder, synthetic?) of a dataset; a wrong --data-root is an error."""
    if data_root is None:
        return layout.data_dir(ds.name), True
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise MissingFileError(f"--data-root {root} does not exist or is not a folder; it must hold one folder per "
                               f"dataset (here {ds.data}/ with {ds.labels} and slides/)")
    folder = root / ds.data
    if not (folder / ds.labels).is_file():
        present = sorted(p.name for p in root.iterdir() if p.is_dir())[:10]
        raise MissingFileError(
            f"dataset {ds.name!r}: {folder / ds.labels} does not exist. With --data-root, each dataset needs "
            f"DIR/{ds.data}/{ds.labels} (slide_id, patient_id, label | time, event) and DIR/{ds.data}/slides/. "
            f"Folders found in {root}: {present or 'none'}. Without --data-root the suite runs on synthetic data.")
    return folder, False


def _is_synthetic(folder: Path) -> bool:
    """True for a cohort written by `bench synth` (its cohort.json says so), wherever it lives."""
    try:
        return bool(json.loads((folder / "cohort.json").read_text(encoding="utf-8")).get("synthetic", False))
    except (OSError, ValueError):
        return False


def make_synthetic(ds: DatasetSpec, folder: Path) -> Path:
    """Write (or reuse) the synthetic cohort of a dataset from its `synthetic` table."""
    from bench.data.synthetic import CohortSettingsError, SyntheticSpec, make_cohort

    settings = dict(thaw(ds.synthetic))
    settings.setdefault("kind", SYNTHETIC_KIND[ds.task])
    if ds.classes is not None and settings["kind"] != "survival":
        settings.setdefault("classes", tuple(ds.classes))
    spec = SyntheticSpec(**settings)
    try:
        return make_cohort(spec, folder)
    except CohortSettingsError as exc:
        # the harness never deletes a cohort folder, even one it wrote: the user decides
        raise ConfigError(f"{folder} holds a synthetic cohort written with other settings than dataset {ds.name!r} "
                          "now asks for (an earlier version of the suite's [demo] table?); tiles, features and "
                          "splits made from it would not match. Use a new work folder (--workdir DIR) or delete "
                          "this work folder to rebuild the demo from scratch") from exc


def tilings_needed(ds: DatasetSpec, methods: Sequence[MethodSpec]) -> list[tuple[float, int]]:
    """(magnification, patch size) pairs the methods of a dataset read."""
    need: list[tuple[float, int]] = []
    for m in methods:
        if m.paradigm == "two-stage":
            need.append((ds.two_stage.magnification, ds.two_stage.patch_size))
        elif m.paradigm == "e2e":
            need += [(mag, ds.e2e.patch_size) for mag in ds.e2e.magnifications]
        else:  # gma: whole slides at the main scale
            need.append((ds.e2e.magnification, ds.e2e.patch_size))
    return list(dict.fromkeys(need))


def make_task_for(ds: DatasetSpec, cohort: Cohort) -> Any:
    """The dataset's task (unfitted) from the suite and the cohort's classes."""
    from bench.evaluation.tasks import make_task

    params: dict[str, Any] = dict(thaw(ds.task_params))
    if ds.primary_metric:
        params["primary_metric"] = ds.primary_metric
    if ds.task == "classification":
        params["classes"] = cohort.classes
        if ds.oversample is not None:
            params["oversample_ratio"] = ds.oversample
    elif ds.task == "grading":
        params["n_grades"] = len(cohort.classes or ())
    return make_task(ds.task, **params)


def open_cohort(ds: DatasetSpec, options: RunOptions, timer: StageTimer) -> tuple[Cohort, bool]:
    """(cohort, synthetic?) of a dataset: the cohort stage (writes the synthetic cohort when there is no --data-root)."""
    from bench.data.cohort import load_cohort

    folder, synthetic = cohort_folder(ds, options.data_root, Layout(options.workdir))
    if synthetic:
        with timer.stage("synthesize"):
            info(f"[{ds.name}] synthetic cohort in {folder} (no --data-root: demo data)")
            make_synthetic(ds, folder)
    # a cohort the harness wrote has labels.csv, whatever the real dataset's labels file is called
    labels = "labels.csv" if synthetic else ds.labels
    cohort = load_cohort(folder, name=ds.name, task=ds.task, classes=ds.classes, labels=labels)
    synthetic = synthetic or _is_synthetic(folder)
    if ds.mpp is not None:  # slides that record no resolution use the suite's mpp
        cohort = replace(cohort, table=cohort.table.assign(mpp=cohort.table["mpp"].fillna(ds.mpp)))
    return cohort, synthetic


def prepare_dataset(suite: Suite, ds: DatasetSpec, options: RunOptions, timer: StageTimer) -> PreparedDataset:
    """Cohort, tiles and split files of one dataset (each stage skips what is done)."""
    from bench.data.splits import write_splits
    from bench.data.tiling import TileParams, tile_slides

    layout = Layout(options.workdir)
    cohort, synthetic = open_cohort(ds, options, timer)
    skipped: dict[str, str] = {}
    tiles, tiled = {}, {}
    for mag, px in tilings_needed(ds, suite.methods):
        out = layout.tiles_dir(ds.name, mag, px)
        with timer.stage("tile"):
            report = tile_slides(cohort.slide_jobs(), out, TileParams(magnification=mag, patch_size=px))
        new = sum(not r.skipped for r in report.done)
        info(f"[{ds.name}] tile {mag_tag(mag, px)}: {len(report.done)} slides ({new} new), "
             f"{report.n_patches} patches" + (f", {len(report.skipped)} skipped" if report.skipped else ""))
        for sid, why in report.skipped:
            skipped.setdefault(sid, why)
        tiles[(mag, px)] = out
        tiled[(mag, px)] = {r.slide_id for r in report.done if r.n_patches > 0}
        for r in report.done:
            if r.n_patches == 0:
                skipped.setdefault(r.slide_id, f"no tissue patch at {mag_tag(mag, px)}")
    splits = {}
    with timer.stage("split"):
        for seed in options.seeds or suite.seeds:
            splits[seed] = write_splits(cohort, options.workdir, ds.split_spec(), seed=seed, dataset=ds.name)
            info(f"[{ds.name}] split {splits[seed].path.name} sha256 {splits[seed].sha256[:12]}")
    for sid, why in skipped.items():
        warn(f"[{ds.name}] slide {sid} left out: {why}")
    return PreparedDataset(ds, cohort, synthetic, tiles, tiled, splits, sorted(skipped.items()))


# ----------------------------------------------------------------------------- features


@dataclass
class FeatureSet:
    """Features of one encoder (and weights) for a dataset, or why there are none."""

    folder: Path | None
    weights_id: str | None
    slides: set[str]
    error: str | None = None


def encoder_spec_for(encoder: str, input_size: int) -> Any:
    from baselines.encoders import get_encoder

    spec = get_encoder(encoder)
    return spec if input_size == spec.input_size else spec.with_input_size(input_size)


def extract_features(prep: PreparedDataset, method: MethodSpec, options: RunOptions, timer: StageTimer,
                     cache: dict[tuple, FeatureSet]) -> FeatureSet:
    """Extract (or reuse) the features a two-stage method reads; errors are returned, not raised."""
    from baselines.extract import ExtractOptions, extract_cohort, pending_slides
    from baselines.features import list_features

    ds = prep.spec
    key = (method.encoder, method.weights, method.random_init)
    if key in cache:
        return cache[key]
    if options.features_dir is not None:  # `bench train --features DIR`: read-only, nothing extracted
        from baselines.features import external_features

        try:
            given = external_features(options.features_dir, prep.cohort.slide_ids, scan="last")
            result = FeatureSet(given.folder, given.weights_id, set(given.slides))
        except BenchError as exc:
            warn(f"[{ds.name}] cannot use the features in {options.features_dir}: {exc}")
            result = FeatureSet(None, None, set(), f"{type(exc).__name__}: {exc}")
        cache[key] = result
        return result
    layout = Layout(options.workdir)
    tiling = (ds.two_stage.magnification, ds.two_stage.patch_size)
    coords_dir = prep.tiles[tiling]
    out_dir = layout.features_dir(ds.name, method.encoder, *tiling)
    try:
        spec = encoder_spec_for(method.encoder, ds.two_stage.input_size)
        source = spec.resolve_weights(method.weights, random_init=method.random_init)
        init_seed = FEATURE_INIT_SEED if method.random_init else None
        jobs = [j for j in prep.cohort.slide_jobs() if j.slide_id in prep.tiled[tiling]]
        with timer.stage("extract"):
            if pending_slides(jobs, coords_dir, out_dir, spec, source.weights_id, init_seed):
                encoder = spec.build(source, seed=FEATURE_INIT_SEED)
                report = extract_cohort(jobs, coords_dir, out_dir, encoder,
                                        ExtractOptions(num_workers=options.extract_workers, device=options.device),
                                        magnification=tiling[0], patch_size=tiling[1])
                for sid, why in report.skipped:
                    warn(f"[{ds.name}] features of {sid} skipped: {why}")
                if report.settings is not None:
                    timer.note("extract", f"{method.encoder}: {report.settings.describe()}")
        files = list_features(out_dir)
        have = {s for s in files if s in prep.tiled[tiling]}
        info(f"[{ds.name}] features {method.encoder} ({source.weights_id}): {len(have)} slides in {out_dir}")
        result = FeatureSet(out_dir, source.weights_id, have)
    except BenchError as exc:
        warn(f"[{ds.name}] no features for encoder {method.encoder}: {exc}")
        result = FeatureSet(None, None, set(), f"{type(exc).__name__}: {exc}")
    cache[key] = result
    return result


# ----------------------------------------------------------------------------- one method


def best_params(layout: Layout, suite: str, method: str, dataset: str, split: str) -> dict[str, Any] | None:
    """Parameters `bench sweep` tuned for (suite, method, dataset) on this split, or None (nested tuning:
    never the parameters of another split, whose training data may hold this split's test patients)."""
    from bench.evaluation.sweeps import read_best

    best = read_best(layout, suite, method, dataset, split)
    return None if best is None else dict(best["best_params"])


def split_params(flat: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sweep parameters -> (trainer params, aggregator params); "aggregator.<p>" targets the aggregator."""
    params, agg = {}, {}
    for k, v in flat.items():
        if k.startswith("aggregator."):
            agg[k.split(".", 1)[1]] = v
        else:
            params[k] = v
    return params, agg


def method_settings(suite: Suite, method: MethodSpec, overrides: Mapping[str, Any] | None = None
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer params, aggregator params) of a method: suite defaults, method, then overrides."""
    params = suite.method_params(method)
    agg = dict(thaw(method.aggregator_params))
    if overrides:
        p, a = split_params(overrides)
        params.update(p)
        agg.update(a)
    return params, agg


def train_method(prep: PreparedDataset, method: MethodSpec, params: Mapping[str, Any],
                 aggregator_params: Mapping[str, Any], bags: FoldBags, out_dir: Path, *, seed: int, device: str,
                 features: FeatureSet | None = None, epoch_callback: EpochCallback | None = None,
                 predict_test: bool = True) -> TrainResult:
    """Run the trainer of the method's paradigm on one fold (the one place that dispatches on paradigm)."""
    ds = prep.spec
    config = _build_config(ds, method, params, aggregator_params, seed=seed, device=device)
    if method.paradigm == "two-stage":
        from baselines.train import train_two_stage

        assert features is not None and features.folder is not None
        files = {s: features.folder / f"{s}.h5" for s in bags.slide_ids()}
        lesions = prep.cohort.lesion_labeler(prep.tiles[(ds.two_stage.magnification, ds.two_stage.patch_size)])
        return train_two_stage(bags, files, config, out_dir, instance_labels=lesions, epoch_callback=epoch_callback,
                               predict_test=predict_test, cohort=prep.cohort)
    tiles_dirs = {mag: prep.tiles[(mag, ds.e2e.patch_size)] for mag in ds.e2e.magnifications
                  if (mag, ds.e2e.patch_size) in prep.tiles}
    if method.paradigm == "e2e":
        from e2e.train import train_e2e

        return train_e2e(bags, prep.cohort, tiles_dirs, config, out_dir, epoch_callback=epoch_callback,
                         predict_test=predict_test)
    from e2e.gma.trainer import train_gma

    return train_gma(bags, prep.cohort, tiles_dirs, config, out_dir, epoch_callback=epoch_callback,
                     predict_test=predict_test)


def available_slides(prep: PreparedDataset, method: MethodSpec, features: FeatureSet | None) -> tuple[set[str], str]:
    """Slides a method can use, and the reason recorded for the others."""
    ds = prep.spec
    if method.paradigm == "two-stage":
        assert features is not None
        return set(features.slides), f"no {method.encoder} features (untiled, unreadable or failed extraction)"
    mags = ds.e2e.magnifications if method.paradigm == "e2e" else (ds.e2e.magnification,)
    have = set(prep.cohort.slide_ids)
    for mag in mags:
        have &= prep.tiled.get((mag, ds.e2e.patch_size), set())
    return have, f"no tissue patches at {', '.join(mag_tag(m, ds.e2e.patch_size) for m in mags)}"


@dataclass
class FoldJob:
    """One method on one fold of one split file, with its data ready: the interface `bench sweep` uses.

    `train(overrides, out_dir)` trains the method with the suite's parameters updated by
    `overrides` (sweep keys; `aggregator.<p>` targets the aggregator) and returns its result.
    """

    suite: Suite
    prep: PreparedDataset
    method: MethodSpec
    features: FeatureSet | None
    bags: FoldBags
    seed: int
    fold: int
    device: str

    def with_fold(self, fold: int) -> FoldJob:
        """The same method and data on another fold of the same split file."""
        from bench.evaluation.training import fold_bags

        splits = self.prep.splits[self.seed]
        available, why = available_slides(self.prep, self.method, self.features)
        bags = fold_bags(make_task_for(self.prep.spec, self.prep.cohort), self.prep.cohort.table, splits, int(fold),
                         available=available, unavailable_reason=why)
        return replace(self, bags=bags, fold=int(fold))

    def train(self, overrides: Mapping[str, Any] | None, out_dir: Path, *, epoch_callback: EpochCallback | None = None,
              predict_test: bool = True) -> TrainResult:
        params, agg = method_settings(self.suite, self.method, overrides)
        return train_method(self.prep, self.method, params, agg, self.bags, out_dir, seed=self.seed,
                            device=self.device, features=self.features, epoch_callback=epoch_callback,
                            predict_test=predict_test)


def prepare_fold(suite: Suite, method_name: str, dataset: str, options: RunOptions, *, seed: int,
                 fold: int | None = None, timer: StageTimer | None = None) -> FoldJob:
    """Cohort, tiles, split, features and bags of one method on one fold (default: the dataset's first).

    Raises:
        DataError: the method's features could not be extracted.
    """
    from bench.common.errors import DataError
    from bench.evaluation.training import fold_bags

    method = suite.method(method_name)
    ds = suite.dataset(dataset)
    register_suite_encoders(suite)
    one = suite.select(datasets=[ds.name], methods=[method.name])
    check_methods(one)
    timer = timer or StageTimer()
    prep = prepare_dataset(one, ds, replace(options, seeds=(seed,)), timer)
    splits = prep.splits[seed]
    fold = (ds.folds or tuple(splits.folds))[0] if fold is None else int(fold)
    features = extract_features(prep, method, options, timer, {}) if method.paradigm == "two-stage" else None
    if features is not None and features.error:
        raise DataError(f"cannot train {method.name} on {ds.name}: {features.error}")
    available, why = available_slides(prep, method, features)
    bags = fold_bags(make_task_for(ds, prep.cohort), prep.cohort.table, splits, fold, available=available,
                     unavailable_reason=why)
    return FoldJob(suite, prep, method, features, bags, seed, fold, options.device)


def run_config(suite: Suite, prep: PreparedDataset, method: MethodSpec, params: Mapping[str, Any],
               aggregator_params: Mapping[str, Any], splits: Splits, seed: int, fold: int,
               features: FeatureSet | None) -> dict[str, Any]:
    """Everything a run's result depends on; its hash decides whether a record is current."""
    ds = prep.spec
    return {
        "harness": __version__.split("+")[0],
        "dataset": {"name": ds.name, "task": ds.task, "task_params": thaw(ds.task_params),
                    "primary_metric": ds.primary_metric, "oversample": ds.oversample,
                    "tiling": dataclasses.asdict(ds.two_stage if method.paradigm == "two-stage" else ds.e2e)},
        "method": {"name": method.name, "paradigm": method.paradigm, "encoder": method.encoder,
                   "aggregator": method.aggregator, "weights": method.weights, "random_init": method.random_init},
        "params": dict(params), "aggregator_params": dict(aggregator_params),
        "features": None if features is None else features.weights_id,
        "split_sha256": splits.sha256, "seed": seed, "fold": fold, "bootstrap": suite.bootstrap,
        "dropped": sorted(prep.skipped),
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunIdentity:
    """Where a run's record goes and the config hash that makes it current (what `run_one` checks first)."""

    tag: str
    run_dir: Path
    overrides: dict[str, Any] | None
    params: dict[str, Any]
    aggregator_params: dict[str, Any]
    features: FeatureSet | None
    config_hash: str


def run_identity(suite: Suite, prep: PreparedDataset, method: MethodSpec, seed: int, fold: int,
                 options: RunOptions, timer: StageTimer, feature_cache: dict[tuple, FeatureSet]) -> RunIdentity:
    """The record folder and config hash of one method on one fold (extracts the features it reads if needed)."""
    from bench.evaluation.records import split_tag

    layout = Layout(options.workdir)
    ds = prep.spec
    splits = prep.splits[seed]
    tag = split_tag(splits.protocol, splits.seed, fold)
    run_dir = layout.run_dir(suite.name, ds.name, method.name, tag)
    overrides = best_params(layout, suite.name, method.name, ds.name, tag) if options.params == "best" else None
    params, agg_params = method_settings(suite, method, overrides)
    features = extract_features(prep, method, options, timer, feature_cache) if method.paradigm == "two-stage" else None
    config = run_config(suite, prep, method, params, agg_params, splits, seed, fold, features)
    return RunIdentity(tag, run_dir, overrides, params, agg_params, features, config_hash(config))


def run_one(suite: Suite, prep: PreparedDataset, method: MethodSpec, seed: int, fold: int, options: RunOptions,
            timer: StageTimer, feature_cache: dict[tuple, FeatureSet],
            guard: Callable[[], None] | None = None) -> RunOutcome:
    """One method on one fold of one split file: train, evaluate, record (or reuse the record).

    `guard` (a worker's claim check, `bench.orchestration.claims.Claim.check`) is called before the
    record is written and may raise to stop a worker that lost the item from writing it.
    """
    from bench.evaluation.records import is_current, write_run
    from bench.evaluation.training import fold_bags

    ds = prep.spec
    splits = prep.splits[seed]
    ident = run_identity(suite, prep, method, seed, fold, options, timer, feature_cache)
    tag, run_dir, overrides, chash = ident.tag, ident.run_dir, ident.overrides, ident.config_hash
    params, agg_params, features = ident.params, ident.aggregator_params, ident.features
    if options.params == "best" and overrides is None:
        warn(f"[{ds.name}] {method.name} {tag}: no sweep results for this split (bench sweep), using the suite's "
             "parameters")
    if not options.force and is_current(run_dir, chash):
        info(f"[{ds.name}] {method.name} {tag}: up to date, skipped")
        return RunOutcome(ds.name, method.name, tag, "cached", run_dir)
    task = make_task_for(ds, prep.cohort)
    method_info = {"name": method.name, "paradigm": method.paradigm, "encoder": method.encoder,
                   "aggregator": method.aggregator, "params": params, "aggregator_params": agg_params,
                   "weights_id": features.weights_id if features else ("random-init" if method.random_init else
                                                                      method.weights),
                   "random_init": method.random_init, "params_source": "sweep" if overrides else "suite",
                   **({"params_tuned_on": tag} if overrides else {})}
    split_info = {"path": str(splits.path), "sha256": splits.sha256, "protocol": splits.protocol,
                  "seed": splits.seed, "fold": fold}
    started = _now()
    info(f"[{ds.name}] {method.name} {tag}: training ({method.paradigm}, seed {seed})")
    result, status, error, extra = None, "ok", None, {"skipped_slides": prep.skipped}
    try:
        if features is not None and features.error:
            raise BenchError(f"feature extraction failed: {features.error}")
        available, why = available_slides(prep, method, features)
        bags = fold_bags(task, prep.cohort.table, splits, fold, available=available, unavailable_reason=why)
        task = bags.task
        extra["dropped_from_split"] = [list(d) for d in bags.dropped]
        with timer.stage(f"train {method.paradigm}"):
            result = train_method(prep, method, params, agg_params, bags, run_dir, seed=seed, device=options.device,
                                  features=features, epoch_callback=None if guard is None else _guard_epochs(guard))
    except (KeyboardInterrupt, WriteError, LeaseLost):
        raise  # a full or read-only disk is not the method's failure: the stage ends, finished runs stay
    except Exception as exc:  # noqa: BLE001 - a failing method is recorded as failed and the suite goes on
        if getattr(exc, "skip_run", False):  # an optional extra this machine cannot run (2dmamba's CUDA kernel)
            return _record_skipped(ds.name, method, tag, run_dir, f"{type(exc).__name__}: {exc}", guard)
        status, error = "failed", f"{type(exc).__name__}: {exc}"
        if getattr(exc, "epoch", None) is not None:
            extra["failed_epoch"] = exc.epoch  # type: ignore[attr-defined]
        if not isinstance(exc, BenchError):  # a bug, not bad input: keep the traceback for the report
            extra["traceback"] = traceback.format_exc(limit=20)
        warn(f"[{ds.name}] {method.name} {tag} failed: {error}")
    with timer.stage("evaluate"):
        if guard is not None:
            guard()  # a worker that lost this item's claim stops here: the new holder writes the record
        try:
            record = write_run(run_dir, suite=suite.name, dataset=ds.name, task=task, method=method_info,
                               split=split_info, seed=seed, config_hash=chash, result=result, status=status,
                               error=error, started=started, ended=_now(), n_bootstrap=suite.bootstrap,
                               bootstrap_seed=seed, synthetic=prep.synthetic, command=options.command, extra=extra)
        except BenchError as exc:  # e.g. predictions the bootstrap refuses: record the run as failed
            status, error = "failed", f"{type(exc).__name__}: {exc}"
            warn(f"[{ds.name}] {method.name} {tag} failed at evaluation: {error}")
            if guard is not None:
                guard()
            record = write_run(run_dir, suite=suite.name, dataset=ds.name, task=task, method=method_info,
                               split=split_info, seed=seed, config_hash=chash, result=None, status=status,
                               error=error, started=started, ended=_now(), n_bootstrap=suite.bootstrap,
                               bootstrap_seed=seed, synthetic=prep.synthetic, command=options.command, extra=extra)
    if status == "ok":
        from bench.evaluation.training import discard_checkpoint

        discard_checkpoint(run_dir)  # finished and recorded: the resume state (~50 MB for E2E) is not needed
    primary = _primary_text(record, task) if status == "ok" else None
    if primary:
        info(f"[{ds.name}] {method.name} {tag}: {primary}")
    return RunOutcome(ds.name, method.name, tag, status, run_dir, primary, error, record.path)


def _record_skipped(dataset: str, method: MethodSpec, tag: str, run_dir: Path, reason: str,
                    guard: Callable[[], None] | None) -> RunOutcome:
    """A method this machine cannot run (e.g. a GPU-only extra without its kernel): status "skipped" with the
    reason in run-skipped.json beside any earlier record (which stays), not a failure; the suite goes on."""
    from bench.common.files import write_json_atomic

    warn(f"[{dataset}] {method.name} {tag} skipped: {reason}")
    if guard is not None:
        guard()
    path = Path(run_dir) / SKIPPED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"status": "skipped", "dataset": dataset, "method": method.name, "split": tag,
                             "reason": reason, "ended": _now()})
    return RunOutcome(dataset, method.name, tag, "skipped", run_dir, None, reason, path)


def _guard_epochs(guard: Callable[[], None]) -> EpochCallback:
    """An epoch callback that stops training (LeaseLost) once a worker no longer holds the item."""
    def check(epoch: int, row: dict) -> None:
        guard()

    return check


def _primary_text(record: Any, task: Any) -> str | None:
    from bench.evaluation.records import format_interval

    metrics = getattr(record, "metrics", None) or {}
    ci = metrics.get(task.primary_metric)
    if not ci:
        return None
    return f"test {task.primary_metric} {format_interval(ci['mean'], ci['low'], ci['high'])}"


# ----------------------------------------------------------------------------- the suite


def register_suite_encoders(suite: Suite) -> None:
    """Encoders declared in the suite's [[encoders]] tables join the registry (replacing same-named ones)."""
    from baselines.encoders import register_encoder_from_config

    for table in suite.encoders:
        config = dict(thaw(table))
        name = config.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(f"{suite.source}: every [[encoders]] table needs a name, got {table!r}")
        register_encoder_from_config(name, config, where=suite.source, replace=True)


def check_methods(suite: Suite) -> None:
    """Fail before any stage runs on what would fail every run later: an unknown encoder or aggregator
    (with close names), or trainer parameters the trainer refuses (each method's full configuration
    is built once per dataset, exactly as `train_method` builds it)."""
    from baselines.encoders import get_encoder
    from baselines.mil import AGGREGATORS

    for m in suite.methods:
        get_encoder(m.encoder)
        spec = AGGREGATORS.get(m.aggregator)
        if m.paradigm != "two-stage" and getattr(spec.cls, "uses_coords", False):
            raise ConfigError(f"{suite.source}: method {m.name!r}: aggregator {m.aggregator!r} needs the patches' grid "
                              f"positions, which only the two-stage trainer passes; run it as "
                              f"two-stage/<patch encoder>/{m.aggregator}")
    for m in suite.methods:  # a pretrained slide encoder only takes its own patch encoder's features
        defaults = AGGREGATORS.get(m.aggregator).defaults
        if m.paradigm == "two-stage" and "encoder" in defaults:
            _, agg = method_settings(suite, m)
            if agg.get("init", defaults["init"]) == "published":
                from baselines.encoders_slide import check_pairing

                try:
                    check_pairing(defaults["encoder"], m.encoder)
                except ConfigError as exc:
                    raise ConfigError(f"{suite.source}: method {m.name!r}: {exc}") from None
    for ds in suite.datasets:
        for m in suite.methods:
            params, agg = method_settings(suite, m)
            try:
                _build_config(ds, m, params, agg)
            except ConfigError as exc:
                raise ConfigError(f"{suite.source}: method {m.name!r} on dataset {ds.name!r} ([defaults.{m.paradigm}]"
                                  f" + its params): {exc}") from None


def _build_config(ds: DatasetSpec, method: MethodSpec, params: Mapping[str, Any], aggregator_params: Mapping[str, Any],
                  *, seed: int = 0, device: str = "auto") -> Any:
    """The trainer configuration of a method on a dataset (validates every parameter)."""
    if method.paradigm == "two-stage":
        from baselines.train import TwoStageConfig

        return TwoStageConfig.from_params(method.aggregator, params, aggregator_params=aggregator_params, seed=seed,
                                          device=device)
    if method.paradigm == "e2e":
        from e2e.train import E2EConfig as Config
    else:
        from e2e.gma.config import GMAConfig as Config
    return Config.from_params(method.encoder, method.aggregator, params, tiling=ds.e2e,
                              aggregator_params=aggregator_params, weights=method.weights,
                              random_init=method.random_init, seed=seed, device=device)


def run_suite(suite: Suite, options: RunOptions) -> SuiteReport:
    """Run every stage of `suite` (already restricted with `Suite.select`)."""
    register_suite_encoders(suite)
    check_methods(suite)
    timer = StageTimer()
    report = SuiteReport()
    if suite.demo:
        info(f"suite {suite.name}: SYNTHETIC demo data (no --data-root). {suite.description}")
    for ds in suite.datasets:
        prep = prepare_dataset(suite, ds, options, timer)
        report.skipped_slides[ds.name] = prep.skipped
        feature_cache: dict[tuple, FeatureSet] = {}
        for method in suite.methods:
            for seed, splits in prep.splits.items():
                folds = ds.folds or tuple(splits.folds)
                for fold in folds:
                    report.outcomes.append(run_one(suite, prep, method, seed, fold, options, timer, feature_cache))
    if options.leaderboards is not None:
        report.leaderboard = draw_leaderboard(suite, options, [o.run_dir for o in report.outcomes
                                                               if o.status in ("ok", "cached")], timer)
    report.stage_seconds = timer.to_dict()
    report.stage_notes = {k: list(v) for k, v in timer.notes.items()}
    _write_stage_times(Path(options.workdir), suite.name, report)
    return report


def draw_leaderboard(suite: Suite, options: RunOptions, run_dirs: Sequence[Path], timer: StageTimer,
                     guard: Callable[[], None] | None = None) -> Path:
    """Heatmaps of the finished runs `run_dirs` (one test slide per method and dataset), then the leaderboard
    that links them (also the leaderboard item of `bench worker`, whose `guard` is called before each write)."""
    from bench.evaluation.heatmaps import heatmaps_for_suite
    from bench.evaluation.leaderboard import build_leaderboard

    assert options.leaderboards is not None
    if guard is not None:
        guard()
    with timer.stage("heatmaps"):
        heatmaps_for_suite(list(run_dirs), Path(options.leaderboards) / suite.name, max_slides=1)
    if guard is not None:
        guard()
    with timer.stage("leaderboard"):
        return build_leaderboard(
            Path(options.workdir), suite.name, Path(options.leaderboards), synthetic=suite.demo,
            reported=suite.reported, command=options.command,
            data_names={d.name: d.data for d in suite.datasets}, expectations=suite.expectations())


def _write_stage_times(workdir: Path, suite: str, report: SuiteReport) -> None:
    from bench.common.files import write_json_atomic

    path = Layout(workdir).runs_root(suite) / "last-run.json"
    write_json_atomic(path, {
        "finished": _now(),
        "stage_seconds": {k: round(v, 3) for k, v in report.stage_seconds.items()},
        "stage_settings": report.stage_notes,
        "runs": [{"dataset": o.dataset, "method": o.method, "split": o.split, "status": o.status,
                  "error": o.error} for o in report.outcomes],
    })


def outcome_table(report: SuiteReport) -> str:
    from tabulate import tabulate

    rows = [[o.dataset, o.method, o.split, o.status, o.primary or (o.error or "")[:80]] for o in report.outcomes]
    return tabulate(rows, headers=["dataset", "method", "split", "status", "result"], tablefmt="github")


def stage_table(report: SuiteReport) -> str:
    from tabulate import tabulate

    total = sum(report.stage_seconds.values())
    notes = report.stage_notes
    if not any(notes.values()):
        rows = [[k, f"{v:.1f}"] for k, v in report.stage_seconds.items()] + [["total", f"{total:.1f}"]]
        return tabulate(rows, headers=["stage", "seconds"], tablefmt="github")
    rows = [[k, f"{v:.1f}", "; ".join(notes.get(k, []))] for k, v in report.stage_seconds.items()]
    return tabulate(rows + [["total", f"{total:.1f}", ""]], headers=["stage", "seconds", "settings"],
                    tablefmt="github")


__all__ = ["RunOptions", "SuiteReport", "RunOutcome", "PreparedDataset", "FoldJob", "prepare_fold", "run_suite",
           "prepare_dataset", "open_cohort", "run_one", "run_identity", "RunIdentity", "draw_leaderboard",
           "train_method", "method_settings", "split_params", "make_task_for", "extract_features",
           "available_slides", "cohort_folder", "outcome_table", "stage_table"]
