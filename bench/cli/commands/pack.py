"""`bench pack`: every tiled patch of a cohort as JPEG bytes in one HDF5 store per slide (E2E reads)."""

from __future__ import annotations

import argparse

HELP = "pack tiled patches into JPEG HDF5 stores for fast end-to-end training reads"
DESCRIPTION = (
    "Read every patch at the coords of `bench tile` once through OpenSlide and store it as JPEG bytes "
    "(4:4:4, with a CRC32 per patch) in one HDF5 per slide under <workdir>/patches/<dataset>/<mag>x-<px>px/. "
    "E2E training with source = \"packed\" then decodes one JPEG per patch instead of reading the pyramid. "
    "Resumable: up-to-date stores are kept, a re-tiled slide is re-packed, a killed run leaves whole stores "
    "only; unreadable slides are skipped and listed in skipped.csv."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cohort", required=True, help="cohort folder (labels.csv + slides/)")
    p.add_argument("--workdir", "--out", dest="workdir", required=True, help="work folder (the one `bench tile` wrote)")
    p.add_argument("--dataset", help="dataset name (default: the cohort's name)")
    p.add_argument("--magnification", type=float, nargs="+", default=[10.0],
                   help="magnification(s) of the coords to pack, e.g. 10 5 for MRIS (default: 10, the E2E main "
                        "scale)")
    p.add_argument("--patch-size", type=int, default=256, help="patch size of the coords (default: 256)")
    p.add_argument("--quality", type=int, default=95,
                   help="JPEG quality 1..100 (default: 95, mean abs error ~1 grey level)")
    p.add_argument("--force", action="store_true", help="re-pack slides even when their store is up to date")


def _missing_tiles_message(args: argparse.Namespace, missing: list) -> str:
    mags = " ".join(f"{m:g}" for m in args.magnification)
    return (f"no coords in {', '.join(str(d) for d in missing)}: the cohort is not tiled at this magnification and "
            f"patch size. Run `bench tile --cohort {args.cohort} --out {args.workdir} --magnification {mags} "
            f"--patch-size {args.patch_size}" + (f" --dataset {args.dataset}" if args.dataset else "")
            + "` first")


def run(args: argparse.Namespace) -> int:
    from bench.data.cohort import load_cohort
    from bench.common.console import info
    from bench.common.errors import MissingFileError
    from bench.data.layout import Layout
    from e2e.patches import pack_cohort

    cohort = load_cohort(args.cohort)
    dataset = args.dataset or cohort.name
    layout = Layout(args.workdir)
    mags = list(dict.fromkeys(args.magnification))
    missing = [layout.tiles_dir(dataset, m, args.patch_size) for m in mags
               if not layout.tiles_dir(dataset, m, args.patch_size).is_dir()]
    if missing:  # one clear message before anything is packed
        raise MissingFileError(_missing_tiles_message(args, missing))
    ok = True
    for mag in mags:
        tiles_dir = layout.tiles_dir(dataset, mag, args.patch_size)
        out_dir = layout.patches_dir(dataset, mag, args.patch_size)
        report = pack_cohort(cohort, tiles_dir, out_dir, quality=args.quality, force=args.force)
        n_bytes = sum(r.n_bytes for r in report.done)
        info(f"packed {len(report.done)} slides into {out_dir} ({report.n_new} new, "
             f"{len(report.done) - report.n_new} up to date), {report.n_patches} patches, {n_bytes / 2**20:.1f} MiB"
             + (f"; skipped {len(report.skipped)} (see {out_dir / 'skipped.csv'})" if report.skipped else ""))
        for slide_id, reason in report.skipped:
            info(f"  skipped {slide_id}: {reason}")
        ok = ok and bool(report.done)
    return 0 if ok else 1
