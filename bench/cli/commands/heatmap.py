"""`bench heatmap`: draw the attention of a run's test slides over the slides."""

from __future__ import annotations

import argparse

HELP = "draw attention heatmaps of a run's test slides (from its attention.h5) as PNGs"
DESCRIPTION = (
    "Read RUN_DIR/run.json and RUN_DIR/attention.h5 (written by every trainer when it predicts the test split "
    "with an aggregator that has attention: all but mean/max pooling) and write one PNG per test slide: the "
    "per-patch attention painted over the slide thumbnail with a colour bar, the lesion truth outlined where "
    "the cohort has masks (synthetic cohorts), and one small panel per head for multi-head aggregators (ABMILX). "
    "Prints the paths of the PNGs."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (runs/<suite>/<dataset>/<method>/<split>/)")
    p.add_argument("--slide", action="append", dest="slides", metavar="ID",
                   help="only this test slide (repeatable; default: every slide of attention.h5)")
    p.add_argument("--out", help="folder for the PNGs (default: RUN_DIR/heatmaps/)")
    p.add_argument("--max-slides", type=int, help="at most this many slides")
    p.add_argument("--cohort", help="the cohort folder (labels.csv + slides/), when attention.h5 does not record "
                                    "it and the run's work folder does not hold it (data/<dataset>/)")
    p.add_argument("--max-side", type=int, default=1024,
                   help="longer side of the thumbnail, in pixels (default: 1024)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bench.common.console import info
    from bench.common.errors import ConfigError
    from bench.evaluation.heatmaps import heatmaps_for_run

    if args.max_slides is not None and args.max_slides < 1:
        raise ConfigError(f"--max-slides must be at least 1, got {args.max_slides}")
    if args.max_side < 64:
        raise ConfigError(f"--max-side must be at least 64 pixels, got {args.max_side}")
    paths = heatmaps_for_run(Path(args.run_dir), Path(args.out) if args.out else None, slides=args.slides,
                             max_slides=args.max_slides, cohort_root=args.cohort, max_side=args.max_side)
    for path in paths:
        print(path)
    info(f"{len(paths)} heatmap(s) written")
    return 0
