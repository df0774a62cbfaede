"""`bench`: the command-line entry point.

Each verb lives in `bench/cli/commands/<verb>.py` with `HELP` (one line),
`add_arguments(parser)` and `run(args) -> int`; heavy imports (torch, openslide)
happen inside `run`, so `bench --help` is instant and nothing runs at import.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from bench import __version__
from bench.common.errors import BenchError

# (verb, module) in the order `bench --help` shows them: the path of one slide.
COMMANDS: tuple[tuple[str, str], ...] = (
    ("gdc", "bench.cli.commands.gdc"),
    ("synth", "bench.cli.commands.synth"),
    ("tile", "bench.cli.commands.tile"),
    ("split", "bench.cli.commands.split"),
    ("encoders", "bench.cli.commands.encoders"),
    ("extract", "bench.cli.commands.extract"),
    ("pack", "bench.cli.commands.pack"),
    ("aggregators", "bench.cli.commands.aggregators"),
    ("train", "bench.cli.commands.train"),
    ("check-gma", "bench.cli.commands.check_gma"),
    ("sweep", "bench.cli.commands.sweep"),
    ("run", "bench.cli.commands.run"),
    ("worker", "bench.cli.commands.worker"),
    ("status", "bench.cli.commands.status"),
    ("leaderboard", "bench.cli.commands.leaderboard"),
    ("runs", "bench.cli.commands.runs"),
    ("heatmap", "bench.cli.commands.heatmap"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench",
        description=(
            "Benchmark harness for computational pathology: two-stage (frozen encoder + MIL) "
            "vs end-to-end training, on identical splits, with bootstrap CIs and costs."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="<command>")
    for verb, module_name in COMMANDS:
        module = importlib.import_module(module_name)
        p = sub.add_parser(verb, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP))
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `bench` with `argv` (default: sys.argv[1:]); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a write that did not go through atomic_path: still one line, no traceback
        from bench.common.errors import WriteError
        from bench.common.files import write_errno

        if write_errno(exc) is None:
            raise
        print(f"error: {WriteError(exc.filename or '?', exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished outputs are kept; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
