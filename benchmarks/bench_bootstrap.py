"""Bootstrap benchmark: vectorised AUC and C-index against a plain scikit-learn / scikit-survival loop.

For 1,000 and 10,000 predictions, 1000 resamples are drawn once
(`bench.evaluation.metrics.draw_resamples`); then the same resamples are evaluated twice
in the same run: (1) the project's vectorised `resample_values` (weights per
row, no materialised copies) and (2) a plain loop that materialises each
resample and calls `sklearn.metrics.roc_auc_score` /
`sksurv.metrics.concordance_index_censored`. Prints both times (vectorised:
best of 3; also the whole `bootstrap_metrics` call, drawing included), the speed
ratio (goal >= 20x; also against the whole call) and the largest difference between the per-resample
values and between the 95% percentile intervals (expected: identical up to
float rounding, <= 1e-12).

The scikit-survival loop at 10,000 predictions takes several minutes; with
`--loop-resamples K` only the first K resamples are looped, the loop time is
scaled to 1000 and the interval check is skipped (values are still compared).

Run: .venv/bin/python benchmarks/bench_bootstrap.py [--loop-resamples 1000] [--sizes 1000 10000]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import numpy as np
import pandas as pd


def _frames(n: int, seed: int) -> dict[str, pd.DataFrame]:
    from bench.evaluation.tasks import Targets, make_task

    rng = np.random.default_rng(seed)
    ids = [f"b{i}" for i in range(n)]
    y = rng.integers(0, 2, n)
    p1 = 1 / (1 + np.exp(-(1.5 * (2 * y - 1) + rng.normal(scale=2.0, size=n))))
    cls = make_task("classification").prediction_frame(ids, ids, Targets(label=y), np.c_[1 - p1, p1])
    time_ = np.round(rng.exponential(365.0, n))  # days: tied times as in real cohorts
    event = rng.random(n) < 0.4
    risk = -np.log1p(time_) + rng.normal(scale=1.5, size=n)
    surv = pd.DataFrame({"bag_id": ids, "patient_id": ids, "time": time_, "event": event.astype(int), "risk": risk})
    return {"auc": cls, "c_index": surv}


def _loop(metric: str, frame: pd.DataFrame, rows: list[np.ndarray]) -> np.ndarray:
    from sklearn.metrics import roc_auc_score
    from sksurv.metrics import concordance_index_censored

    if metric == "auc":
        y = frame["label"].to_numpy()
        s = frame["prob_1"].to_numpy()
        return np.array([roc_auc_score(y[ix], s[ix]) for ix in rows])
    t = frame["time"].to_numpy(np.float64)
    e = frame["event"].to_numpy().astype(bool)
    r = frame["risk"].to_numpy(np.float64)
    return np.array([concordance_index_censored(e[ix], t[ix], r[ix])[0] for ix in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--loop-resamples", type=int, default=None, help="loop over only this many resamples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from tabulate import tabulate

    from bench.evaluation.costs import cpu_model
    from bench.evaluation.metrics import bootstrap_metrics, draw_resamples, resample_values
    from bench.evaluation.tasks import make_task

    tasks = {"auc": make_task("classification"), "c_index": make_task("survival")}
    rows_out = []
    for n in args.sizes:
        for metric, frame in _frames(n, args.seed).items():
            task = tasks[metric]
            res = draw_resamples(task, frame, args.resamples, args.seed)
            k = min(args.loop_resamples or res.n_resamples, res.n_resamples)
            rows = [res.rows(r) for r in range(k)]

            t_fast = t_full = float("inf")
            for _ in range(3):  # best of 3: the first call pays page faults for fresh arrays
                t0 = time.perf_counter()
                fast = resample_values(task, frame, res, [metric])[metric]
                t_fast = min(t_fast, time.perf_counter() - t0)
                t0 = time.perf_counter()
                full = bootstrap_metrics(task, frame, args.resamples, args.seed, metrics=[metric])[metric]
                t_full = min(t_full, time.perf_counter() - t0)

            t0 = time.perf_counter()
            slow = _loop(metric, frame, rows)
            t_slow = (time.perf_counter() - t0) * res.n_resamples / k

            value_diff = float(np.abs(fast[:k] - slow).max())
            if k == res.n_resamples:
                ci_slow = np.percentile(slow, [2.5, 97.5])
                ci_diff = f"{max(abs(full.low - ci_slow[0]), abs(full.high - ci_slow[1])):.1e}"
            else:
                ci_diff = f"n/a ({k} looped)"
            rows_out.append([
                metric, n, res.n_resamples, f"{t_fast:.3f}", f"{t_full:.3f}",
                f"{t_slow:.2f}" + ("" if k == res.n_resamples else " (scaled)"), f"{t_slow / t_fast:.0f}x",
                f"{t_slow / t_full:.0f}x",
                f"{value_diff:.1e}", ci_diff, f"[{full.low:.4f}, {full.high:.4f}]",
            ])
            print(f"done {metric} n={n}", flush=True)

    print()
    print(f"machine: {cpu_model()}, {platform.machine()}, date {datetime.date.today()}")
    print(tabulate(rows_out, headers=[
        "metric", "n", "resamples", "vectorised s", "bootstrap_metrics s", "loop s", "speed-up", "speed-up (whole call)",
        "max |value diff|", "max |CI diff|", "95% CI",
    ], tablefmt="github"))


if __name__ == "__main__":
    main()
