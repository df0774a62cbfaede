"""`bench sweep`: Optuna search over one method's hyperparameters, scored on validation only."""

from __future__ import annotations

import argparse

HELP = "tune one method of a suite with Optuna (validation split only; resumable, shareable studies)"
DESCRIPTION = (
    "Add --trials trials to the Optuna study of every split (seed x fold) of (suite, method, dataset), each tuned "
    "on that split's own train/validation parts (nested: no split's parameters see its test patients): TPE sampler, median pruner on the "
    "per-epoch validation metric, study in SQLite under <workdir>/sweeps/ (or --storage URL, e.g. PostgreSQL, "
    "so several machines share one study). The test split is never read. Failed and NaN trials are recorded and "
    "the study goes on; a killed worker's trial is retried. `bench run --params best` then trains each split with "
    "the best parameters of that split's study."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", required=True, help="built-in suite name or path to a suite .toml")
    p.add_argument("--method", required=True, help="method name (see `bench run --suite S --list`)")
    p.add_argument("--trials", type=int, default=20, help="trials to add to the study (default: 20)")
    p.add_argument("--dataset", help="dataset to tune on (required when the suite has several)")
    p.add_argument("--data-root", help="real data root (default: the suite's synthetic demo cohorts)")
    p.add_argument("--workdir", default="workdir", help="work folder (default: workdir)")
    p.add_argument("--storage", help="Optuna RDB URL (default: sqlite under <workdir>/sweeps/...)")
    p.add_argument("--seed", type=int, help="tune only this split seed (default: every seed of the suite)")
    p.add_argument("--fold", type=int, help="tune only this fold (default: every fold the suite runs)")
    p.add_argument("--timeout", type=float, help="stop adding trials after this many seconds")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--keep-trials", action="store_true", help="keep every trial's weights")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tabulate import tabulate

    from bench.cli.commands.run import command_line
    from bench.orchestration.runner import RunOptions
    from bench.orchestration.suite import load_suite
    from bench.orchestration.sweep import run_sweep

    suite = load_suite(args.suite, demo=args.data_root is None)
    options = RunOptions(workdir=Path(args.workdir), data_root=Path(args.data_root) if args.data_root else None,
                         device=args.device, leaderboards=None, command=command_line())
    results = run_sweep(suite, args.method, args.trials, options, dataset=args.dataset, storage=args.storage,
                        seed=args.seed, fold=args.fold, timeout=args.timeout, keep_trials=args.keep_trials)
    status = 0
    for tag, best in results.items():
        print(f"study {best['study']}: {best['n_trials']} trials ({best['n_complete']} complete, "
              f"{best['n_pruned']} pruned, {best['n_failed']} failed)")
        if best["best_params"] is None:
            print(f"{tag}: no trial completed yet; see trials.csv for the errors")
            status = 1
            continue
        print(f"{tag}: best {best['metric']} = {best['best_value']:.4f} (trial {best['best_trial']})")
        rows = [[k, v, f"{best['importances'][k]:.2f}" if k in best["importances"] else "-"]
                for k, v in best["best_params"].items()]
        print(tabulate(rows, headers=["parameter", "best value", "importance"], tablefmt="github"))
    return status
