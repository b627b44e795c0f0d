"""The intermediate representation of one attempt's worker gang (`Gang`), and its builder.

`build_gang` turns a planned job into a `Gang`; scheduling plug-ins refine it (`scheduling/`: Kueue
labels, pod-group annotations) with `replace`; `core/render.py` turns it into objects. Nothing here reads
the cluster: what the builder needs from outside (the default image, the trainer service account)
arrives in `RenderOptions`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from finetune_operator.api.models import FineTuneJob
from finetune_operator.api.trainer import CONFIG_FILE
from finetune_operator.core import names
from finetune_operator.core.hardware import gpu_model
from finetune_operator.core.plan import Plan
from finetune_operator.core.torch_env import Rendezvous
from finetune_operator.core.trainer_config import claims_of, render_trainer_config

GPU_RESOURCE = "nvidia.com/gpu"
#: GPU feature discovery labels (NVIDIA GFD), the ones placement reads.
GFD_PRODUCT = "nvidia.com/gpu.product"
GFD_MEMORY_MIB = "nvidia.com/gpu.memory"
#: GPU nodes are commonly tainted so that only GPU work lands there.
GPU_TOLERATION: dict[str, Any] = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}


@dataclass(frozen=True)
class RenderOptions:
    """Operator-wide inputs to rendering (from settings); the job's own spec can override some."""

    image: str
    image_pull_policy: str = "IfNotPresent"
    #: Used when the job names none; None leaves the namespace's `default` account.
    service_account: str | None = None
    #: Bound to `service_account` in the job's namespace (created where missing); None: not managed.
    trainer_cluster_role: str | None = None
    #: The trainer image's user; fsGroup makes PVCs writable for it.
    run_as_user: int = 10001
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
    #: The ClusterRole to bind to `service_account` when it is the operator's default account.
    access_role: str | None
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
    """The ConfigMap's one file: the trainer config every worker reads. The trainer renders its DeepSpeed
    config from it, so the DeepSpeed settings have one copy and one owner."""
    return {CONFIG_FILE: render_trainer_config(job, planned).to_yaml()}


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
        # A job's own account is the job's business; the default one the operator provides everywhere.
        access_role=None if spec.service_account_name else options.trainer_cluster_role,
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


#: A scheduling plug-in's refinement of the gang (`scheduling/`).
Refine = Callable[[Gang], Gang]
