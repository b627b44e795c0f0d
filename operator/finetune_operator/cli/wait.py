"""`ftctl wait`: until a job succeeds (exit 0) or fails (exit 1, with the reason), like
`kubectl wait --for=condition=Succeeded` but also ending, and saying why, when the job fails.

    ftctl wait NAME [--for phase=Running|condition=Stalled] [--timeout SECONDS] [-n NAMESPACE]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from finetune_operator.api.models import FineTuneJobStatus
from finetune_operator.cli.common import CliError, HelpFormatter, add_cluster_options, client_for

NOT_MET = 1


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "wait", help="wait until a job succeeds (or fails, or a condition holds)", description=__doc__,
        formatter_class=HelpFormatter,
    )  # fmt: skip
    p.add_argument("name", help="the job")
    add_cluster_options(p)
    p.add_argument(
        "--for", dest="until", metavar="phase=P|condition=C", help="wait for this instead of the job's end"
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait")
    p.set_defaults(run=run)


def predicate(text: str | None) -> Callable[[FineTuneJobStatus], bool] | None:
    """`phase=Running` or `condition=Stalled` (True) as a test on the status; None waits for the end."""
    if text is None:
        return None
    kind, _, value = text.partition("=")
    if kind == "phase" and value:
        return lambda status: status.phase == value
    if kind == "condition" and value:
        return lambda status: any(c.type == value and c.status == "True" for c in status.conditions)
    raise CliError(f"--for {text!r}: expected phase=PHASE or condition=TYPE")


def run(args: argparse.Namespace) -> int:
    from finetune_operator.client import JobFailed  # the kubernetes client, for cluster commands only

    until = predicate(args.until)
    try:
        status = client_for(args).wait(args.name, timeout=args.timeout, until=until)
    except (JobFailed, TimeoutError) as exc:
        print(f"ftctl wait: {exc}", file=sys.stderr)
        return NOT_MET
    print(f"finetunejob.finetune.dev/{args.name} {status.phase}: {status.message or ''}".rstrip(": "))
    return 0
