"""`ftctl status`: one job in human units: phase, plan, progress, conditions and its latest events.

ftctl status NAME [-n NAMESPACE]
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from finetune_operator.api.models import FineTuneJobStatus
from finetune_operator.api.text import count
from finetune_operator.cli.common import (
    HelpFormatter,
    add_cluster_options,
    add_output_option,
    age,
    client_for,
    columns,
    document,
    emit,
)
from finetune_operator.core.status import parse_time


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "status",
        help="one job's plan, progress, conditions and events",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    p.add_argument("name", help="the job")
    add_cluster_options(p)
    add_output_option(p)
    p.set_defaults(run=run)


def describe(job: dict[str, Any], events: list[dict[str, Any]], now: datetime) -> str:
    """The text `ftctl status` prints (pure: the job and its events in, lines out)."""
    meta = job["metadata"]
    status = FineTuneJobStatus.model_validate(job.get("status") or {})
    lines = [
        f"FineTuneJob {meta['namespace']}/{meta['name']}: {status.phase or 'Pending'}, {status.message or ''}".rstrip(
            ", "
        )
    ]
    if status.plan is not None:
        plan = status.plan
        lines.append(
            f"Plan:        {plan.message} ({plan.gpu_type or 'any GPU'}, offload {plan.offload.value})"
        )
    progress = status.progress
    if progress is not None:
        parts = [progress.display or f"step {progress.step}"]
        if progress.loss is not None:
            parts.append(f"loss {progress.loss:g}")
        if progress.tokens_per_second:
            parts.append(f"{progress.tokens_per_second:,.0f} tokens/s")
        if progress.peak_memory:
            parts.append(f"peak {progress.peak_memory} per GPU")
        if progress.eta:
            parts.append(f"ETA {progress.eta}")
        lines.append(f"Progress:    {', '.join(parts)}")
    if status.last_checkpoint is not None:
        lines.append(f"Checkpoint:  step {status.last_checkpoint.step} at {status.last_checkpoint.path}")
    workers = status.workers
    if workers is not None:
        lines.append(
            f"Workers:     {workers.running}/{workers.total} running, {workers.pending} pending, "
            f"{workers.succeeded} succeeded, {workers.failed} failed; {count(status.restarts, 'restart')}, "
            f"{count(status.disruptions, 'disruption')}, {count(status.relaunches, 'relaunch')}"
        )
    if status.conditions:
        lines.append("Conditions:")
        rows = [["TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"]]
        rows += [
            [
                c.type,
                c.status,
                c.reason or "",
                age(parse_time(c.last_transition_time), now),
                (c.message or "")[:100],
            ]
            for c in status.conditions
        ]
        lines += ["  " + line for line in columns(rows).splitlines()]
    if events:
        lines.append("Events (newest last):")
        rows = [["AGE", "TYPE", "REASON", "FROM", "MESSAGE"]]
        rows += [
            [
                age(e["time"], now),
                e["type"] or "",
                e["reason"] or "",
                e["from"] or "",
                (e["message"] or "")[:100],
            ]
            for e in events
        ]
        lines += ["  " + line for line in columns(rows).splitlines()]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    client = client_for(args)
    job, events = client.get(args.name), client.events(args.name)
    data = document("Status", {"job": job, "events": [{**e, "time": str(e["time"])} for e in events]})
    emit(data, args.output, describe(job, events, datetime.now(UTC)))
    return 0
