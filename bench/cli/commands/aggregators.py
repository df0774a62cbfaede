"""`bench aggregators`: list the registered MIL aggregators, their sizes and defaults."""

from __future__ import annotations

import argparse

HELP = "list MIL aggregators with parameter counts and default parameters"
DESCRIPTION = (
    "List every registered MIL aggregator (baselines/mil) with its trainable parameter "
    "count for the given feature size and number of outputs, and its default parameters "
    "(override them in a suite's method params)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--in-dim", type=int, default=1024, help="feature dimension (default: 1024, ResNet-50 truncated)")
    parser.add_argument("--n-outputs", type=int, default=2, help="number of outputs (default: 2)")


def format_defaults(defaults: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in defaults.items())


def run(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from baselines.mil import AGGREGATORS, build_aggregator
    from bench.evaluation.costs import count_parameters

    rows = []
    for name, spec in AGGREGATORS.items():
        model = build_aggregator(name, args.in_dim, args.n_outputs, seed=0)
        rows.append(
            [
                name,
                f"{count_parameters(model).trainable:,}",
                "yes" if spec.permutation_invariant else "no",
                spec.aux_weight if spec.aux_weight else "-",
                format_defaults(dict(spec.defaults)),
                spec.summary,
            ]
        )
    headers = [
        "name",
        f"params (in_dim={args.in_dim}, outputs={args.n_outputs})",
        "perm. invariant",
        "aux weight",
        "defaults",
        "summary",
    ]
    print(tabulate(rows, headers=headers, tablefmt="github"))
    return 0
