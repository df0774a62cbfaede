"""The harness checks its own statistics: interval coverage, the paired test's false-positive rate and power.

Replicate test sets are drawn from score models whose population value is known, and each
replicate goes through the harness's own `bootstrap_metrics` / `paired_bootstrap`
(patient-level, 1000 resamples, as every run record):

- AUC: binormal scores, positives N(d, 1) and negatives N(0, 1), so the population AUC is
  Phi(d / sqrt(2)) exactly; `--bags` bags per replicate, `--prevalence` positives.
- C-index: risk x ~ N(0, 1), event time Exp(rate exp(beta x)), independent censoring
  Exp(rate c); the population Harrell's C (which depends on the censoring) is estimated
  once by Monte Carlo over `--population-pairs` random pairs of a fresh population.
- Paired test, equally good methods: two methods whose scores carry the same signal with
  independent noise (same population AUC); a rejection at p < 0.05 is a false positive.
  Identical methods are not drawn: their difference is 0 on every resample (p = 1).
- Power: the same comparison when method A's signal is stronger by `--delta`.

Goals: coverage 93-97%, false-positive rate <= 5%. With R replicates a rate near 95% has a
Monte Carlo standard error of sqrt(0.95 * 0.05 / R) (1.3 points at R = 300), printed with
every figure.

Run: .venv/bin/python benchmarks/bench_statistics.py [--replicates 300] [--bags 60]
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import time

import numpy as np
import pandas as pd
from scipy.stats import norm

from bench.evaluation.metrics import bootstrap_metrics, paired_bootstrap
from bench.evaluation.tasks import make_task


def _binary_frame(y: np.ndarray, score: np.ndarray) -> pd.DataFrame:
    p1 = 1.0 / (1.0 + np.exp(-score))
    n = len(y)
    return pd.DataFrame({"bag_id": [f"b{i}" for i in range(n)], "patient_id": [f"p{i}" for i in range(n)],
                         "label": y, "prob_0": 1.0 - p1, "prob_1": p1})


def _survival_draw(rng: np.random.Generator, n: int, beta: float, censor_rate: float) -> tuple[np.ndarray, ...]:
    x = rng.normal(size=n)
    t = rng.exponential(1.0 / np.exp(beta * x))
    c = rng.exponential(1.0 / censor_rate, size=n)
    return x, np.minimum(t, c), (t <= c)


def population_cindex(beta: float, censor_rate: float, pairs: int, seed: int) -> float:
    """Harrell's C of the population: P(x_i > x_j | t_i < t_j, event_i), by Monte Carlo over random pairs."""
    rng = np.random.default_rng([seed, 7])
    xa, ta, ea = _survival_draw(rng, pairs, beta, censor_rate)
    xb, tb, eb = _survival_draw(rng, pairs, beta, censor_rate)
    # orient every pair so that "i" is the earlier time; comparable when the earlier one had the event
    first_a = ta < tb
    xi, xj = np.where(first_a, xa, xb), np.where(first_a, xb, xa)
    ei = np.where(first_a, ea, eb)
    concordant = (xi > xj)[ei]
    return float(concordant.mean())


def _coverage(hits: list[bool]) -> tuple[float, float]:
    r = len(hits)
    p = float(np.mean(hits))
    return p, math.sqrt(max(p * (1 - p), 1e-12) / r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicates", type=int, default=300)
    ap.add_argument("--bags", type=int, default=60)
    ap.add_argument("--prevalence", type=float, default=0.4)
    ap.add_argument("--d", type=float, default=1.0, help="binormal separation of the AUC model")
    ap.add_argument("--delta", type=float, default=0.8, help="extra separation of the stronger method (power)")
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--censor-rate", type=float, default=0.5)
    ap.add_argument("--population-pairs", type=int, default=2_000_000)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    clf, surv = make_task("classification", classes=("neg", "pos")), make_task("survival")
    auc_true = float(norm.cdf(args.d / math.sqrt(2)))
    c_true = population_cindex(args.beta, args.censor_rate, args.population_pairs, args.seed)
    n_pos = int(round(args.prevalence * args.bags))
    y = np.array([1] * n_pos + [0] * (args.bags - n_pos))
    auc_hits, c_hits, false_pos, power_hits, widths = [], [], [], [], []
    started = time.perf_counter()
    for r in range(args.replicates):
        rng = np.random.default_rng([args.seed, r])
        signal = args.d * y
        a = _binary_frame(y, signal + rng.normal(size=args.bags))
        ci = bootstrap_metrics(clf, a, n_resamples=args.resamples, seed=r, metrics=["auc"])["auc"]
        auc_hits.append(ci.low <= auc_true <= ci.high)
        widths.append(ci.high - ci.low)
        b = _binary_frame(y, signal + rng.normal(size=args.bags))  # equally good, independent noise
        false_pos.append(paired_bootstrap(clf, a, b, "auc", n_resamples=args.resamples, seed=r).p_value < 0.05)
        stronger = _binary_frame(y, (args.d + args.delta) * y + rng.normal(size=args.bags))
        power_hits.append(paired_bootstrap(clf, stronger, b, "auc", n_resamples=args.resamples,
                                           seed=r).p_value < 0.05)
        x, t, e = _survival_draw(rng, args.bags, args.beta, args.censor_rate)
        frame = pd.DataFrame({"bag_id": [f"b{i}" for i in range(args.bags)],
                              "patient_id": [f"p{i}" for i in range(args.bags)], "time": t,
                              "event": e.astype(int), "risk": x})
        ci = bootstrap_metrics(surv, frame, n_resamples=args.resamples, seed=r)["c_index"]
        c_hits.append(ci.low <= c_true <= ci.high)
    seconds = time.perf_counter() - started
    rows = [
        ("coverage of the 95% AUC interval", *_coverage(auc_hits), "93-97%"),
        ("coverage of the 95% C-index interval", *_coverage(c_hits), "93-97%"),
        ("false-positive rate, paired test (equally good)", *_coverage(false_pos), "<= 5%"),
        (f"power, paired test (AUC {norm.cdf((args.d + args.delta) / math.sqrt(2)):.3f} vs {auc_true:.3f})",
         *_coverage(power_hits), "-"),
    ]
    print(f"{args.replicates} replicates of {args.bags} bags ({n_pos} positive), {args.resamples} resamples each; "
          f"population AUC {auc_true:.4f} (binormal d={args.d}), population C-index {c_true:.4f} "
          f"(beta={args.beta}, censoring rate {args.censor_rate}, {args.population_pairs:,} pairs); "
          f"mean AUC interval width {np.mean(widths):.3f}; {seconds:.0f} s")
    print()
    print("| check | rate | Monte Carlo s.e. | goal |")
    print("|---|---|---|---|")
    for name, rate, se, goal in rows:
        print(f"| {name} | {100 * rate:.1f}% | {100 * se:.1f} pts | {goal} |")
    print()
    print(f"machine: {platform.processor() or platform.machine()}, {platform.platform()}; "
          f"{datetime.datetime.now().isoformat(timespec='seconds')}")


if __name__ == "__main__":
    main()
