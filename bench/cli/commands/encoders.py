"""`bench encoders`: list the registered patch encoders (baselines/encoders.toml) and slide encoders."""

from __future__ import annotations

import argparse

HELP = "list patch and slide encoders (embedding size, input size, magnification, gated, licence)"
DESCRIPTION = (
    "List every registered patch encoder (baselines/encoders.toml): the embedding size, input size and "
    "magnification it was trained at, whether the weights are gated (licence + token), the licence, where "
    "its weights come from, how the embedding is pooled and the weights format (only 'timm' loads here). "
    "Then the slide encoders with the patch encoder and magnification each needs. Suite files can add "
    "patch encoders with an [encoders.<name>] table."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--references", action="store_true",
                        help="also show each entry's model card and what was looked up there")
    parser.add_argument("--check", nargs="*", metavar="NAME", default=None,
                        help="build the named patch encoders (all if none named) on the meta device (no weights, "
                             "no download) and print the embedding size and parameter count they produce")


def run(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from baselines.encoders import ENCODERS, check_on_meta, get_encoder
    from baselines.encoders_slide import SLIDE_ENCODERS

    if args.check is not None:
        rows = []
        for name in args.check or ENCODERS.names():
            spec = get_encoder(name)
            dim, params = check_on_meta(spec)  # a contradiction raises, naming the entry and field
            rows.append([name, spec.embed_dim, dim, spec.input_size, f"{params:,}", "ok"])
        print(tabulate(rows, headers=["name", "claimed dim", "meta dim", "input", "parameters", "check"],
                       tablefmt="github"))
        return 0

    rows = []
    for name, spec in ENCODERS.items():
        row = [name, spec.embed_dim, spec.input_size, spec.magnification or "-", "yes" if spec.gated else "no",
               spec.licence or "-", spec.source, spec.pooling, spec.weights_format]
        if args.references:
            row += [spec.reference, spec.source_note]
        rows.append(row)
    headers = ["name", "dim", "input", "magnification", "gated", "licence", "source", "pooling", "format"]
    if args.references:
        headers += ["reference", "looked up"]
    print(f"patch encoders ({len(rows)})")
    print(tabulate(rows, headers=headers, tablefmt="github"))
    slide_rows = []
    for name, spec in SLIDE_ENCODERS.items():
        row = [name, spec.embed_dim, spec.patch_encoder, spec.patch_dim, spec.magnification, "yes" if spec.gated else "no",
               spec.licence, spec.source, "yes" if spec.implemented else "no"]
        if args.references:
            row += [spec.reference, spec.source_note]
        slide_rows.append(row)
    slide_headers = ["name", "dim", "patch encoder", "patch dim", "magnification", "gated", "licence", "source",
                     "runs here"]
    if args.references:
        slide_headers += ["reference", "looked up"]
    print(f"\nslide encoders ({len(slide_rows)})")
    print(tabulate(slide_rows, headers=slide_headers, tablefmt="github"))
    return 0
