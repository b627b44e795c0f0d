"""`ftctl get`: FineTuneJobs as `kubectl get ftj` shows them, without kubectl.

ftctl get [NAME] [-n NAMESPACE | -A] [-o table|json|yaml]
"""

from __future__ import annotations

import argparse
from typing import Any

from finetune_operator.api.models import FineTuneJobStatus
from finetune_operator.cli.common import (
    HelpFormatter,
    add_cluster_options,
    add_output_option,
    age,
    client_for,
    columns,
    emit,
)
from finetune_operator.core.status import parse_time

HEADERS = ("NAME", "PHASE", "METHOD", "GPUS", "PROGRESS", "LOSS", "ETA", "RESTARTS", "AGE")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "get",
        help="list FineTuneJobs (phase, progress, loss, ETA)",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    p.add_argument("name", nargs="?", help="one job (default: all in the namespace)")
    add_cluster_options(p)
    p.add_argument("-A", "--all-namespaces", action="store_true", help="jobs of every namespace")
    add_output_option(p)
    p.set_defaults(run=run)


def row(job: dict[str, Any], with_namespace: bool) -> list[str]:
    status = FineTuneJobStatus.model_validate(job.get("status") or {})
    progress, plan = status.progress, status.plan
    cells = [
        job["metadata"]["name"],
        status.phase or "",
        job.get("spec", {}).get("method", {}).get("type", ""),
        str(plan.gpus) if plan else "",
        (progress.display or "") if progress else "",
        "" if progress is None or progress.loss is None else f"{progress.loss:g}",
        (progress.eta or "") if progress else "",
        str(status.restarts),
        age(parse_time(job["metadata"].get("creationTimestamp"))),
    ]
    return [job["metadata"]["namespace"], *cells] if with_namespace else cells


def run(args: argparse.Namespace) -> int:
    client = client_for(args)
    jobs = [client.get(args.name)] if args.name else client.list_jobs(all_namespaces=args.all_namespaces)
    headers = ["NAMESPACE", *HEADERS] if args.all_namespaces else list(HEADERS)
    table = (
        columns([headers, *(row(job, args.all_namespaces) for job in jobs)])
        if jobs
        else "No FineTuneJobs found.\n"
    )
    data = jobs[0] if args.name else {"apiVersion": "v1", "kind": "List", "items": jobs}
    emit(data, args.output, table)
    return 0
