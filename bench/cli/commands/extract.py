"""`bench extract`: frozen-encoder features for every tiled slide of a cohort."""

from __future__ import annotations

import argparse
import sys

HELP = "extract patch features with a frozen encoder (two-stage stage one)"
DESCRIPTION = (
    "Embed every patch of every slide with a frozen encoder and write one HDF5 per slide under "
    "<workdir>/features/<dataset>/<encoder>/<mag>x-<px>px/ (features (N, D), coords (N, 2), attrs). "
    "Coords come from `bench tile` (<workdir>/tiles/...). Finished slides are skipped; stale or invalid files "
    "of ours (NaN/inf rows, wrong shape, missing attrs) are redone, each with a line saying why; unreadable slides "
    "are skipped and listed in skipped.csv. Feature files another tool made (CLAM, TRIDENT) are never replaced: "
    "the command stops and names them (train on them with `bench train --features DIR`). Weights: --weights FILE, "
    "else the local Hugging Face cache, else the Hub (HF_TOKEN); --random-init only on request."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", "--out", dest="workdir", required=True, help="work folder")
    p.add_argument("--cohort", required=True, help="cohort folder (labels.csv + slides/)")
    p.add_argument("--dataset", help="dataset name (default: the cohort's name)")
    p.add_argument("--encoder", required=True, help="encoder name (see `bench encoders`)")
    p.add_argument("--magnification", type=float, nargs="+", default=[20.0],
                   help="magnification(s) of the coords to use (default: 20)")
    p.add_argument("--patch-size", type=int, default=256, help="patch size of the coords (default: 256)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="patches per forward pass (default: 256 on CUDA; on CPU 8 at 224 px, up to 64 for "
                        "small inputs, where larger batches run slower)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers reading patches (default: chosen from the cores and the device: on CPU "
                        "none unless the cores exceed the encoder's threads, on CUDA up to 8; printed at the start)")
    p.add_argument("--reader", choices=("openslide", "tiffslide"),
                   help="slide reader backend (default: $BENCH_SLIDE_READER, else openslide; tiffslide needs "
                        "`pip install 'cpath-bench[tiffslide]'`)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                   help="CUDA autocast precision (default: the encoder's preferred one; CPU runs fp32)")
    p.add_argument("--weights", help="local weights file (.safetensors, or .pt/.bin read with weights_only) "
                                     "or a downloaded Hub snapshot folder")
    p.add_argument("--random-init", action="store_true",
                   help="random weights (smoke tests only; recorded as weights id 'random-init')")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init (default: 0)")
    p.add_argument("--input-size", type=int, help="feed the encoder this image size instead of its default")
    p.add_argument("--float16", action="store_true", help="store features as float16")
    p.add_argument("--threads", type=int, help="torch threads of the main process (default: torch's)")
    p.add_argument("--force", action="store_true", help="re-extract slides even when up to date")


def run(args: argparse.Namespace) -> int:
    from baselines.encoders import get_encoder
    from baselines.extract import ExtractOptions, extract_cohort, pending_slides, summarize
    from baselines.features import refuse_foreign
    from bench.data.cohort import load_cohort
    from bench.common.console import info
    from bench.common.errors import MissingFileError
    from bench.data.layout import Layout

    if args.reader is not None:
        import os

        from bench.data.slides import READER_ENV, require_reader

        require_reader(args.reader)  # not installed: the pip install, before any work
        os.environ[READER_ENV] = args.reader  # this process and its reading workers
    spec = get_encoder(args.encoder)  # an unknown name fails before the cohort is read
    if args.input_size is not None:
        spec = spec.with_input_size(args.input_size)
    options = ExtractOptions(batch_size=args.batch_size, num_workers=args.workers, device=args.device,
                             float16=args.float16, precision=args.precision, force=args.force,
                             torch_threads=args.threads)
    cohort = load_cohort(args.cohort)
    dataset = args.dataset or cohort.name
    layout = Layout(args.workdir)
    source = spec.resolve_weights(args.weights, random_init=args.random_init)
    init_seed = args.seed if args.random_init else None
    encoder = None  # built only when some slide needs it: a rerun over finished slides loads no weights
    empty: list[str] = []  # magnifications that were asked for and produced no feature file
    missing = [layout.tiles_dir(dataset, mag, args.patch_size) for mag in args.magnification
               if not layout.tiles_dir(dataset, mag, args.patch_size).is_dir()]
    if missing:  # one clear message instead of every slide skipped for want of its coords file
        raise MissingFileError(
            f"no coords in {', '.join(map(str, missing))}: tile the cohort at this magnification and patch size "
            f"first (`bench tile --cohort {args.cohort} --out {args.workdir} --magnification "
            f"{' '.join(f'{m:g}' for m in args.magnification)} --patch-size {args.patch_size}`"
            + (f" --dataset {args.dataset}" if args.dataset else "") + ")")
    for mag in args.magnification:
        coords_dir = layout.tiles_dir(dataset, mag, args.patch_size)
        out_dir = layout.features_dir(dataset, args.encoder, mag, args.patch_size)
        jobs = cohort.slide_jobs()
        refuse_foreign(out_dir / f"{job.slide_id}.h5" for job in jobs)  # another tool's files: stop before loading
        if not args.force and not pending_slides(jobs, coords_dir, out_dir, spec, source.weights_id, init_seed,
                                                 float16=args.float16):
            info(f"features of all {len(jobs)} slides in {out_dir} are up to date ({source.weights_id})")
            continue  # nothing to do is success
        if encoder is None:
            encoder = spec.build(source, seed=args.seed)
            info(f"encoder {args.encoder}: weights {encoder.weights_id}")
        report = extract_cohort(jobs, coords_dir, out_dir, encoder, options, magnification=mag,
                                patch_size=args.patch_size)
        summarize(report, out_dir)
        if not report.done:
            empty.append(f"{mag:g}x ({len(report.skipped)} skipped; reasons in {out_dir / 'skipped.csv'})")
    # exit codes as every stage: nothing left to do is success; a requested stage that produced nothing is not
    for what in empty:
        print(f"error: no feature file of {args.cohort} was extracted at {what}", file=sys.stderr)
    return 1 if empty else 0
