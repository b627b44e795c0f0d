"""What the validating admission webhook answers for a FineTuneJob: the verdict `ftctl plan` would give.

`kubectl apply` of a job that cannot run (it does not fit on any GPU count the planner tries, an explicit
`gpus` that cannot be spread evenly, a reserved env name, an unusable URI) is refused with the planner's
message, its "would fit" suggestions included, instead of being accepted and failed a moment later.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from finetune_operator.core.desire import SpecProblem, check, parse_job


def review(
    body: Mapping[str, Any], old: Mapping[str, Any] | None = None, placement_preset: str = "nvidia-gfd"
) -> str | None:
    """None to admit `body`; otherwise the message to refuse it with.

    On update only a changed spec is judged: the controller and kopf write metadata and status of jobs
    that were admitted while the webhook was down (and failed as MemoryFits since), and those writes
    must go through.
    """
    if old is not None and old.get("spec") == body.get("spec"):
        return None
    job = parse_job(body)
    verdict = job if isinstance(job, SpecProblem) else check(job, placement_preset)
    if isinstance(verdict, SpecProblem):
        return f"{verdict.reason}: {verdict.message}"
    return None
