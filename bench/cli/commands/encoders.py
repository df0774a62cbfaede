"""`bench encoders`: list the registered patch encoders."""

from __future__ import annotations

import argparse

HELP = "list patch encoders (source, embedding size, input size, gated, pooling)"
DESCRIPTION = (
    "List every registered patch encoder (baselines/encoders.py): where its weights come from "
    "(a timm name or a Hugging Face repo), the embedding size, input size, whether the weights are "
    "gated (licence + token), how the embedding is pooled and the preferred CUDA precision. "
    "Suite files can add encoders with an [encoders.<name>] table."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--references", action="store_true", help="also show where each spec's arguments come from")


def run(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from baselines.encoders import ENCODERS

    rows = []
    for name, spec in ENCODERS.items():
        row = [name, spec.source, spec.embed_dim, spec.input_size, "yes" if spec.gated else "no", spec.pooling,
               spec.precision]
        if args.references:
            row.append(spec.reference)
        rows.append(row)
    headers = ["name", "source", "dim", "input", "gated", "pooling", "cuda precision"]
    if args.references:
        headers.append("reference")
    print(tabulate(rows, headers=headers, tablefmt="github"))
    return 0
