"""`bench check-gma`: the GMA paper's gradient-equivalence experiment, runnable anywhere."""

from __future__ import annotations

import argparse

HELP = "check that gather/scatter GMA training (1+N processes, chunked) equals one-process training"
DESCRIPTION = (
    "The GMA paper's equivalence experiment (section 3.1) as a command: a deterministic toy encoder and the GMA "
    "aggregator train for a few steps on random tiles as one process (all K tiles in one forward), in chunked mode, "
    "and as 1 aggregator + N encoder processes under torchrun (gloo, CPU), and the largest relative differences of "
    "gradients, parameters and loss are printed. Passes when every float64 run is within 1e-10; the float32 figures "
    "are shown too. K is divisible by neither 2 nor 3, so the encoder ranks get uneven shares. Exit status 0 on pass, "
    "1 on failure. --batchnorm plain shows why plain BatchNorm breaks the equivalence (it fails on purpose)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, nargs="+", default=[3, 4], metavar="WORLD",
                   help="world sizes to run, 1 aggregator + N encoder processes (default: 3 4, i.e. N = 2 and 3)")
    p.add_argument("--dtype", choices=("float64", "float32"), nargs="+", default=["float64", "float32"],
                   help="precisions (default: both; only float64 is judged against the tolerance)")
    p.add_argument("--steps", type=int, default=4, help="optimisation steps (default: 4)")
    p.add_argument("--tiles", type=int, default=7, help="K, tiles per step (default: 7)")
    p.add_argument("--chunk", type=int, default=3, help="tiles per chunk when re-encoding (default: 3)")
    p.add_argument("--batchnorm", choices=("none", "frozen", "plain"), default="none",
                   help="BatchNorm in the toy encoder: none, frozen (running statistics: equivalent) or plain "
                        "(batch statistics: not equivalent) (default: none)")
    p.add_argument("--no-recompute", action="store_true",
                   help="skip the distributed runs whose encoder ranks re-encode their share in chunks")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds a process may wait for another before the job fails (default: 120)")
    p.add_argument("--seed", type=int, default=0, help="seed of the toy models and tiles (default: 0)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bench.common.files import write_json_atomic
    from e2e.gma.check import CheckProblem, check_gma

    problem = CheckProblem(steps=args.steps, tiles=args.tiles, chunk=args.chunk, batchnorm=args.batchnorm,
                           seed=args.seed)
    report = check_gma(args.nproc, args.dtype, problem=problem, recompute=not args.no_recompute,
                       timeout_s=args.timeout)
    print(report.to_text())
    if args.json:
        write_json_atomic(Path(args.json), report.to_dict())
    return 0 if report.passed else 1
