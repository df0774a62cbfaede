"""`bench gdc`: a suite's TCGA slides and labels from the GDC, into the folders `bench run --data-root` reads."""

from __future__ import annotations

import argparse

HELP = "fetch a suite's TCGA slides and labels from the GDC (gdc-client manifest, resumable md5-checked download)"
DESCRIPTION = (
    "For each real dataset of a suite, into DATA_ROOT/<data>/: look up its open diagnostic slides on the GDC API "
    "(the slides of the authors' split where the suite uses one, else every diagnostic slide of the project(s)), "
    "write gdc_manifest.<dataset>.txt for `gdc-client download -m ... -d DATA_ROOT/<data>/slides`, or download "
    "them here with --download (resumed on rerun, md5-checked, renamed only when whole), and write the labels "
    "file of the slides present: the authors' labels for a shipped split, the project for TCGA-NSCLC "
    "(LUAD/LUSC), vital status and days to death / last follow-up for survival cohorts. Datasets not on the GDC "
    "(PANDA) get their labels from the shipped split for the slides found in slides/. Rerun after downloading "
    "with gdc-client to refresh the labels (--offline reuses the saved listing)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", required=True, help="built-in suite name or path to a suite .toml")
    p.add_argument("--data-root", required=True, help="folder with one subfolder per dataset (created if needed)")
    p.add_argument("--datasets", nargs="+", metavar="NAME", help="only these datasets (names or glob patterns)")
    p.add_argument("--download", action="store_true", help="download the slides too (default: manifest + labels)")
    p.add_argument("--offline", action="store_true",
                   help="no network: reuse the listing a previous run saved (gdc_files.<dataset>.json)")
    p.add_argument("--retries", type=int, default=2,
                   help="tries more per slide whose transfer fails, resuming what arrived (default: 2)")
    p.add_argument("--api", default=None, help="GDC API base URL (default: https://api.gdc.cancer.gov)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tabulate import tabulate

    from bench.common.console import info, warn
    from bench.common.errors import ConfigError
    from bench.data.gdc import API, GdcClient, cohort_projects, fetch_cohort, human_size
    from bench.orchestration.suite import load_suite

    if args.download and args.offline:
        raise ConfigError("--download needs the network; drop --offline")
    suite = load_suite(args.suite).select(datasets=args.datasets)
    root = Path(args.data_root)
    client = GdcClient(args.api or API)
    rows, failed = [], 0
    for ds in suite.datasets:
        source = ds.split.get("source") if ds.split.get("protocol") == "paper" else None
        projects = cohort_projects(ds.data)
        if projects is None and source is None:
            warn(f"[{ds.name}] {ds.data} is not a GDC project and the suite ships no split for it: skipped")
            continue
        out = fetch_cohort(root / ds.data, ds.name, task=ds.task, classes=ds.classes, labels_name=ds.labels,
                           paper_source=source, projects=projects, client=client, offline=args.offline,
                           download=args.download, retries=max(0, args.retries))
        if out.not_on_gdc:
            warn(f"[{ds.name}] {len(out.not_on_gdc)} slide(s) of the authors' split are not listed by the GDC "
                 f"(renamed or withdrawn since): {', '.join(out.not_on_gdc[:10])}"
                 + (" ..." if len(out.not_on_gdc) > 10 else ""))
        if out.left_out:
            warn(f"[{ds.name}] {len(out.left_out)} patient(s) without a usable survival time are left out of "
                 f"{ds.labels}: " + ", ".join(f"{p} ({why})" for p, why in out.left_out[:10])
                 + (" ..." if len(out.left_out) > 10 else ""))
        if out.download is not None:
            for name, why in out.download.failed:
                warn(f"[{ds.name}] {name}: {why}")
            failed += len(out.download.failed)
        if projects is None:
            info(f"[{ds.name}] {ds.data} is not on the GDC: put its slides in {out.folder / 'slides'} "
                 f"(labels written for the {out.present} found)")
        rows.append([ds.name, ds.data, out.listed, human_size(out.total_bytes) if out.total_bytes else "-",
                     f"{out.present} / {out.listed}", str(out.labels), str(out.manifest or "-")])
    print(tabulate(rows, headers=["dataset", "folder", "slides", "size", "present", "labels", "manifest"],
                   tablefmt="github"))
    if failed:
        info(f"{failed} download(s) failed; rerun the same command to resume them")
        return 1
    return 0
