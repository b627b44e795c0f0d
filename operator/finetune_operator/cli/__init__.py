"""`ftctl`: estimate GPU memory and plan FineTuneJobs before they reach the cluster, run one locally, and
submit, follow and wait for them in the cluster (also as the kubectl plugin `kubectl finetune`).

Each subcommand lives in its own module with `add_parser(subparsers)` and `run(args) -> int`; bad input
exits 2 with one line naming the problem, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from finetune_operator import __version__
from finetune_operator.cli import (
    completion,
    estimate,
    export,
    get,
    logs,
    models,
    plan,
    render,
    status,
    submit,
    train,
    wait,
)
from finetune_operator.cli.common import CliError, api_message

SUBCOMMANDS: tuple[ModuleType, ...] = (
    estimate,
    plan,
    render,
    submit,
    get,
    status,
    logs,
    wait,
    train,
    export,
    models,
    completion,
)
USAGE_ERROR = 2
API_ERROR = 1


def build_parser() -> argparse.ArgumentParser:
    # Installed twice: as `ftctl`, and as `kubectl-finetune`, which kubectl runs for `kubectl finetune`.
    plugin = Path(sys.argv[0]).name == "kubectl-finetune"
    parser = argparse.ArgumentParser(
        prog="kubectl finetune" if plugin else "ftctl",
        description="Plan, try, submit and follow FineTuneJobs: how much GPU memory, how many GPUs, which "
        "ZeRO stage; then phase, progress, logs.",
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
    except Exception as exc:
        # The cluster said no (NotFound, Forbidden, ...): kubectl's exit status. Looked up, not imported:
        # only a command that loaded the kubernetes client can raise its ApiException.
        exceptions = sys.modules.get("kubernetes.client.exceptions")
        if exceptions is None or not isinstance(exc, exceptions.ApiException):
            raise
        print(f"ftctl {args.command}: {api_message(exc)}", file=sys.stderr)
        return API_ERROR
    return code


if __name__ == "__main__":
    raise SystemExit(main())
