"""Rank entry point of GMA: `torchrun --nproc-per-node N+1 -m e2e.gma --job FILE` (or `--config FILE.toml`).

`--job FILE` is the JSON job `train_gma` or `bench check-gma` writes; `--config FILE.toml`
builds one from a cohort folder, a split file and trainer parameters (multi-node runs
without the harness's runner; README, "GMA on several nodes").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bench.common.errors import BenchError, ConfigError


def main(argv: list[str] | None = None) -> int:
    """Rank entry point: `torchrun --nproc-per-node N+1 -m e2e.gma --job FILE` (or `--config FILE.toml`)."""
    parser = argparse.ArgumentParser(prog="python -m e2e.gma", description=main.__doc__)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--job", help="job file written by train_gma / bench check-gma (JSON)")
    which.add_argument("--config", help="hand-written TOML: cohort, tiles, split, out, encoder, [params] ...")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0") or 0)
    folder: Path | None = None
    job: dict | None = None
    try:
        if args.job:
            try:
                job = json.loads(Path(args.job).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise ConfigError(f"cannot read GMA job file {args.job}: {exc}") from None
        else:
            from e2e.gma.config import job_from_config

            job = job_from_config(Path(args.config))
        folder = Path(job.get("folder") or job["out"])
        from e2e.gma.launch import start_watchdog, torchrun_env

        torchrun_env()  # missing rendezvous variables / world size < 2: refuse before building anything
        start_watchdog(job, rank)  # a job launched by run_job ends with its launcher (and with torchrun)
        if job.get("kind") == "check":
            from e2e.gma.check import run_rank

            run_rank(job)
        elif job.get("kind") == "train":
            from e2e.gma.trainer import run_train_rank

            run_train_rank(job)
        else:
            raise ConfigError(f"GMA job file {args.job} has unknown kind {job.get('kind')!r}; expected train or check")
        return 0
    except BaseException as exc:  # noqa: BLE001 - every failure is reported to the parent, then re-raised/returned
        from e2e.gma.launch import ORPHAN_EXIT, LauncherGone, launcher_gone, write_error

        gone = str(exc) if isinstance(exc, LauncherGone) else launcher_gone(job) if isinstance(job, dict) else None
        if gone:
            # nobody reads the error any more, and the folder may belong to a later run: write nothing
            try:
                print(f"rank {rank}: stopped: {gone}", file=sys.stderr, flush=True)
            except Exception:  # noqa: BLE001 - the console may be gone with the launcher
                pass
            return ORPHAN_EXIT
        if folder is not None and os.environ.get("WORLD_SIZE"):
            write_error(folder, rank, exc)
        if isinstance(exc, BenchError):
            print(f"rank {rank}: error: {exc}", file=sys.stderr, flush=True)
            return 2
        raise
