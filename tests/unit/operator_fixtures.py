"""Shared builders for the operator's unit tests: a tiny job whose plan is known, and pod documents.

Not a conftest: tests import what they use, so a reader sees where a fixture comes from.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

from finetune_operator.api.models import FineTuneJob
from finetune_operator.core import names
from finetune_operator.core.gang import JobRef, RenderOptions

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
UID = "0f1e2d3c-aaaa-bbbb-cccc-000000000001"
OPTIONS = RenderOptions(image="trainer:test", service_account="finetune-trainer")

#: A model small enough that any layout fits, so the plan is exactly what `resources.gpus` asks for.
TINY_ARCH = {
    "vocabSize": 1000,
    "hiddenSize": 64,
    "intermediateSize": 128,
    "numLayers": 2,
    "numHeads": 4,
}

BASE_DOC: dict[str, Any] = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "tiny", "namespace": "team-a", "uid": UID, "generation": 1},
    "spec": {
        "model": {"name": "tiny/model", "architecture": TINY_ARCH},
        "dataset": {"uri": "pvc://datasets/alpaca.jsonl"},
        "method": {"type": "lora"},
        "resources": {"gpuType": "A100-80GB", "gpusPerNode": 4, "gpus": 8},
        "output": {"uri": "pvc://models/tiny-lora"},
    },
}


def job_doc(**spec_updates: Any) -> dict[str, Any]:
    """The base job document with top-level spec blocks replaced (deep-copied)."""
    doc = copy.deepcopy(BASE_DOC)
    doc["spec"].update(copy.deepcopy(spec_updates))
    return doc


def job(**spec_updates: Any) -> FineTuneJob:
    return FineTuneJob.model_validate(job_doc(**spec_updates))


def ref(generation: int = 1) -> JobRef:
    return JobRef(name="tiny", namespace="team-a", uid=UID, generation=generation)


def pod_doc(
    index: int,
    *,
    phase: str = "Running",
    attempt: int = 0,
    generation: int = 1,
    template_hash: str | None = None,
    owner_uid: str = UID,
    node: str | None = "gpu-node-0",
    exit_code: int | None = None,
    reason: str | None = None,
    message: str | None = None,
    waiting: str | None = None,
    unschedulable: str | None = None,
    gated: bool = False,
    deleting: bool = False,
    progress: str | None = None,
    disruption: str | None = None,
    finished_at: str | None = None,
    ready: bool | None = None,
) -> dict[str, Any]:
    """A worker pod as the API server returns it, in the state the arguments describe."""
    annotations = {names.ANNOTATION_GENERATION: str(generation)}
    if template_hash is not None:
        annotations[names.ANNOTATION_TEMPLATE_HASH] = template_hash
    if progress is not None:
        annotations["finetune.dev/progress"] = progress
    meta: dict[str, Any] = {
        "name": f"tiny-worker-{index}",
        "namespace": "team-a",
        "labels": {
            names.LABEL_JOB_NAME: "tiny",
            names.LABEL_REPLICA_INDEX: str(index),
            names.LABEL_ATTEMPT: str(attempt),
        },
        "annotations": annotations,
        "ownerReferences": [{"kind": "FineTuneJob", "name": "tiny", "uid": owner_uid, "controller": True}],
    }
    if deleting:
        meta["deletionTimestamp"] = "2025-01-02T03:04:00Z"
    spec: dict[str, Any] = {"containers": [{"name": "trainer"}]}
    if node and not unschedulable and not gated:
        spec["nodeName"] = node
    if gated:
        spec["schedulingGates"] = [{"name": "kueue.x-k8s.io/admission"}]
    status: dict[str, Any] = {"phase": phase}
    if disruption:  # what the API server writes before it preempts, evicts or drains a pod
        kind = (
            "TerminationTarget" if disruption == "WorkloadEvictedDueToPreempted" else "DisruptionTarget"
        )  # Kueue's
        status["conditions"] = [{"type": kind, "status": "True", "reason": disruption}]
    if ready is not None:  # the node lifecycle controller marks a silent node's pods not Ready
        status.setdefault("conditions", []).append({"type": "Ready", "status": str(ready)})
    if unschedulable:
        status["conditions"] = [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": unschedulable}
        ]
    if exit_code is not None:
        terminated: dict[str, Any] = {"exitCode": exit_code, "reason": reason or "Error"}
        if message:
            terminated["message"] = message
        if finished_at:
            terminated["finishedAt"] = finished_at
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": terminated}}]
    elif waiting:
        status["containerStatuses"] = [
            {
                "name": "trainer",
                "state": {"waiting": {"reason": waiting, "message": f"{waiting} for trainer:test"}},
            }
        ]
    elif reason:
        status["reason"] = reason
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": status}
