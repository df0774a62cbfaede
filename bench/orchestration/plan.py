"""A suite as a plan of work items with dependencies, shared by any number of workers.

`bench run` does the stages of a suite one after another in one process (`runner.run_suite`).
`build_plan` turns the same suite into items that several processes, GPUs or nodes can share
(`bench worker`, `bench run --executor local|slurm`):

    cohort/<dataset>                              synthetic cohort written, or the real one found
    tile/<dataset>/<mag>x-<px>px                  one per tiling the methods read
    split/<dataset>/<protocol>-seed<k>            one split file per seed
    extract/<dataset>/<encoder>/<weights>/shard<i>of<n>   feature extraction, slides dealt i::n
    train/<dataset>/<method>/<split tag>          train + evaluate + record (run_one, as `bench run`)
    leaderboard/<suite>                           heatmaps + leaderboard, after every train item

An item is *done* exactly when its output is current by the checks the stages already use:
coords files with the tiling's parameter hash, the split file and its sha256 file, feature
files whose config hash matches (`pending_slides` is empty), the run record's config hash
(`is_current`). An item whose stage finished but left slides out (an unreadable slide is
skipped, as in `bench run`) is done by its item record (`items/<id>.json`, written by the
worker with the item's fingerprint). A train item is done only by its run record.

Item records and claims live in `<workdir>/work/<suite>/`: `claims/` (bench.orchestration.claims),
`items/` (status, attempts, error, worker, host, device, seconds), `events.jsonl` (one line per
claim, finish, failure, takeover; `bench status` and the tests read it) and `workers/`. The item records
and run records are what counts; the event log is for people and tests (appends from several NFS clients are
not atomic, so a line may be lost or cut there, and cut lines are skipped when read).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common.errors import BenchError, WriteError
from bench.common.files import config_hash, write_errno, write_json_atomic
from bench.data.layout import Layout, check_name, mag_tag
from bench.evaluation.costs import StageTimer
from bench.orchestration.runner import (FeatureSet, PreparedDataset, RunOptions, _build_config, method_settings,
                                        tilings_needed)
from bench.orchestration.suite import DatasetSpec, MethodSpec, Suite, thaw

EXTRACT_SHARDS = 4  # slides of one encoder's cohort are dealt to this many extract items (fixed: every worker
# must build the same plan)
MAX_ATTEMPTS = 2  # a failing item is tried this often, then recorded as failed for good
STATES = ("done", "failed", "blocked", "claimed", "ready", "pending")


@dataclass(frozen=True)
class WorkItem:
    """One unit of work of a suite.

    Attributes:
        needs: items that must be done first.
        after: items that must be finished (done or failed for good) first: the leaderboard waits
            for every train item but is drawn also when some failed.
        gpus: devices the item occupies on a GPU worker (0: CPU work; GMA in distributed mode: nproc).
        spec: what the item's output depends on (its fingerprint is the config hash of this).
    """

    id: str
    kind: str
    dataset: str | None = None
    needs: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    gpus: int = 0
    spec: Mapping[str, Any] = field(default_factory=dict)
    method: str | None = None
    seed: int | None = None
    fold: int | None = None
    tiling: tuple[float, int] | None = None
    shard: tuple[int, int] | None = None  # (index, count)

    @property
    def fingerprint(self) -> str:
        return config_hash({"id": self.id, **thaw(self.spec)})

    @property
    def file_name(self) -> str:
        return self.id.replace("/", "+")


@dataclass(frozen=True)
class Plan:
    suite: Suite
    options: RunOptions
    items: tuple[WorkItem, ...]

    def item(self, item_id: str) -> WorkItem:
        for it in self.items:
            if it.id == item_id:
                return it
        raise KeyError(item_id)

    @property
    def state_dir(self) -> Path:
        return state_dir(self.options.workdir, self.suite.name)


def state_dir(workdir: str | os.PathLike[str], suite: str) -> Path:
    """`<workdir>/work/<suite>`: claims, item records, the event log and worker summaries of a suite."""
    return Path(workdir) / "work" / check_name("suite", suite)


def _folds(ds: DatasetSpec) -> tuple[int, ...]:
    return tuple(ds.folds) if ds.folds else tuple(range(ds.split_spec().n_folds))


def feature_key(method: MethodSpec) -> tuple[str, str | None, bool]:
    return (method.encoder, method.weights, method.random_init)


def method_gpus(suite: Suite, ds: DatasetSpec, method: MethodSpec) -> int:
    """Devices a train item occupies: 1, or nproc for GMA in distributed mode (its ranks, one GPU each)."""
    if method.paradigm != "gma":
        return 1
    params, agg = method_settings(suite, method)
    config = _build_config(ds, method, params, agg)
    return int(config.nproc) if getattr(config, "mode", "distributed") == "distributed" else 1


def build_plan(suite: Suite, options: RunOptions, *, extract_shards: int = EXTRACT_SHARDS) -> Plan:
    """The work items of `suite` (already restricted with `Suite.select`) in a runnable order."""
    items: list[WorkItem] = []
    seeds = tuple(options.seeds or suite.seeds)
    train_ids: list[str] = []
    for ds in suite.datasets:
        source = {"data_root": str(options.data_root) if options.data_root else None, "data": ds.data,
                  "synthetic": thaw(ds.synthetic), "mpp": ds.mpp}
        cohort = WorkItem(f"cohort/{ds.name}", "cohort", ds.name, spec=source)
        items.append(cohort)
        prep_ids = []
        for mag, px in tilings_needed(ds, suite.methods):
            tile = WorkItem(f"tile/{ds.name}/{mag_tag(mag, px)}", "tile", ds.name, needs=(cohort.id,),
                            spec={**source, "magnification": mag, "patch_size": px}, tiling=(mag, px))
            items.append(tile)
            prep_ids.append(tile.id)
        split_spec = ds.split_spec()
        for seed in seeds:
            split = WorkItem(f"split/{ds.name}/{split_spec.protocol}-seed{seed}", "split", ds.name,
                             needs=(cohort.id,), spec={**source, "split": thaw(ds.split), "seed": seed}, seed=seed)
            items.append(split)
            prep_ids.append(split.id)
        extract_ids: dict[tuple, list[str]] = {}
        if options.features_dir is None:
            tiling = (ds.two_stage.magnification, ds.two_stage.patch_size)
            for method in suite.methods:
                key = feature_key(method)
                if method.paradigm != "two-stage" or key in extract_ids:
                    continue
                weights = "random-init" if method.random_init else (method.weights or "default")
                ids = []
                for i in range(extract_shards):
                    ex = WorkItem(f"extract/{ds.name}/{method.encoder}/{weights.replace('/', '_')}/"
                                  f"shard{i}of{extract_shards}", "extract", ds.name, needs=tuple(prep_ids),
                                  gpus=1, spec={**source, "tiling": tiling, "input_size": ds.two_stage.input_size,
                                                "encoder": key}, method=method.name, tiling=tiling,
                                  shard=(i, extract_shards))
                    items.append(ex)
                    ids.append(ex.id)
                extract_ids[key] = ids
        for method in suite.methods:
            gpus = method_gpus(suite, ds, method)
            params, agg = method_settings(suite, method)
            for seed in seeds:
                for fold in _folds(ds):
                    tag = f"{split_spec.protocol}-seed{seed}-fold{fold}"
                    needs = tuple(prep_ids) + (tuple(extract_ids.get(feature_key(method), ()))
                                               if method.paradigm == "two-stage" else ())
                    train = WorkItem(f"train/{ds.name}/{method.name}/{tag}", "train", ds.name, needs=needs,
                                     gpus=gpus, method=method.name, seed=seed, fold=fold,
                                     spec={**source, "params": params, "aggregator_params": agg, "seed": seed,
                                           "fold": fold, "options": options.params})
                    items.append(train)
                    train_ids.append(train.id)
    if options.leaderboards is not None:
        items.append(WorkItem(f"leaderboard/{suite.name}", "leaderboard", after=tuple(train_ids)))
    return Plan(suite, options, tuple(items))


# ----------------------------------------------------------------------------- item records and events


def _write(path: Path, obj: Any) -> None:
    write_json_atomic(path, obj)


def read_item_record(plan: Plan, item: WorkItem) -> dict[str, Any] | None:
    path = plan.state_dir / "items" / f"{item.file_name}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("fingerprint") == item.fingerprint else None


def write_item_record(plan: Plan, item: WorkItem, record: Mapping[str, Any]) -> None:
    _write(plan.state_dir / "items" / f"{item.file_name}.json", {"id": item.id, "fingerprint": item.fingerprint,
                                                                  **dict(record)})


def log_event(plan: Plan, event: str, item: WorkItem | None, worker: str, **extra: Any) -> None:
    """Append one line to `events.jsonl` (O_APPEND: lines of concurrent workers do not mix on a local disk)."""
    line = json.dumps({"t": round(time.time(), 3), "event": event, "item": item.id if item else None,
                       "worker": worker, "host": socket.gethostname(), "pid": os.getpid(), **extra}) + "\n"
    path = plan.state_dir / "events.jsonl"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        if write_errno(exc) is None:
            raise
        raise WriteError(path, exc) from None


def read_events(workdir: str | os.PathLike[str], suite: str) -> list[dict[str, Any]]:
    path = state_dir(workdir, suite) / "events.jsonl"
    if not path.is_file():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:  # a line cut by a killed writer
            continue
    return events


# ----------------------------------------------------------------------------- the stages of one item


class Context:
    """What one worker process keeps between items: prepared datasets and feature sets (read-only caches).

    `readonly` (bench status): nothing is prepared; a train item is done when its run record is ok
    (its config hash is not recomputed, which needs the prepared dataset).
    """

    def __init__(self, plan: Plan, *, readonly: bool = False) -> None:
        self.plan = plan
        self.readonly = readonly
        self.timer = StageTimer()
        self._preps: dict[str, PreparedDataset] = {}
        self._features: dict[str, dict[tuple, FeatureSet]] = {}
        self._cohorts: dict[str, tuple[Any, bool]] = {}

    @property
    def suite(self) -> Suite:
        return self.plan.suite

    @property
    def options(self) -> RunOptions:
        return self.plan.options

    def cohort(self, ds: DatasetSpec) -> tuple[Any, bool]:
        from bench.orchestration.runner import open_cohort

        if ds.name not in self._cohorts:
            self._cohorts[ds.name] = open_cohort(ds, self.options, self.timer)
        return self._cohorts[ds.name]

    def prep(self, ds: DatasetSpec) -> PreparedDataset:
        """The dataset as `bench run` prepares it (every tile and split item is done by then: cached reads)."""
        from bench.orchestration.runner import prepare_dataset

        if ds.name not in self._preps:
            self._preps[ds.name] = prepare_dataset(self.suite, ds, self.options, self.timer)
        return self._preps[ds.name]

    def feature_cache(self, ds: DatasetSpec) -> dict[tuple, FeatureSet]:
        return self._features.setdefault(ds.name, {})


def _tile_params(item: WorkItem) -> Any:
    from bench.data.tiling import TileParams

    assert item.tiling is not None
    return TileParams(magnification=item.tiling[0], patch_size=item.tiling[1])


def _extract_setup(ctx: Context, item: WorkItem) -> tuple[Any, Any, int | None, list[Any], Path, Path]:
    from bench.orchestration.runner import FEATURE_INIT_SEED, encoder_spec_for

    ds = ctx.suite.dataset(item.dataset or "")
    method = ctx.suite.method(item.method or "")
    prep = ctx.prep(ds)
    assert item.tiling is not None and item.shard is not None
    spec = encoder_spec_for(method.encoder, ds.two_stage.input_size)
    source = spec.resolve_weights(method.weights, random_init=method.random_init)
    init_seed = FEATURE_INIT_SEED if method.random_init else None
    jobs = [j for j in prep.cohort.slide_jobs() if j.slide_id in prep.tiled[item.tiling]]
    index, count = item.shard
    layout = Layout(ctx.options.workdir)
    return (spec, source, init_seed, jobs[index::count], prep.tiles[item.tiling],
            layout.features_dir(ds.name, method.encoder, *item.tiling))


def output_current(ctx: Context, item: WorkItem) -> bool:
    """True when the item's output is current by the stage's own cache check (its dependencies are done)."""
    layout = Layout(ctx.options.workdir)
    if item.kind == "cohort":
        from bench.orchestration.runner import cohort_folder

        ds = ctx.suite.dataset(item.dataset or "")
        folder, synthetic = cohort_folder(ds, ctx.options.data_root, layout)
        if not synthetic:
            return (folder / ds.labels).is_file()
        manifest = folder / "cohort.json"
        try:
            truth = json.loads(manifest.read_text(encoding="utf-8")).get("truth", {})
        except (OSError, ValueError):
            return False
        return bool(truth) and all((folder / "slides" / f"{sid}.tif").exists() for sid in truth)
    if item.kind == "tile":
        from bench.data.tiling import _up_to_date

        ds = ctx.suite.dataset(item.dataset or "")
        cohort, _ = ctx.cohort(ds)
        params = _tile_params(item)
        assert item.tiling is not None
        out = layout.tiles_dir(ds.name, *item.tiling)
        return all(_up_to_date(out, j.slide_id, params, True, Path(j.path), j.mpp) is not None
                   for j in cohort.slide_jobs())
    if item.kind == "split":
        from bench.data.splits import sha256_path

        ds = ctx.suite.dataset(item.dataset or "")
        path = layout.split_file(ds.name, ds.split_spec().protocol, int(item.seed or 0))
        return path.is_file() and sha256_path(path).is_file()
    if item.kind == "extract":
        from baselines.extract import pending_slides

        spec, source, init_seed, jobs, coords_dir, out_dir = _extract_setup(ctx, item)
        return not pending_slides(jobs, coords_dir, out_dir, spec, source.weights_id, init_seed)
    if item.kind == "train":
        from bench.evaluation.records import is_current, load_run
        from bench.orchestration.runner import run_identity

        ds = ctx.suite.dataset(item.dataset or "")
        if ctx.readonly:
            try:
                return load_run(train_run_dir(ctx.plan, item)).ok
            except BenchError:
                return False
        prep = ctx.prep(ds)
        ident = run_identity(ctx.suite, prep, ctx.suite.method(item.method or ""), int(item.seed or 0),
                             int(item.fold or 0), ctx.options, ctx.timer, ctx.feature_cache(ds))
        return not ctx.options.force and is_current(ident.run_dir, ident.config_hash)
    if item.kind == "leaderboard":
        record = read_item_record(ctx.plan, item)
        return (record is not None and record.get("status") == "ok"
                and record.get("inputs") == leaderboard_inputs(ctx.plan)
                and Path(str(record.get("output"))).is_file())
    raise ValueError(f"unknown item kind {item.kind!r}")


def leaderboard_inputs(plan: Plan) -> str:
    """Hash of the records the leaderboard is drawn from (a new or changed record redraws it)."""
    from bench.evaluation.records import iter_runs

    records = iter_runs(plan.options.workdir, plan.suite.name, failed_reruns=True)
    return config_hash([[str(r.path), r.data.get("config_hash"), r.status, r.data.get("ended")] for r in records])


@dataclass
class ItemResult:
    status: str  # "ok" or "failed"
    error: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)


def execute(ctx: Context, item: WorkItem, guard: Any = None) -> ItemResult:
    """Do one item's work (its dependencies are done). A failing train run is recorded as `bench run` records it.

    `guard()` is called before a final output is written; it raises LeaseLost when the claim was lost.
    """
    suite, options = ctx.suite, ctx.options
    layout = Layout(options.workdir)
    if item.kind == "cohort":
        ds = suite.dataset(item.dataset or "")
        cohort, synthetic = ctx.cohort(ds)
        return ItemResult("ok", stats={"slides": len(cohort.slide_ids), "synthetic": synthetic})
    if item.kind == "tile":
        from bench.data.tiling import tile_slides

        ds = suite.dataset(item.dataset or "")
        cohort, _ = ctx.cohort(ds)
        assert item.tiling is not None
        with ctx.timer.stage("tile"):
            report = tile_slides(cohort.slide_jobs(), layout.tiles_dir(ds.name, *item.tiling), _tile_params(item))
        return ItemResult("ok", stats={"slides": len(report.done), "patches": report.n_patches,
                                       "skipped": [list(s) for s in report.skipped]})
    if item.kind == "split":
        from bench.data.splits import write_splits

        ds = suite.dataset(item.dataset or "")
        cohort, _ = ctx.cohort(ds)
        with ctx.timer.stage("split"):
            splits = write_splits(cohort, options.workdir, ds.split_spec(), seed=int(item.seed or 0), dataset=ds.name)
        return ItemResult("ok", stats={"sha256": splits.sha256})
    if item.kind == "extract":
        from baselines.extract import ExtractOptions, extract_cohort, pending_slides
        from bench.orchestration.runner import FEATURE_INIT_SEED

        spec, source, init_seed, jobs, coords_dir, out_dir = _extract_setup(ctx, item)
        todo = pending_slides(jobs, coords_dir, out_dir, spec, source.weights_id, init_seed)
        start = time.perf_counter()
        skipped: list[tuple[str, str]] = []
        if todo:
            assert item.tiling is not None
            with ctx.timer.stage("extract"):
                encoder = spec.build(source, seed=FEATURE_INIT_SEED)
                report = extract_cohort(todo, coords_dir, out_dir, encoder,
                                        ExtractOptions(num_workers=options.extract_workers, device=options.device),
                                        magnification=item.tiling[0], patch_size=item.tiling[1])
            skipped = report.skipped
        seconds = time.perf_counter() - start
        return ItemResult("ok", stats={"slides": len(jobs), "extracted": len(todo), "seconds": round(seconds, 3),
                                       "slides_per_s": round(len(todo) / seconds, 3) if todo and seconds > 0 else None,
                                       "skipped": [list(s) for s in skipped]})
    if item.kind == "train":
        from bench.orchestration.runner import run_one

        ds = suite.dataset(item.dataset or "")
        prep = ctx.prep(ds)
        outcome = run_one(suite, prep, suite.method(item.method or ""), int(item.seed or 0), int(item.fold or 0),
                          options, ctx.timer, ctx.feature_cache(ds), guard=guard)
        return ItemResult("ok" if outcome.status in ("ok", "cached") else "failed", outcome.error,
                          {"run_status": outcome.status, "run_dir": str(outcome.run_dir), "primary": outcome.primary})
    if item.kind == "leaderboard":
        from bench.orchestration.runner import draw_leaderboard

        inputs = leaderboard_inputs(ctx.plan)
        ok = [d for d in (train_run_dir(ctx.plan, it) for it in ctx.plan.items if it.kind == "train")
              if _record_ok(d)]  # the plan's runs in `bench run`'s order (dataset, method, seed, fold)
        board = draw_leaderboard(suite, options, ok, ctx.timer, guard=guard)
        return ItemResult("ok", stats={"inputs": inputs, "output": str(board)})
    raise ValueError(f"unknown item kind {item.kind!r}")


def train_run_dir(plan: Plan, item: WorkItem) -> Path:
    """The record folder of a train item (as `run_one` names it)."""
    from bench.evaluation.records import split_tag

    ds = plan.suite.dataset(item.dataset or "")
    tag = split_tag(ds.split_spec().protocol, int(item.seed or 0), int(item.fold or 0))
    return Layout(plan.options.workdir).run_dir(plan.suite.name, ds.name, item.method or "", tag)


def _record_ok(run_dir: Path) -> bool:
    from bench.evaluation.records import load_run

    try:
        return load_run(run_dir).ok
    except BenchError:
        return False


# ----------------------------------------------------------------------------- states


@dataclass
class ItemState:
    item: WorkItem
    state: str
    claim: dict[str, Any] | None = None
    record: dict[str, Any] | None = None

    @property
    def error(self) -> str | None:
        return None if self.record is None else self.record.get("error")


def item_states(ctx: Context, done_cache: set[str] | None = None) -> list[ItemState]:
    """The state of every item (see STATES), in plan order.

    done: output current; failed: failed MAX_ATTEMPTS times; blocked: a needed item failed;
    pending: waits for other items; claimed: a live claim holds it; ready: can be claimed now.
    `done_cache` (a worker's) remembers items found done, so their checks are not repeated.
    """
    from bench.orchestration.claims import read_claim

    plan = ctx.plan
    done_cache = set() if done_cache is None else done_cache
    states: dict[str, ItemState] = {}
    out = []
    for item in plan.items:
        record = read_item_record(plan, item)
        claim = read_claim(plan.state_dir / "claims" / f"{item.file_name}.claim")
        live = claim is not None and not claim.expired()
        claim_info = claim.to_dict() if live and claim is not None else None
        deps = [states[d].state for d in item.needs if d in states]
        later = [states[d].state for d in item.after if d in states]
        if item.id in done_cache:
            state = "done"
        elif any(s in ("failed", "blocked") for s in deps):
            state = "blocked"
        elif any(s != "done" for s in deps) or any(s not in ("done", "failed", "blocked") for s in later):
            state = "pending"
        elif live and not (record is not None and record.get("status") == "ok"):
            state = "claimed"  # another worker is on it: its output is not checked now (the check can take seconds)
        elif _done(ctx, item, record):
            state = "done"
        elif record is not None and record.get("status") == "failed" and int(record.get("attempts", 0)) >= MAX_ATTEMPTS:
            state = "failed"
        elif live:
            state = "claimed"
        else:
            state = "ready"
        if state == "done":
            done_cache.add(item.id)
        states[item.id] = ItemState(item, state, claim_info, record)
        out.append(states[item.id])
    return out


def _done(ctx: Context, item: WorkItem, record: Mapping[str, Any] | None) -> bool:
    if item.kind not in ("train", "leaderboard") and record is not None and record.get("status") == "ok":
        return True  # the stage finished for these settings (slides it skipped are skipped for good)
    try:
        return output_current(ctx, item)
    except BenchError:
        return False  # the item itself will report it


def counts(states: Iterable[ItemState]) -> dict[str, int]:
    total = {s: 0 for s in STATES}
    for st in states:
        total[st.state] += 1
    return total


__all__ = ["WorkItem", "Plan", "build_plan", "Context", "execute", "item_states", "ItemState", "ItemResult",
           "counts", "state_dir", "read_events", "log_event", "write_item_record", "read_item_record",
           "EXTRACT_SHARDS", "MAX_ATTEMPTS", "STATES", "leaderboard_inputs"]

