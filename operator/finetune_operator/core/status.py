"""What the worker pods say, read purely from their JSON: per-worker state, gang counts, conditions.

The lifecycle decides from a `GangObservation`, never from raw pods, so every rule about Kubernetes'
pod status dialect (waiting reasons, terminated exit codes, the scheduler's PodScheduled condition,
Kueue's scheduling gate) lives here, in one place, and is tested on whole pod documents.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from finetune_operator.api.enums import Phase
from finetune_operator.api.models import Condition, ProgressStatus, WorkersStatus
from finetune_operator.api.trainer import PROGRESS_ANNOTATION, ProgressReport
from finetune_operator.core import names

FINISHED = frozenset({Phase.SUCCEEDED, Phase.FAILED})


class ConditionType(StrEnum):
    """Condition types the operator writes; `kubectl wait --for=condition=Succeeded` reads the last two."""

    PLANNED = "Planned"
    MEMORY_FITS = "MemoryFits"
    SCHEDULED = "Scheduled"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUSPENDED = "Suspended"
    STALLED = "Stalled"
    #: True while an API error the operator meets acting for the job persists (a full ResourceQuota,
    #: missing RBAC, a webhook's denial); it keeps retrying with backoff, and the condition says why.
    API_ERROR = "ApiError"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


#: Container waiting reasons that mean the image will not start without someone's help.
IMAGE_PULL_REASONS = frozenset({"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"})
#: Container waiting reasons that mean the pod spec cannot start (bad secret/configmap reference, …).
CONFIG_WAIT_REASONS = frozenset({"CreateContainerConfigError", "CreateContainerError", "RunContainerError"})
KUEUE_GATE = "kueue.x-k8s.io/admission"
#: What scheduler-plugins' Coscheduling says of a worker it turned away because a sibling did not fit: the
#: sibling's own message (`0/4 nodes are available: 4 Insufficient nvidia.com/gpu ...`) is the one to show.
SIBLING_REJECTIONS = ("optimistic rejection in PostFilter", "rejection in Unreserve")
#: Pod conditions that say something other than the pod's own program is ending it: Kubernetes writes
#: DisruptionTarget before a preemption, eviction or drain; Kueue writes TerminationTarget before it
#: deletes a plain pod it stops (reason WorkloadEvictedDueToPreempted when a higher-priority workload
#: preempts the gang's).
DISRUPTION_CONDITIONS = frozenset({"DisruptionTarget", "TerminationTarget"})


class WorkerState(StrEnum):
    UNSCHEDULED = "Unscheduled"  # no node yet (pending in the scheduler, or gated)
    STARTING = "Starting"  # on a node, containers not running yet
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


@dataclass(frozen=True)
class Worker:
    """One worker pod as the lifecycle sees it."""

    name: str
    index: int | None
    attempt: int | None
    owner_uid: str | None
    template_hash: str | None
    generation: int | None
    state: WorkerState
    deleting: bool
    reason: str = ""  # Unschedulable, SchedulingGated, ImagePullBackOff, OOMKilled, Error, Evicted, …
    message: str = ""
    exit_code: int | None = None
    progress: str | None = None  # the raw progress annotation
    #: Why Kubernetes or Kueue ended the pod, when one did (the reason of its DisruptionTarget condition:
    #: PreemptionByScheduler, EvictionByEvictionAPI, DeletionByTaintManager, TerminationByKubelet, ...;
    #: or of Kueue's TerminationTarget: WorkloadEvictedDueToPreempted, ...).
    disruption: str | None = None
    #: When its container ended (RFC 3339, as the kubelet writes it; compared as text, second resolution).
    finished_at: str | None = None
    #: The node it is bound to, and whether the pod's Ready condition is False (the node lifecycle
    #: controller marks every pod of a node that stopped reporting so).
    node: str | None = None
    not_ready: bool = False
    #: Held by Kueue's scheduling gate: its Workload is not admitted yet.
    queued: bool = False

    @property
    def active(self) -> bool:
        """Still holds (or may soon hold) GPUs."""
        return self.state not in (WorkerState.SUCCEEDED, WorkerState.FAILED) and not self.deleting

    @property
    def suspect(self) -> bool:
        """Its node may be gone: it is being deleted, or it runs but is no longer Ready. Only such workers'
        nodes are read, so a healthy gang costs no node reads."""
        unfinished = self.state not in (WorkerState.SUCCEEDED, WorkerState.FAILED)
        return self.node is not None and unfinished and (self.deleting or self.not_ready)


@dataclass(frozen=True)
class NodeView:
    """What the lifecycle needs of a worker's node: whether it reports Ready, and since when it does not."""

    name: str
    ready: bool
    #: The Ready condition's lastTransitionTime (RFC 3339); None when the node never reported.
    since: str | None = None


def read_node(node: Mapping[str, Any]) -> NodeView:
    """A node document's readiness: Ready False or Unknown (its kubelet stopped reporting) is not ready."""
    ready = next(
        (c for c in (node.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"), None
    )
    return NodeView(
        name=(node.get("metadata") or {}).get("name", ""),
        ready=ready is not None and ready.get("status") == "True",
        since=(ready or {}).get("lastTransitionTime"),
    )


def nodes_to_check(workers: Iterable[Worker]) -> list[str]:
    """The nodes worth reading: those of suspect workers, each once, in order."""
    return list(dict.fromkeys(w.node for w in workers if w.suspect and w.node))


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _terminated(pod_status: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The trainer container's terminated state (the first container's, when names differ)."""
    statuses = pod_status.get("containerStatuses") or []
    chosen = next(
        (s for s in statuses if s.get("name") == names.CONTAINER_NAME), statuses[0] if statuses else None
    )
    if chosen is None:
        return None
    state = chosen.get("state") or {}
    terminated: Mapping[str, Any] | None = state.get("terminated")
    if terminated is None:
        terminated = (chosen.get("lastState") or {}).get("terminated")
    return terminated


def _waiting(pod_status: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for status in pod_status.get("containerStatuses") or []:
        waiting: Mapping[str, Any] | None = (status.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
            return waiting
    return None


#: The parts of a pod's metadata and spec `read_worker` (and the operator's pod handling) reads.
_WORKER_METADATA = (
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "labels",
    "annotations",
    "ownerReferences",
    "deletionTimestamp",
)
_WORKER_SPEC = ("nodeName", "schedulingGates")
#: Of a pod's status, its phase, why, its conditions and its containers' states: not the addresses,
#: images and IDs that make up most of a running pod's status.
_WORKER_STATUS = ("phase", "reason", "message", "conditions")
_CONTAINER_STATUS = ("name", "state", "lastState")


def worker_fields(pod: Mapping[str, Any]) -> dict[str, Any]:
    """The pod trimmed to what `read_worker` reads: the operator's pod cache holds this, not the rendered
    containers, volumes and managedFields that make up most of a pod's size."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    kept = {k: status[k] for k in _WORKER_STATUS if k in status}
    if "containerStatuses" in status:
        kept["containerStatuses"] = [
            {k: c[k] for k in _CONTAINER_STATUS if k in c} for c in status["containerStatuses"] or []
        ]
    return {
        "metadata": {k: meta[k] for k in _WORKER_METADATA if k in meta},
        "spec": {k: spec[k] for k in _WORKER_SPEC if k in spec},
        "status": kept,
    }


def read_worker(pod: Mapping[str, Any]) -> Worker:
    """Classify one pod document (as the API returns it, camelCase; `worker_fields` of it reads the same)."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    status = pod.get("status") or {}
    owner_uid = next(
        (ref.get("uid") for ref in meta.get("ownerReferences") or [] if ref.get("controller")), None
    )
    disruption = next(
        (
            c.get("reason") or "Disrupted"
            for c in status.get("conditions") or []
            if c.get("type") in DISRUPTION_CONDITIONS and c.get("status") == "True"
        ),
        None,
    )
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    common = {
        "node": (pod.get("spec") or {}).get("nodeName") or None,
        "not_ready": ready is not None and ready.get("status") == "False",
        "disruption": disruption,
        "name": meta.get("name", ""),
        "index": _int(labels.get(names.LABEL_REPLICA_INDEX)),
        "attempt": _int(labels.get(names.LABEL_ATTEMPT)),
        "owner_uid": owner_uid,
        "template_hash": annotations.get(names.ANNOTATION_TEMPLATE_HASH),
        "generation": _int(annotations.get(names.ANNOTATION_GENERATION)),
        "deleting": bool(meta.get("deletionTimestamp")),
        "progress": annotations.get(PROGRESS_ANNOTATION),
    }
    phase = status.get("phase", "Pending")
    if phase in ("Succeeded", "Failed"):
        terminated = _terminated(status) or {}
        code = _int(terminated.get("exitCode"))
        reason = (
            terminated.get("reason")
            or status.get("reason")
            or ("Completed" if phase == "Succeeded" else "Error")
        )
        message = terminated.get("message") or status.get("message") or ""
        state = WorkerState.SUCCEEDED if phase == "Succeeded" else WorkerState.FAILED
        finished = terminated.get("finishedAt") or None
        return Worker(
            state=state, reason=reason, message=message, exit_code=code, finished_at=finished, **common
        )
    if phase == "Running":
        return Worker(state=WorkerState.RUNNING, **common)
    # Pending: not scheduled (and why), or scheduled and starting (and what blocks it)
    scheduled = next((c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), None)
    gates = [g.get("name") for g in (pod.get("spec") or {}).get("schedulingGates") or []]
    if not (pod.get("spec") or {}).get("nodeName"):
        if gates:
            reason = "SchedulingGated"
            message = (
                f"waiting for {', '.join(gates)}"
                if KUEUE_GATE not in gates
                else "waiting for Kueue admission"
            )
            return Worker(
                state=WorkerState.UNSCHEDULED,
                reason=reason,
                message=message,
                queued=KUEUE_GATE in gates,
                **common,
            )
        if scheduled and scheduled.get("status") == "False":
            return Worker(
                state=WorkerState.UNSCHEDULED,
                reason=scheduled.get("reason") or "Unschedulable",
                message=scheduled.get("message") or "",
                **common,
            )
        return Worker(state=WorkerState.UNSCHEDULED, **common)
    waiting = _waiting(status)
    if waiting:
        return Worker(
            state=WorkerState.STARTING,
            reason=waiting.get("reason", ""),
            message=waiting.get("message", ""),
            **common,
        )
    return Worker(state=WorkerState.STARTING, **common)


@dataclass(frozen=True)
class GangObservation:
    """The current attempt's workers, by index."""

    workers: tuple[Worker, ...]
    expected: int

    def by_state(self, state: WorkerState) -> list[Worker]:
        return [w for w in self.workers if w.state == state]

    @property
    def missing(self) -> list[int]:
        present = {w.index for w in self.workers}
        return [i for i in range(self.expected) if i not in present]

    def failure(self, permanent: frozenset[int]) -> Worker | None:
        """The failed worker that explains the gang's failure: one with a `permanent` exit code first (a
        config error in one rank makes the others fail only because their peer went away), then the one
        that ended first (the others died of its absence), then the lowest rank."""
        failed = self.by_state(WorkerState.FAILED)
        if not failed:
            return None
        return min(
            failed,
            key=lambda w: (w.exit_code not in permanent, w.finished_at or "~", w.index or 0),
        )

    @property
    def all_succeeded(self) -> bool:
        return not self.missing and len(self.by_state(WorkerState.SUCCEEDED)) == self.expected

    @property
    def all_running(self) -> bool:
        """Every worker is running (or already done: rank 0 may finish a moment before the others)."""
        done = (WorkerState.RUNNING, WorkerState.SUCCEEDED)
        return (
            not self.missing
            and all(w.state in done for w in self.workers)
            and bool(self.by_state(WorkerState.RUNNING))
        )

    def counts(self, missing_are_pending: bool = True) -> WorkersStatus:
        """Counts by state; workers not created yet count as pending unless the gang is meant to be absent."""
        waiting = [w for w in self.workers if w.state in (WorkerState.UNSCHEDULED, WorkerState.STARTING)]
        return WorkersStatus(
            total=self.expected,
            pending=len(waiting) + (len(self.missing) if missing_are_pending else 0),
            running=len(self.by_state(WorkerState.RUNNING)),
            succeeded=len(self.by_state(WorkerState.SUCCEEDED)),
            failed=len(self.by_state(WorkerState.FAILED)),
        )

    def rank0(self) -> Worker | None:
        return next((w for w in self.workers if w.index == 0), None)


def observe(workers: Iterable[Worker], expected: int) -> GangObservation:
    """The gang view of the given (current-attempt) workers; duplicates of one index keep the first."""
    seen: dict[int, Worker] = {}
    for worker in workers:
        if worker.index is not None and 0 <= worker.index < expected and worker.index not in seen:
            seen[worker.index] = worker
    return GangObservation(tuple(seen[i] for i in sorted(seen)), expected)


# --- conditions ---------------------------------------------------------------------------------------


def rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def get_condition(conditions: Sequence[Condition], kind: ConditionType) -> Condition | None:
    return next((c for c in conditions if c.type == kind), None)


def set_condition(
    conditions: Sequence[Condition],
    kind: ConditionType,
    status: bool,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None,
) -> list[Condition]:
    """A new list with `kind` set; lastTransitionTime moves only when the status flips (metav1 rules)."""
    value = "True" if status else "False"
    previous = get_condition(conditions, kind)
    since = previous.last_transition_time if previous is not None and previous.status == value else None
    updated = Condition(
        type=kind,
        status=value,
        reason=reason,
        message=message,
        last_transition_time=since or rfc3339(now),
        observed_generation=generation,
    )
    if previous is None:
        return [*conditions, updated]
    return [updated if c.type == kind else c for c in conditions]


# --- progress -----------------------------------------------------------------------------------------


def read_progress(raw: str | None) -> ProgressReport | None:
    """Rank 0's report, or None when absent or unreadable (a bad report never breaks reconciling)."""
    if not raw:
        return None
    try:
        return ProgressReport.from_json(raw)
    except (ValidationError, json.JSONDecodeError, ValueError):
        return None


def progress_status(report: ProgressReport | None, previous: ProgressStatus | None) -> ProgressStatus | None:
    """The status block from the newest report; the last known one stays when rank 0 is gone."""
    return report.to_status() if report is not None else previous
