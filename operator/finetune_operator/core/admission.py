"""What the validating admission webhook answers for a FineTuneJob: the controller's own verdict.

`kubectl apply` of a job that cannot run (it does not fit on any GPU count the planner tries, an explicit
`gpus` that cannot be spread evenly, a reserved env name, an unusable URI, a GPU the cluster's placement
preset cannot name) is refused with the message the controller would fail it with, the planner's "would
fit" suggestions included, instead of being accepted and failed a moment later. It runs `desire`, the
controller's pipeline, so the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from finetune_operator.core.desire import SpecProblem, desire, parse_job
from finetune_operator.core.gang import JobRef, RenderOptions


def review(body: Mapping[str, Any], old: Mapping[str, Any] | None, options: RenderOptions) -> str | None:
    """None to admit `body`; otherwise the message to refuse it with.

    On update only a changed spec is judged: the controller and kopf write metadata and status of jobs
    that were admitted while the webhook was down (and failed as MemoryFits since), and those writes
    must go through.
    """
    if old is not None and old.get("spec") == body.get("spec"):
        return None
    job = parse_job(body)
    if isinstance(job, SpecProblem):
        return f"{job.reason}: {job.message}"
    meta = body.get("metadata") or {}
    # A job being created has no UID yet; nothing the verdict depends on reads it.
    ref = JobRef(
        meta.get("name", ""), meta.get("namespace", ""), meta.get("uid", ""), meta.get("generation", 1)
    )
    verdict = desire(job, ref, options, attempt=0)
    if isinstance(verdict, SpecProblem):
        return f"{verdict.reason}: {verdict.message}"
    return None
