"""`bench synth`: write a seeded synthetic cohort of pyramidal TIFF slides."""

from __future__ import annotations

import argparse

HELP = "write a synthetic cohort (pyramidal TIFF slides + labels.csv + lesion masks)"
DESCRIPTION = (
    "Write a seeded, deterministic synthetic cohort: real pyramidal TIFF slides that OpenSlide opens, "
    "whose label lives in sparse lesions (a genuine MIL problem), with labels.csv and ground-truth masks."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", choices=("subtyping", "grading", "survival"), default="subtyping",
                   help="task the cohort is made for (default: subtyping)")
    p.add_argument("--out", required=True, help="output folder (created; rerunning resumes)")
    p.add_argument("--n-slides", type=int, default=40, help="number of slides (default: 40)")
    p.add_argument("--width", type=int, default=4096, help="level-0 width in pixels (default: 4096)")
    p.add_argument("--height", type=int, default=3072, help="level-0 height in pixels (default: 3072)")
    p.add_argument("--mpp", type=float, default=0.5, help="level-0 microns per pixel (default: 0.5 = 20x)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--workers", type=int, default=1,
                   help="slides written at once, in threads (default: 1; the files do not depend on it)")


def run(args: argparse.Namespace) -> int:
    from bench.common.console import info
    from bench.data.synthetic import SyntheticSpec, make_cohort

    spec = SyntheticSpec(kind=args.kind, n_slides=args.n_slides, width=args.width, height=args.height,
                         mpp=args.mpp, seed=args.seed)
    out = make_cohort(spec, args.out, workers=args.workers)
    info(f"synthetic {args.kind} cohort in {out} (labels.csv, slides/, masks/, cohort.json)")
    return 0
