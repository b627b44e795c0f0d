"""From a planned FineTuneJob to the objects that run it: one IR (`Gang`), refined, then rendered.

`build_gang` turns the job and its plan into the `Gang` intermediate representation; scheduling
plug-ins refine it (`scheduling/`: Kueue labels, pod-group annotations); `render_*` turn it into plain
JSON-ready dicts (core/v1 Pod, Service, ConfigMap) that tests compare whole and the adapter sends as
they are. Nothing here reads the cluster: what the builder needs from outside (the default image, the
trainer service account) arrives in `RenderOptions`.

`desire` runs the whole pure pipeline for one job and answers either the desired objects or the
`SpecProblem` that keeps the job from running (the planner's MemoryFits verdict, an unknown GPU, a
user env entry that collides with the rendezvous env).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import yaml
from pydantic import ValidationError

from finetune_operator.api.base import describe_validation_error
from finetune_operator.api.models import GROUP, KIND, VERSION, FineTuneJob, PlanStatus
from finetune_operator.core import names
from finetune_operator.core.hardware import gpu_model
from finetune_operator.core.plan import Plan, PlanningError, plan
from finetune_operator.core.torch_env import Rendezvous, reserved_collisions, torch_env, torchrun_args
from finetune_operator.core.trainer_config import TrainerConfigError, claims_of, render_trainer_config
from finetune_trainer.config import CONFIG_FILE
from finetune_trainer.deepspeed import render_deepspeed_config

GPU_RESOURCE = "nvidia.com/gpu"
#: GPU feature discovery labels (NVIDIA GFD), the ones placement reads.
GFD_PRODUCT = "nvidia.com/gpu.product"
GFD_MEMORY_MIB = "nvidia.com/gpu.memory"
TRAINER_MODULE = "finetune_trainer"
#: torchrun behind a wrapper that exits with the worker's own code (torchrun alone always exits 1), so
#: the operator can tell a configuration error (never retried) from a preemption.
LAUNCHER = ["python", "-m", "finetune_trainer.launch"]
#: GPU nodes are commonly tainted so that only GPU work lands there.
GPU_TOLERATION: dict[str, Any] = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}


@dataclass(frozen=True)
class RenderOptions:
    """Operator-wide inputs to rendering (from settings); the job's own spec can override some."""

    image: str
    image_pull_policy: str = "IfNotPresent"
    #: Used when the job names none; None leaves the namespace's `default` account.
    service_account: str | None = None
    #: The restricted Pod Security profile wants a non-root UID; fsGroup makes PVCs writable for it.
    run_as_user: int = 1000
    #: Seconds a worker gets after SIGTERM; the trainer saves a checkpoint on SIGTERM (exit code 75).
    termination_grace_seconds: int = 120


@dataclass(frozen=True)
class JobRef:
    """The identity of the job, for names and owner references."""

    name: str
    namespace: str
    uid: str
    generation: int


@dataclass(frozen=True)
class Gang:
    """The intermediate representation of one attempt's worker gang; plug-ins refine it with `replace`."""

    job: JobRef
    attempt: int
    nodes: int
    gpus_per_node: int
    image: str
    image_pull_policy: str
    master_port: int
    service_account: str | None
    run_as_user: int
    termination_grace_seconds: int
    shared_memory: str
    config_data: Mapping[str, str]
    mounts: Mapping[str, str]  # PVC claim → mount path
    read_only_claims: frozenset[str]
    env: Sequence[Mapping[str, Any]]  # everything but the rendezvous env, which depends on the rank
    env_from: Sequence[Mapping[str, Any]]
    resources: Mapping[str, Mapping[str, str]]
    node_selector: Mapping[str, str]
    tolerations: Sequence[Mapping[str, Any]]
    affinity: Mapping[str, Any] | None
    priority_class_name: str | None
    labels: Mapping[str, str] = field(default_factory=dict)  # extra labels from plug-ins
    annotations: Mapping[str, str] = field(default_factory=dict)  # extra annotations from plug-ins
    template_hash: str = ""

    @property
    def rendezvous(self) -> Rendezvous:
        return Rendezvous(
            master_addr=names.master_addr(self.job.name),
            master_port=self.master_port,
            nnodes=self.nodes,
            nproc_per_node=self.gpus_per_node,
        )


@dataclass(frozen=True)
class Desired:
    """Everything one job should have, for the current attempt."""

    plan: PlanStatus
    configmap: dict[str, Any]
    service: dict[str, Any]
    pods: tuple[dict[str, Any], ...]  # by node rank
    template_hash: str


@dataclass(frozen=True)
class SpecProblem:
    """Why a job cannot run as written; `reason` is the Failed condition's reason."""

    reason: str  # InvalidSpec | MemoryFits
    message: str
    plan: PlanStatus | None = None


Refine = Callable[[Gang], Gang]


def _identity(gang: Gang) -> Gang:
    return gang


# --- building the IR ----------------------------------------------------------------------------------


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


def placement_affinity(gpu_type: str | None, gpu_memory_gib: float | None) -> dict[str, Any] | None:
    """Node affinity for the GPU the job asked for.

    `gpuMemoryGiB` wins (the API says it overrides the product): any node whose GFD memory label is at
    least that many MiB (`Gt` takes integers, so ≥ N is > N-1). Otherwise the product's GFD label.
    """
    if gpu_memory_gib is not None:
        mib = -(-int(gpu_memory_gib * 1024 * 1000) // 1000)  # ceil without float noise
        expression = {"key": GFD_MEMORY_MIB, "operator": "Gt", "values": [str(mib - 1)]}
    elif gpu_type is not None:
        expression = {"key": GFD_PRODUCT, "operator": "In", "values": [gpu_model(gpu_type).gfd_product]}
    else:
        return None
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [expression]}]
            }
        }
    }


def config_data(job: FineTuneJob, planned: Plan) -> dict[str, str]:
    """The ConfigMap's files: the trainer config every worker reads and the DeepSpeed config it implies."""
    trainer = render_trainer_config(job, planned)
    deepspeed = render_deepspeed_config(trainer)
    return {
        CONFIG_FILE: trainer.to_yaml(),
        names.DEEPSPEED_FILE: json.dumps(deepspeed, indent=2, sort_keys=True),
    }


def build_gang(job: FineTuneJob, ref: JobRef, planned: Plan, options: RenderOptions, attempt: int) -> Gang:
    """The gang for one attempt of `job` as planned (raises TrainerConfigError for unusable URIs)."""
    spec = job.spec
    resources = spec.resources
    gpus = str(planned.gpus_per_node)
    requests: dict[str, str] = {GPU_RESOURCE: gpus}
    limits: dict[str, str] = {GPU_RESOURCE: gpus}
    if resources.cpu:
        requests["cpu"] = resources.cpu
    if resources.memory:
        requests["memory"] = limits["memory"] = resources.memory
    env: list[dict[str, Any]] = [
        {"name": names.ENV_POD_NAME, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": names.ENV_POD_NAMESPACE, "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    if spec.secrets.hf_token is not None:
        ref_ = spec.secrets.hf_token
        env.append(
            {"name": names.ENV_HF_TOKEN, "valueFrom": {"secretKeyRef": {"name": ref_.name, "key": ref_.key}}}
        )
    env.extend({"name": item.name, "value": item.value} for item in spec.env)
    env_from = [{"secretRef": {"name": spec.secrets.storage}}] if spec.secrets.storage else []
    mounts = claims_of(job)
    written = {uri for uri in (spec.output.uri, spec.checkpointing.uri) if uri and uri.startswith("pvc://")}
    written_claims = {uri.removeprefix("pvc://").partition("/")[0] for uri in written}
    return Gang(
        job=ref,
        attempt=attempt,
        nodes=planned.nodes,
        gpus_per_node=planned.gpus_per_node,
        image=spec.image or options.image,
        image_pull_policy=options.image_pull_policy,
        master_port=spec.distributed.master_port,
        service_account=spec.service_account_name or options.service_account,
        run_as_user=options.run_as_user,
        termination_grace_seconds=options.termination_grace_seconds,
        shared_memory=resources.shared_memory,
        config_data=config_data(job, planned),
        mounts=mounts,
        read_only_claims=frozenset(mounts) - written_claims,
        env=env,
        env_from=env_from,
        resources={"requests": requests, "limits": limits},
        node_selector=dict(spec.node_selector),
        tolerations=[
            GPU_TOLERATION,
            *(t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations),
        ],
        affinity=placement_affinity(resources.gpu_type, resources.gpu_memory_gi_b),
        priority_class_name=spec.priority_class_name,
    )


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
        read_only = claim in gang.read_only_claims
        volume = f"pvc-{claim}"[:63].rstrip("-")
        volumes.append({"name": volume, "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}})
        mounts.append({"name": volume, "mountPath": path, "readOnly": read_only})
    return volumes, mounts


def render_pod(gang: Gang, index: int) -> dict[str, Any]:
    """Worker `index` of the gang: one per node, all the node's GPUs, torchrun as the command."""
    name = names.worker_name(gang.job.name, index)
    volumes, volume_mounts = _volumes(gang)
    labels = {
        **_common_labels(gang),
        names.LABEL_COMPONENT: "worker",
        names.LABEL_REPLICA_INDEX: str(index),
        names.LABEL_ATTEMPT: str(gang.attempt),
        **gang.labels,
    }
    annotations = {
        names.ANNOTATION_GENERATION: str(gang.job.generation),
        **({names.ANNOTATION_TEMPLATE_HASH: gang.template_hash} if gang.template_hash else {}),
        **gang.annotations,
    }
    container: dict[str, Any] = {
        "name": names.CONTAINER_NAME,
        "image": gang.image,
        "imagePullPolicy": gang.image_pull_policy,
        "command": LAUNCHER,
        "args": torchrun_args(TRAINER_MODULE, f"{names.CONFIG_MOUNT_PATH}/{CONFIG_FILE}"),
        "env": [
            *torch_env(gang.rendezvous, index),
            # Three quarters of the grace period to save a checkpoint; the rest for torchrun to exit.
            {
                "name": names.ENV_SHUTDOWN_TIMEOUT,
                "value": str(max(1, gang.termination_grace_seconds * 3 // 4)),
            },
            *(dict(e) for e in gang.env),
        ],
        "ports": [{"name": "rendezvous", "containerPort": gang.master_port}],
        "resources": {kind: dict(values) for kind, values in gang.resources.items()},
        "volumeMounts": volume_mounts,
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


# --- the whole pipeline -------------------------------------------------------------------------------


def parse_job(body: Mapping[str, Any]) -> FineTuneJob | SpecProblem:
    """The job as the API models see it, or InvalidSpec (schema and CEL should have caught it earlier)."""
    document = {key: body[key] for key in ("apiVersion", "kind", "metadata", "spec") if key in body}
    try:
        return FineTuneJob.model_validate(json.loads(json.dumps(document, default=str)))
    except ValidationError as exc:
        return SpecProblem(
            "InvalidSpec", describe_validation_error(exc, "spec").replace("spec.spec.", "spec.")
        )


def desire(
    job: FineTuneJob, ref: JobRef, options: RenderOptions, attempt: int, refine: Refine = _identity
) -> Desired | SpecProblem:
    """Plan, check and render one job for `attempt`; a SpecProblem says why it cannot run."""
    collisions = reserved_collisions(item.name for item in job.spec.env)
    if collisions:
        return SpecProblem(
            "InvalidSpec",
            f"spec.env: {', '.join(collisions)} are set by the operator and cannot be overridden",
        )
    try:
        planned = plan(job.spec)
    except PlanningError as exc:
        return SpecProblem("InvalidSpec", str(exc))
    status = planned.to_status()
    if not planned.fits:
        return SpecProblem("MemoryFits", planned.message, status)
    try:
        gang = build_gang(job, ref, planned, options, attempt)
    except (TrainerConfigError, ValueError) as exc:
        return SpecProblem("InvalidSpec", str(exc), status)
    gang = replace(gang, template_hash=template_hash(gang))
    gang = refine(gang)
    return Desired(
        plan=status,
        configmap=render_configmap(gang),
        service=render_service(gang),
        pods=tuple(render_pod(gang, index) for index in range(gang.nodes)),
        template_hash=gang.template_hash,
    )


def to_yaml(objects: Sequence[Mapping[str, Any]]) -> str:
    """A multi-document YAML of rendered objects (`ftctl render`, debugging)."""
    return yaml.safe_dump_all([dict(o) for o in objects], sort_keys=False)
