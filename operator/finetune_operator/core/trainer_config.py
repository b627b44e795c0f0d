"""Render the trainer config a worker reads from a FineTuneJob and its plan (pure: no I/O, no torch).

The operator mounts the result into every worker; `ftctl train` writes it next to the outputs and runs
the same trainer locally. Both call `render_trainer_config`, so a local run is the pod's run.

URIs resolve to local paths here, once: `pvc://CLAIM/PATH` becomes `<mount of CLAIM>/PATH` (the pod
builder mounts every claim `claims_of` lists at `pvc_mount_path`), `file://` and plain paths stay local
(ftctl), `hf://` leaves the path empty so the trainer loads from the hub. The API's rules already refused
`s3://` (no sync step yet) and `hf://` outputs, so a validated job always resolves.
"""

from __future__ import annotations

import posixpath
from typing import Protocol

from finetune_operator.api.enums import Offload
from finetune_operator.api.models import FineTuneJob
from finetune_operator.api.trainer import DeepSpeedBuckets, ProgressSettings, ResolvedPaths, TrainerConfig

#: Where the pod builder mounts claim X: /mnt/pvc/X.
PVC_MOUNT_ROOT = "/mnt/pvc"
#: Checkpoints go here, under the output, unless checkpointing.uri says otherwise.
CHECKPOINT_SUBDIR = "checkpoints"


class TrainerConfigError(ValueError):
    """The job's URIs cannot be turned into paths a worker can read; permanent."""


class PlanLike(Protocol):
    """The fields of `core.plan.Plan` the trainer needs (a Protocol, so tests need no estimator)."""

    @property
    def gpus(self) -> int: ...
    @property
    def zero_stage(self) -> int: ...
    @property
    def offload(self) -> Offload: ...
    @property
    def per_gpu_bytes(self) -> int: ...
    @property
    def buckets(self) -> DeepSpeedBuckets | None: ...


def pvc_mount_path(claim: str) -> str:
    return f"{PVC_MOUNT_ROOT}/{claim}"


def claims_of(job: FineTuneJob) -> dict[str, str]:
    """PVC claim → mount path for every pvc:// URI in the job; the pod builder mounts exactly these."""
    spec = job.spec
    uris = (spec.model.uri, spec.dataset.uri, spec.output.uri, spec.checkpointing.uri)
    claims = sorted({_split_pvc(uri)[0] for uri in uris if uri and uri.startswith("pvc://")})
    return {claim: pvc_mount_path(claim) for claim in claims}


def resolve_uri(uri: str, mounts: dict[str, str], field: str) -> str | None:
    """A local path for `uri`, or None for hf:// (the trainer loads it from the hub)."""
    if uri.startswith("pvc://"):
        claim, rest = _split_pvc(uri)
        if claim not in mounts:
            raise TrainerConfigError(f"{field}: claim {claim!r} is not mounted")
        return posixpath.join(mounts[claim], rest) if rest else mounts[claim]
    if uri.startswith("file://"):
        return uri.removeprefix("file://")
    if uri.startswith("hf://"):
        return None
    return uri


def _writable_path(uri: str, mounts: dict[str, str], field: str) -> str:
    """A local path to write to. The API's WRITABLE rule refuses hf:// at apply time; this keeps the
    type honest for a job changed after validation."""
    path = resolve_uri(uri, mounts, field)
    if path is None:
        raise TrainerConfigError(f"{field}: hf:// is read-only; write to pvc://CLAIM/PATH")
    return path


def render_trainer_config(
    job: FineTuneJob,
    plan: PlanLike,
    *,
    mounts: dict[str, str] | None = None,
    progress: ProgressSettings | None = None,
    world_size: int | None = None,
) -> TrainerConfig:
    """The worker's config for `job` as planned.

    `mounts` defaults to `claims_of(job)` (the operator's layout); ftctl passes `{}` with local paths.
    `world_size` defaults to the plan's GPU count; ftctl passes its `--nproc-per-node`.
    `progress` defaults to the in-cluster pod-annotation reporter.
    """
    spec = job.spec
    mounts = claims_of(job) if mounts is None else mounts
    output = _writable_path(spec.output.uri, mounts, "output.uri")
    checkpoints = (
        _writable_path(spec.checkpointing.uri, mounts, "checkpointing.uri")
        if spec.checkpointing.uri
        else posixpath.join(output, CHECKPOINT_SUBDIR)
    )
    model_path = resolve_uri(spec.model.uri, mounts, "model.uri") if spec.model.uri else None
    return TrainerConfig(
        job_name=job.metadata.name,
        model=spec.model,
        dataset=spec.dataset,
        method=spec.method,
        training=spec.training,
        checkpointing=spec.checkpointing,
        output=spec.output,
        paths=ResolvedPaths(
            model=model_path,
            dataset=resolve_uri(spec.dataset.uri, mounts, "dataset.uri"),
            output=output,
            checkpoints=checkpoints,
        ),
        mounts=dict(mounts),
        zero_stage=plan.zero_stage,
        offload=plan.offload,
        world_size=world_size if world_size is not None else plan.gpus,
        estimate_bytes=plan.per_gpu_bytes,
        buckets=plan.buckets,
        progress=progress if progress is not None else ProgressSettings(reporter="pod-annotation"),
    )


def _split_pvc(uri: str) -> tuple[str, str]:
    claim, _, rest = uri.removeprefix("pvc://").partition("/")
    return claim, rest
