"""From a worker gang (`core/gang.py`) to the objects that run it: plain JSON-ready dicts.

`render_*` turn the `Gang` into core/v1 ConfigMap, Service and Pods (and a scheduling plug-in's companion
objects) that tests compare whole and the adapter sends as they are.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import yaml

from finetune_operator.api.models import GROUP, KIND, VERSION
from finetune_operator.api.trainer import (
    CONFIG_FILE,
    LAUNCH_COMMAND,
    METRICS_PORT,
    TERMINATION_MESSAGE_PATH,
    TRAIN_COMMAND,
)
from finetune_operator.core import names
from finetune_operator.core.gang import Gang, JobRef
from finetune_operator.core.torch_env import torch_env, torchrun_args


def owner_reference(job: JobRef) -> dict[str, Any]:
    """Makes the job the controller of an object, so deleting the job garbage-collects it."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": job.name,
        "uid": job.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


# --- rendering objects --------------------------------------------------------------------------------


def _common_labels(gang: Gang) -> dict[str, str]:
    return {
        **names.selector_labels(gang.job.name),
        names.LABEL_APP_NAME: names.APP_NAME,
        names.LABEL_MANAGED_BY: names.MANAGED_BY,
    }


def _metadata(gang: Gang, name: str, component: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": gang.job.namespace,
        "labels": {**_common_labels(gang), names.LABEL_COMPONENT: component},
        "ownerReferences": [owner_reference(gang.job)],
    }


def render_configmap(gang: Gang) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(gang, names.configmap_name(gang.job.name), "config"),
        "data": dict(gang.config_data),
    }


def render_trainer_access(gang: Gang) -> tuple[dict[str, Any], ...]:
    """The trainer's ServiceAccount and its RoleBinding to the access ClusterRole (pods get/patch: rank 0
    patches its own pod with progress), in the job's namespace. Shared by the namespace's jobs, so not
    owned by this one; empty when the job names its own account or access is not managed."""
    if gang.access_role is None or gang.service_account is None:
        return ()
    account, namespace = gang.service_account, gang.job.namespace
    metadata = {
        "name": account,
        "namespace": namespace,
        "labels": {names.LABEL_APP_NAME: names.APP_NAME, names.LABEL_MANAGED_BY: names.MANAGED_BY},
    }
    return (
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": metadata,
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": gang.access_role,
            },
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
        },
    )


def render_service(gang: Gang) -> dict[str, Any]:
    """Headless, and publishing not-ready addresses so rank 0 resolves before any readiness."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(gang, names.service_name(gang.job.name), "rendezvous"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": names.selector_labels(gang.job.name),
            "ports": [{"name": "rendezvous", "port": gang.master_port, "targetPort": gang.master_port}],
        },
    }


def render_companions(gang: Gang) -> tuple[dict[str, Any], ...]:
    """The scheduling plug-ins' objects for this attempt (a PodGroup), owned by the job."""
    return tuple(
        {
            "apiVersion": companion.api_version,
            "kind": companion.kind,
            "metadata": _metadata(gang, companion.name, "scheduling"),
            "spec": dict(companion.spec),
        }
        for companion in gang.companions
    )


def _volumes(gang: Gang) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": names.configmap_name(gang.job.name)}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": gang.shared_memory}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": names.CONFIG_MOUNT_PATH, "readOnly": True},
        {"name": "dshm", "mountPath": names.SHM_PATH},
    ]
    for claim, path in sorted(gang.mounts.items()):
        # readOnly only where true: the API server drops a false one, and `ftctl render` shows what it stores.
        read_only = {"readOnly": True} if claim in gang.read_only_claims else {}
        volume = f"pvc-{claim}"[:63].rstrip("-")
        volumes.append({"name": volume, "persistentVolumeClaim": {"claimName": claim, **read_only}})
        mounts.append({"name": volume, "mountPath": path, **read_only})
    return volumes, mounts


def render_pod(gang: Gang, index: int) -> dict[str, Any]:
    """Worker `index` of the gang: one per node, all the node's GPUs, torchrun as the command."""
    name = names.worker_name(gang.job.name, index)
    volumes, volume_mounts = _volumes(gang)
    labels = {
        **gang.labels,
        **_common_labels(gang),
        names.LABEL_COMPONENT: "worker",
        names.LABEL_REPLICA_INDEX: str(index),
        names.LABEL_ATTEMPT: str(gang.attempt),
    }
    annotations = {
        **gang.annotations,
        names.ANNOTATION_GENERATION: str(gang.job.generation),
        **({names.ANNOTATION_TEMPLATE_HASH: gang.template_hash} if gang.template_hash else {}),
    }
    container: dict[str, Any] = {
        "name": names.CONTAINER_NAME,
        "image": gang.image,
        "imagePullPolicy": gang.image_pull_policy,
        "command": [LAUNCH_COMMAND],
        "args": torchrun_args(TRAIN_COMMAND, f"{names.CONFIG_MOUNT_PATH}/{CONFIG_FILE}"),
        "env": [
            *torch_env(gang.rendezvous, index),
            # Three quarters of the grace period to save a checkpoint; the rest for torchrun to exit.
            {
                "name": names.ENV_SHUTDOWN_TIMEOUT,
                "value": str(max(1, gang.termination_grace_seconds * 3 // 4)),
            },
            *(dict(e) for e in gang.env),
        ],
        "ports": [
            {"name": "rendezvous", "containerPort": gang.master_port},
            {"name": "metrics", "containerPort": METRICS_PORT},
        ],
        "resources": {kind: dict(values) for kind, values in gang.resources.items()},
        "volumeMounts": volume_mounts,
        # The trainer writes its one-line reason there; a worker killed before it could (SIGKILL, the
        # kernel's OOM killer) leaves its last log lines instead.
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
        },
    }
    if gang.env_from:
        container["envFrom"] = [dict(e) for e in gang.env_from]
    spec: dict[str, Any] = {
        "restartPolicy": "Never",  # the operator restarts the whole gang, never one worker
        "hostname": name,
        "subdomain": names.service_name(gang.job.name),
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": gang.termination_grace_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": gang.run_as_user,
            "runAsGroup": gang.run_as_user,
            "fsGroup": gang.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
        "tolerations": [dict(t) for t in gang.tolerations],
    }
    if gang.service_account:
        spec["serviceAccountName"] = gang.service_account
    if gang.node_selector:
        spec["nodeSelector"] = dict(gang.node_selector)
    if gang.affinity:
        spec["affinity"] = json.loads(json.dumps(gang.affinity))
    if gang.priority_class_name:
        spec["priorityClassName"] = gang.priority_class_name
    if gang.scheduler_name:
        spec["schedulerName"] = gang.scheduler_name
    if gang.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": name} for name in gang.image_pull_secrets]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": gang.job.namespace,
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [owner_reference(gang.job)],
        },
        "spec": spec,
    }


def template_hash(gang: Gang) -> str:
    """What decides whether running workers are outdated after a spec change: the rendered worker of
    attempt 0 before plug-ins (so restarts and queue bookkeeping never count as a change) and the configs."""
    base = replace(gang, attempt=0, labels={}, annotations={}, template_hash="")
    document = {"pod": render_pod(base, 0)["spec"], "config": dict(gang.config_data)}
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:16]


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the ConfigMap's files) as `|` blocks, as `kubectl get -o yaml` shows them."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_BlockDumper.add_representer(str, _str)


def to_yaml(objects: Sequence[Mapping[str, Any]]) -> str:
    """A multi-document YAML of rendered objects (`ftctl render`, debugging)."""
    return yaml.dump_all([dict(o) for o in objects], Dumper=_BlockDumper, sort_keys=False)
