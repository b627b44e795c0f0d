"""The pure pipeline for one job: parse → plan → build the gang → refine → render, or why it cannot run.

`desire` answers either the desired gang, whose objects render when read, or the `SpecProblem` that keeps the job from running (the
planner's MemoryFits verdict, an unknown GPU, a user env entry that collides with the rendezvous env).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from pydantic import ValidationError

from finetune_operator.api.base import describe_validation_error
from finetune_operator.api.enums import AttentionImpl
from finetune_operator.api.models import FineTuneJob, PlanStatus
from finetune_operator.core import names
from finetune_operator.core.gang import Gang, JobRef, Refine, RenderOptions, build_gang
from finetune_operator.core.plan import Plan, PlanningError, plan
from finetune_operator.core.render import (
    render_companions,
    render_configmap,
    render_pod,
    render_service,
    render_trainer_access,
    template_hash,
)
from finetune_operator.core.torch_env import reserved_collisions
from finetune_operator.core.trainer_config import TrainerConfigError


@dataclass(frozen=True)
class Desired:
    """Everything one job should have, for the current attempt: its plan, and the gang its objects are
    rendered from when read. The objects are not held: the controller keeps a Desired per running job
    between passes, rendered objects take three times the gang's memory (35 against 10 KiB a job), and
    a pass needs them only when it creates something (a render costs well under a millisecond)."""

    plan: PlanStatus
    gang: Gang

    @property
    def template_hash(self) -> str:
        return self.gang.template_hash

    @property
    def pod_names(self) -> tuple[str, ...]:
        """The workers' names, by node rank, without rendering them."""
        return tuple(names.worker_name(self.gang.job.name, index) for index in range(self.gang.nodes))

    @property
    def configmap(self) -> dict[str, Any]:
        return render_configmap(self.gang)

    @property
    def service(self) -> dict[str, Any]:
        return render_service(self.gang)

    @property
    def pods(self) -> tuple[dict[str, Any], ...]:
        """The workers by node rank, rendered afresh on each read."""
        return tuple(render_pod(self.gang, index) for index in range(self.gang.nodes))

    @property
    def access(self) -> tuple[dict[str, Any], ...]:
        """The trainer's ServiceAccount and RoleBinding, where the operator provides them."""
        return render_trainer_access(self.gang)

    @property
    def companions(self) -> tuple[dict[str, Any], ...]:
        """A scheduling plug-in's objects for this attempt (the PodGroup), created before its workers."""
        return render_companions(self.gang)


@dataclass(frozen=True)
class SpecProblem:
    """Why a job cannot run as written; `reason` is the Failed condition's reason."""

    reason: str  # InvalidSpec | MemoryFits
    message: str
    plan: PlanStatus | None = None


def _identity(gang: Gang) -> Gang:
    return gang


def parse_job(body: Mapping[str, Any]) -> FineTuneJob | SpecProblem:
    """The job as the API models see it, or InvalidSpec (schema and CEL should have caught it earlier)."""
    document = {key: body[key] for key in ("apiVersion", "kind", "metadata", "spec") if key in body}
    try:
        return FineTuneJob.model_validate(json.loads(json.dumps(document, default=str)))
    except ValidationError as exc:
        return SpecProblem(
            "InvalidSpec", describe_validation_error(exc, "spec").replace("spec.spec.", "spec.")
        )


def _missing_attention(job: FineTuneJob, options: RenderOptions) -> SpecProblem | None:
    """An attention kernel the operator's trainer image lacks would fail every worker at load. A job with
    its own `spec.image` is the job's business: its trainer refuses a missing kernel at start."""
    wanted = job.spec.model.attention_implementation
    if job.spec.image or wanted in options.attention_implementations:
        return None
    have = " and ".join(a.value for a in AttentionImpl if a in options.attention_implementations)
    return SpecProblem(
        "InvalidSpec",
        f"spec.model.attentionImplementation: the trainer image {options.image} has no {wanted.value} "
        f"(it has {have}); use sdpa, the default, or spec.image with an image that has it",
    )


def _checked_plan(job: FineTuneJob, options: RenderOptions) -> Plan | SpecProblem:
    """The plan, or why the job cannot run before anything is built: a reserved env name, a spec the
    planner refuses, or its MemoryFits verdict."""
    collisions = reserved_collisions(item.name for item in job.spec.env)
    if collisions:
        return SpecProblem(
            "InvalidSpec",
            f"spec.env: {', '.join(collisions)} are set by the operator and cannot be overridden",
        )
    try:
        planned = plan(job.spec, node_memory=options.node_memory_bytes)
    except PlanningError as exc:
        return SpecProblem("InvalidSpec", str(exc))
    if not planned.fits:
        return SpecProblem("MemoryFits", planned.message, planned.to_status())
    return planned


def desire(
    job: FineTuneJob, ref: JobRef, options: RenderOptions, attempt: int, refine: Refine = _identity
) -> Desired | SpecProblem:
    """Plan, check and build the gang of one job for `attempt`; a SpecProblem says why it cannot run (the admission
    webhook refuses `kubectl apply` with it, the controller fails the job with it)."""
    unavailable = _missing_attention(job, options)
    if unavailable is not None:
        return unavailable
    planned = _checked_plan(job, options)
    if isinstance(planned, SpecProblem):
        return planned
    status = planned.to_status()
    try:
        gang = build_gang(job, ref, planned, options, attempt)
    except (TrainerConfigError, ValueError) as exc:
        return SpecProblem("InvalidSpec", str(exc), status)
    gang = replace(gang, template_hash=template_hash(gang))
    return Desired(plan=status, gang=refine(gang))
