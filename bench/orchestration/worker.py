"""Workers that share one suite's plan, and the executors that start them.

`run_worker` claims ready items of a plan (bench.orchestration.plan) one at a time, does
them, records them and releases them, until no item is left that it can do now or that
waits on others' work, then returns. Any number of workers can share one work folder:
started by `bench worker` by hand, by `bench run --executor local --jobs N` (processes on
this machine, one per visible GPU where there are GPUs) or `--executor slurm` (a submitit job
array of GPU workers, plus one multi-GPU allocation for GMA items that need `nproc` devices).

A worker with a CUDA device has `gpus` devices (default 1) and leaves items that need more
(GMA in distributed mode) to a worker that has them; a CPU worker takes every item.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
import traceback
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.common.console import info, warn
from bench.common.errors import ConfigError, WriteError
from bench.orchestration.claims import DEFAULT_LEASE_S, LeaseLost, try_claim
from bench.orchestration.plan import (Context, Plan, WorkItem, build_plan, counts, execute, item_states, log_event,
                                      read_item_record, state_dir, write_item_record)
from bench.orchestration.runner import RunOptions
from bench.orchestration.suite import Suite

EXECUTORS = ("inline", "local", "slurm")


@dataclass(frozen=True)
class WorkerOptions:
    """How a worker behaves (the suite and RunOptions say what it works on).

    Attributes:
        worker_id: shown in claims and `bench status` (default: host-pid-random).
        lease_s: lease of a claim; a claim not renewed for this long is taken over.
        poll_s: wait between looks at the plan while items are claimed by others.
        gpus: devices of a CUDA worker (items needing more are left to others); None: 1 on CUDA, any on CPU.
        max_items: stop after this many items (tests; None: no limit).
    """

    worker_id: str | None = None
    lease_s: float = DEFAULT_LEASE_S
    poll_s: float = 0.5
    gpus: int | None = None
    max_items: int | None = None

    def __post_init__(self) -> None:
        if not self.lease_s > 0:
            raise ConfigError(f"--lease must be a positive number of seconds, got {self.lease_s!r}")
        if self.gpus is not None and self.gpus < 1:
            raise ConfigError(f"--gpus must be at least 1, got {self.gpus!r}")


@dataclass
class WorkerReport:
    worker: str
    items: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    left_for_bigger: list[str] = field(default_factory=list)  # ready items needing more GPUs than this worker has
    stage_seconds: dict[str, float] = field(default_factory=dict)


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


def capacity(options: RunOptions, wopts: WorkerOptions) -> float:
    """Devices this worker offers items: GPUs on a CUDA device, unlimited for CPU work."""
    device = str(options.device)
    if device.startswith("cuda") or (device == "auto" and _cuda_available()):
        return float(wopts.gpus or 1)
    return float("inf")


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:  # pragma: no cover
        return False


def _claim_path(plan: Plan, item: WorkItem) -> Path:
    return plan.state_dir / "claims" / f"{item.file_name}.claim"


def check_writable(folder: Path) -> None:
    """A clear error naming `folder` when the work folder cannot be written (read-only, full disk)."""
    from bench.common.files import write_errno

    probe = folder / f".probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        if write_errno(exc) is None:
            raise
        raise WriteError(folder, exc) from None


def run_worker(suite: Suite, options: RunOptions, wopts: WorkerOptions = WorkerOptions()) -> WorkerReport:
    """Claim and do ready items of `suite`'s plan until none is left that this worker can do or wait for."""
    from bench.orchestration.runner import check_methods, register_suite_encoders

    if options.force:
        raise ConfigError("workers do not retrain finished runs (--force); delete the records to redo, or use "
                          "`bench run --force` without --executor")
    register_suite_encoders(suite)
    check_methods(suite)
    plan = build_plan(suite, options)
    check_writable(plan.state_dir)
    worker = wopts.worker_id or default_worker_id()
    ctx = Context(plan)
    room = capacity(options, wopts)
    report = WorkerReport(worker)
    done: set[str] = set()
    log_event(plan, "worker-start", None, worker, device=options.device, gpus=None if room == float("inf") else room)
    try:
        while wopts.max_items is None or len(report.items) < wopts.max_items:
            states = item_states(ctx, done)
            ready = [s.item for s in states if s.state == "ready" and s.item.gpus <= room]
            report.left_for_bigger = [s.item.id for s in states if s.state == "ready" and s.item.gpus > room]
            if not ready:
                if any(s.state == "claimed" for s in states):
                    time.sleep(wopts.poll_s)  # others hold items; ours may follow, or a lease may run out
                    continue
                break  # nothing left that this worker can do or wait for
            did = False
            for item in ready:
                outcome = _try_item(ctx, item, worker, wopts, done)
                if outcome is not None:
                    report.items.append(outcome)
                    did = True
                    break
            if not did:
                time.sleep(min(wopts.poll_s, 0.5))  # every ready item was claimed by others just now
        report.counts = counts(item_states(ctx, done))
    finally:
        report.stage_seconds = {k: round(v, 3) for k, v in ctx.timer.to_dict().items()}
        log_event(plan, "worker-end", None, worker, items=len(report.items))
        _write_summary(plan, report, options)
    if report.left_for_bigger:
        info(f"worker {worker}: {len(report.left_for_bigger)} item(s) need more devices than this worker's "
             f"{int(room)} (GMA in distributed mode): start a worker with --gpus N for them, e.g. "
             f"{report.left_for_bigger[0]}")
    return report


def _try_item(ctx: Context, item: WorkItem, worker: str, wopts: WorkerOptions, done: set[str]) -> dict[str, Any] | None:
    """Claim, recheck, do and record one item; None when another worker holds it or finished it meanwhile."""
    from bench.orchestration.plan import _done

    plan = ctx.plan
    claim = try_claim(_claim_path(plan, item), worker=worker, lease_s=wopts.lease_s)
    if claim is None:
        return None
    claim.start_heartbeat()
    try:
        before = read_item_record(plan, item)
        if _done(ctx, item, before):  # finished by another worker between our look and our claim
            done.add(item.id)
            return None
        attempts = int(before.get("attempts", 0)) if before and before.get("status") == "failed" else 0
        log_event(plan, "start", item, worker, took_over=claim.took_over, attempt=attempts + 1)
        info(f"[{worker}] {item.id}" + (" (taken over from an expired claim)" if claim.took_over else ""))
        started = time.time()
        try:
            result = execute(ctx, item, guard=claim.check)
            status, error, stats, tb = result.status, result.error, result.stats, None
        except (LeaseLost, KeyboardInterrupt, WriteError):
            raise
        except Exception as exc:  # noqa: BLE001 - an item's failure is recorded; the worker goes on
            status, error, stats, tb = "failed", f"{type(exc).__name__}: {exc}", {}, traceback.format_exc(limit=20)
            warn(f"[{worker}] {item.id} failed: {error}")
        claim.check()  # a worker that lost the item does not record it either
        ended = time.time()
        record = {"status": status, "error": error, "attempts": attempts + (status == "failed"), "worker": worker,
                  "host": socket.gethostname(), "pid": os.getpid(), "device": ctx.options.device, "started": started,
                  "ended": ended, "seconds": round(ended - started, 3), **stats}
        if tb:
            record["traceback"] = tb
        write_item_record(plan, item, record)
        if status == "ok":
            done.add(item.id)
        log_event(plan, "done" if status == "ok" else "failed", item, worker, seconds=record["seconds"], error=error)
        return {"id": item.id, "status": status, "seconds": record["seconds"], "error": error,
                **({"slides_per_s": stats.get("slides_per_s")} if item.kind == "extract" else {})}
    except LeaseLost as exc:
        warn(f"[{worker}] {exc}")
        log_event(plan, "lost", item, worker)
        return {"id": item.id, "status": "lost", "seconds": None, "error": str(exc)}
    finally:
        try:
            claim.release()
        except OSError:  # a read-only or full disk: the error that stopped us says so; the lease runs out
            pass


def _write_summary(plan: Plan, report: WorkerReport, options: RunOptions) -> None:
    from bench.common.files import write_json_atomic

    try:
        write_json_atomic(plan.state_dir / "workers" / f"{report.worker}.json", {
            "worker": report.worker, "host": socket.gethostname(), "pid": os.getpid(), "device": options.device,
            "ended": time.time(), "items": report.items, "stage_seconds": report.stage_seconds})
    except WriteError:
        pass


# ----------------------------------------------------------------------------- executors


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs, picklable (for multiprocessing and submitit)."""

    suite: str  # built-in name or .toml path, loaded in the worker
    datasets: tuple[str, ...] | None
    methods: tuple[str, ...] | None
    options: RunOptions
    worker: WorkerOptions
    env: tuple[tuple[str, str], ...] = ()


def load_selected(spec: WorkerSpec) -> Suite:
    from bench.orchestration.suite import load_suite

    suite = load_suite(spec.suite, demo=spec.options.data_root is None)
    return suite.select(datasets=list(spec.datasets) if spec.datasets else None,
                        methods=list(spec.methods) if spec.methods else None)


def worker_entry(spec: WorkerSpec) -> dict[str, Any]:
    """Run one worker from a WorkerSpec (the function a local process or a SLURM job calls)."""
    os.environ.update(dict(spec.env))
    report = run_worker(load_selected(spec), spec.options, spec.worker)
    return {"worker": report.worker, "items": report.items, "counts": report.counts}


def _process_main(spec: WorkerSpec) -> None:  # pragma: no cover - runs in a child process
    try:
        worker_entry(spec)
    except KeyboardInterrupt:
        sys.exit(130)
    except WriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def visible_gpus() -> list[str]:
    """GPU ids to give one worker each: CUDA_VISIBLE_DEVICES if set, else every device torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip()]
    if not _cuda_available():
        return []
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def run_local(spec: WorkerSpec, jobs: int | None, *, progress_every: float = 5.0) -> int:
    """Start `jobs` worker processes here (default: one per visible GPU, else 2) and wait; returns the failures.

    On a GPU machine each worker sees one GPU (CUDA_VISIBLE_DEVICES) and runs on cuda:0; items that
    need several GPUs (GMA) get one more worker with all of them once the others are finished.
    """
    import multiprocessing

    gpus = visible_gpus() if str(spec.options.device) in ("auto", "cuda") or str(spec.options.device).startswith(
        "cuda") else []
    n = jobs if jobs is not None else (len(gpus) or 2)
    if n < 1:
        raise ConfigError(f"--jobs must be at least 1, got {n}")
    mp = multiprocessing.get_context("spawn")
    suite = load_selected(spec)
    plan = build_plan(suite, spec.options)
    check_writable(plan.state_dir)

    def start(i: int, env: dict[str, str], options: RunOptions, wopts: WorkerOptions) -> Any:
        child = replace(spec, options=options, worker=wopts, env=tuple(env.items()))
        p = mp.Process(target=_process_main, args=(child,), name=f"bench-worker-{i}")
        p.start()
        return p

    procs = []
    base = spec.worker.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    for i in range(n):
        env, options = {}, spec.options
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
            options = replace(options, device="cuda:0")
        procs.append(start(i, env, options, replace(spec.worker, worker_id=f"{base}-w{i}")))
    info(f"{n} local worker(s) on {plan.suite.name} ({len(plan.items)} items)"
         + (f", GPUs {', '.join(gpus[:n])}" if gpus else ""))
    _wait(procs, plan, progress_every)
    if gpus and len(gpus) > 1:  # items that need several GPUs: one worker with all of them
        ctx = Context(plan)
        if any(s.state == "ready" and s.item.gpus > 1 for s in item_states(ctx)):
            big = start(n, {"CUDA_VISIBLE_DEVICES": ",".join(gpus)}, replace(spec.options, device="cuda:0"),
                        replace(spec.worker, worker_id=f"{base}-gma", gpus=len(gpus)))
            _wait([big], plan, progress_every)
    final = counts(item_states(Context(plan)))
    info("items: " + ", ".join(f"{k} {v}" for k, v in final.items() if v))
    return sum(p.exitcode not in (0, None) for p in procs)


def _wait(procs: Sequence[Any], plan: Plan, every: float) -> None:
    from bench.orchestration.plan import read_events

    last = 0.0
    total = len(plan.items)
    try:
        while any(p.is_alive() for p in procs):
            for p in procs:
                p.join(timeout=0.5)
            if time.time() - last >= every:
                last = time.time()
                events = read_events(plan.options.workdir, plan.suite.name)
                finished = {e["item"] for e in events if e.get("event") in ("done", "failed")}
                running = {e["item"] for e in events if e.get("event") == "start"} - finished
                info(f"progress: {len(finished)}/{total} items recorded this far, {len(running)} running")
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(timeout=10)
        raise


@dataclass(frozen=True)
class SlurmOptions:
    """What `--executor slurm` asks SLURM for (flags, or the suite's [slurm] table)."""

    partition: str | None = None
    gpus_per_worker: int = 1
    cpus_per_worker: int = 8
    mem_gb: float | None = None
    time_min: int = 24 * 60
    array_parallelism: int | None = None
    gma_gpus: int | None = None  # GPUs of the GMA allocation (default: the largest nproc of the plan)
    extra: tuple[tuple[str, str], ...] = ()  # extra sbatch options, e.g. (("account", "lab"),)
    log_dir: Path | None = None  # default: <workdir>/work/<suite>/slurm


def submit_slurm(spec: WorkerSpec, jobs: int, slurm: SlurmOptions = SlurmOptions(), *,
                 cluster: str = "slurm") -> list[Any]:
    """Submit `jobs` workers as one job array, plus one job with `gma_gpus` GPUs when the plan has GMA items.

    `cluster="local"` (or "debug") runs the same jobs through submitit's local executor, without SLURM.

    Raises:
        ConfigError: `sbatch` is not on PATH (cluster "slurm") or submitit is not installed.
    """
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError("--executor slurm needs SLURM's `sbatch` on PATH, and it is not there. On a machine "
                          "without SLURM use --executor local --jobs N, or start workers yourself with "
                          "`bench worker --suite NAME --workdir W` (any number of them can share the work folder)")
    try:
        import submitit
    except ImportError:  # pragma: no cover - a core dependency
        raise ConfigError("--executor slurm needs submitit: pip install submitit") from None
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    suite = load_selected(spec)
    plan = build_plan(suite, spec.options)
    folder = slurm.log_dir or (state_dir(spec.options.workdir, suite.name) / "slurm")
    check_writable(Path(folder))

    def executor(gpus: int, name: str) -> Any:
        ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        params: dict[str, Any] = {"timeout_min": slurm.time_min, "name": name, "tasks_per_node": 1,
                                  "cpus_per_task": slurm.cpus_per_worker}
        if cluster == "slurm":
            params.update(gpus_per_node=gpus, slurm_array_parallelism=slurm.array_parallelism or jobs)
            if slurm.partition:
                params["slurm_partition"] = slurm.partition
            if slurm.mem_gb:
                params["mem_gb"] = slurm.mem_gb
            if slurm.extra:
                params["slurm_additional_parameters"] = dict(slurm.extra)
        ex.update_parameters(**params)
        return ex

    device = "cuda:0" if cluster == "slurm" else spec.options.device
    ex = executor(slurm.gpus_per_worker, f"bench-{suite.name}")
    specs = [replace(spec, options=replace(spec.options, device=device),
                     worker=replace(spec.worker, worker_id=f"{cluster}-{suite.name}-{i}",
                                    gpus=slurm.gpus_per_worker if cluster == "slurm" else spec.worker.gpus))
             for i in range(jobs)]
    submitted = list(ex.map_array(worker_entry, specs))
    need = max((it.gpus for it in plan.items if it.kind == "train"), default=1)
    if need > slurm.gpus_per_worker:  # GMA items: one allocation with enough GPUs for their ranks
        gma = slurm.gma_gpus or need
        big = executor(gma, f"bench-{suite.name}-gma")
        submitted.append(big.submit(worker_entry, replace(
            spec, options=replace(spec.options, device=device),
            worker=replace(spec.worker, worker_id=f"{cluster}-{suite.name}-gma",
                           gpus=gma if cluster == "slurm" else spec.worker.gpus))))
    info(f"submitted {len(submitted)} worker job(s) for {suite.name} ({cluster}); logs in {folder}; "
         f"progress: bench status --suite {spec.suite} --workdir {spec.options.workdir}")
    return submitted


__all__ = ["WorkerOptions", "WorkerReport", "WorkerSpec", "SlurmOptions", "run_worker", "worker_entry", "run_local",
           "submit_slurm", "EXECUTORS", "capacity", "visible_gpus"]
