"""`ftctl`: estimate GPU memory, plan a FineTuneJob, or run one locally, before it reaches the cluster.

Each subcommand lives in its own module with `add_parser(subparsers)` and `run(args) -> int`; bad input
exits 2 with one line naming the problem, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

from finetune_operator import __version__
from finetune_operator.cli import completion, estimate, models, plan, render, train
from finetune_operator.cli.common import CliError

SUBCOMMANDS: tuple[ModuleType, ...] = (estimate, plan, render, train, models, completion)
USAGE_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftctl",
        description="Plan and try FineTuneJobs: how much GPU memory, how many GPUs, which ZeRO stage.",
    )
    parser.add_argument("--version", action="version", version=f"ftctl {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except (CliError, ValueError, OSError) as exc:
        print(f"ftctl {args.command}: {exc}", file=sys.stderr)
        return USAGE_ERROR
    return code


if __name__ == "__main__":
    raise SystemExit(main())
