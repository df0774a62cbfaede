"""`bench split`: write (or verify) the patient-level split file of a cohort."""

from __future__ import annotations

import argparse

HELP = "write the patient-level, stratified split file of a cohort (verified, never rewritten)"
DESCRIPTION = (
    "Write <workdir>/splits/<dataset>/<protocol>-seed<k>.csv (+ .sha256): patient-level splits stratified "
    "by label (survival: event x time bin). Protocols: holdout (--ratios 0.7 0.3 with --val-fraction, or "
    "--ratios 0.7 0.1 0.2), kfold (--folds), mccv (--repeats random holdouts), paper (--source: a split the "
    "authors published, shipped with the package). An existing file is verified against its sha256 and the "
    "settings, and never rewritten."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from bench.data.paper import PAPER_SPLITS  # data only: no heavy import

    p.add_argument("--cohort", required=True, help="cohort folder (labels.csv + slides/)")
    p.add_argument("--out", "--workdir", dest="out", required=True, help="work folder")
    p.add_argument("--dataset", help="dataset name (default: the cohort's name)")
    p.add_argument("--protocol", choices=("holdout", "kfold", "mccv", "paper"), default="holdout",
                   help="split protocol (default: holdout)")
    p.add_argument("--source", choices=sorted(PAPER_SPLITS), default=None,
                   help="paper: the shipped split to write")
    p.add_argument("--allow-missing-slides", action="store_true",
                   help="paper: write the split without the shipped slides the cohort lacks (listed)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.7, 0.3],
                   help="holdout/mccv: train test, or train val test (default: 0.7 0.3)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="share of the non-test patients carved into val; 0 = no val (default: 0.2)")
    p.add_argument("--folds", type=int, default=5, help="kfold: number of folds (default: 5)")
    p.add_argument("--repeats", type=int, default=5, help="mccv: number of random holdouts (default: 5)")
    p.add_argument("--time-bins", type=int, default=4,
                   help="survival: time-quantile bins crossed with the event for strata (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default: 0)")


def run(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from bench.data.cohort import load_cohort
    from bench.common.console import info
    from bench.data.layout import Layout
    from bench.data.splits import SplitSpec, summary, write_splits

    task = None
    if args.protocol == "paper" and args.source:  # the shipped split says what task the cohort is
        from bench.data.paper import paper_split

        task = paper_split(args.source).task
    cohort = load_cohort(args.cohort, task=task)
    dataset = args.dataset or cohort.name
    spec = SplitSpec(protocol=args.protocol, ratios=tuple(args.ratios), val_fraction=args.val_fraction,
                     folds=args.folds, repeats=args.repeats, time_bins=args.time_bins, source=args.source,
                     allow_missing=args.allow_missing_slides)
    path = Layout(args.out).split_file(dataset, spec.protocol, args.seed)
    existed = path.exists()
    splits = write_splits(cohort, args.out, spec, seed=args.seed, dataset=dataset)
    print(tabulate(summary(splits, cohort), headers="keys", tablefmt="github", showindex=False))
    verb = "verified existing split (unchanged)" if existed else "wrote split"
    info(f"{verb} {splits.path} sha256 {splits.sha256[:16]}")
    return 0
