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

from finetune_operator.api.enums import AttentionImpl
from finetune_operator.api.models import FineTuneJob, Toleration
from finetune_operator.api.trainer import CONFIG_FILE, IMAGE_ATTENTION
from finetune_operator.core import names
from finetune_operator.core.placement import placement
from finetune_operator.core.plan import Plan
from finetune_operator.core.requests import binary_quantity
from finetune_operator.core.torch_env import Rendezvous
from finetune_operator.core.trainer_config import claims_of, render_trainer_config

#: Where the hostname label lives: one worker per node is spread over it.
HOSTNAME_LABEL = "kubernetes.io/hostname"


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
    #: How the cluster labels GPU nodes (`core/placement.py`: nvidia-gfd, gke or eks).
    placement_preset: str = "nvidia-gfd"
    #: Seconds a worker gets after SIGTERM; the trainer saves a checkpoint on SIGTERM (exit code 75).
    termination_grace_seconds: int = 120
    #: Seconds the workers tolerate their node being not Ready or unreachable before Kubernetes evicts
    #: them, which tells the operator to look at the node (LifecyclePolicy.node_lost_seconds).
    node_lost_seconds: int = 120
    #: The attention kernels `image` has; a job asking `image` for another one cannot run.
    attention_implementations: frozenset[AttentionImpl] = frozenset(IMAGE_ATTENTION)
    #: Host memory of a GPU node in bytes: the planner never picks a layout whose workers request more.
    #: None: not checked.
    node_memory_bytes: int | None = None


@dataclass(frozen=True)
class JobRef:
    """The identity of the job, for names and owner references."""

    name: str
    namespace: str
    uid: str
    generation: int


@dataclass(frozen=True)
class Companion:
    """An object a scheduling plug-in adds to an attempt (a PodGroup): rendered with the job's labels and
    owner reference, and created before the attempt's workers, which name it."""

    api_version: str
    kind: str
    name: str
    spec: Mapping[str, Any]


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
    scheduler_name: str | None = None
    image_pull_secrets: Sequence[str] = ()
    #: The job's pod labels and annotations, then plug-ins'; the operator's own are applied over them.
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    template_hash: str = ""
    companions: tuple[Companion, ...] = ()

    @property
    def group_name(self) -> str:
        """The attempt's name for a gang scheduler's pod group: unique per job (the UID prefix outlives a
        delete-and-recreate under the same name) and attempt, so a restarted or resumed gang never joins a
        finished group; a valid label value and object name (at most 63 characters)."""
        return f"{names.job_base(self.job.name)[:44].rstrip('-')}-{self.job.uid[:5]}-{self.attempt}"

    @property
    def rendezvous(self) -> Rendezvous:
        return Rendezvous(
            master_addr=names.master_addr(self.job.name),
            master_port=self.master_port,
            nnodes=self.nodes,
            nproc_per_node=self.gpus_per_node,
        )


def worker_affinity(
    job: FineTuneJob, ref: JobRef, nodes: int, node_affinity: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The workers' affinity: the GPU placement (or the job's own nodeAffinity), and with several workers
    one per node, which the plan assumes (each worker takes all of a node's planned GPUs); the job's own
    podAffinity / podAntiAffinity replace that spread."""
    own = dict(job.spec.affinity or {})
    affinity: dict[str, Any] = dict(node_affinity or {})
    if nodes > 1:
        affinity["podAntiAffinity"] = {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {
                    "labelSelector": {"matchLabels": names.selector_labels(ref.name)},
                    "topologyKey": HOSTNAME_LABEL,
                }
            ]
        }
    return affinity | own


#: The taints the node lifecycle controller puts on a node that stops being Ready.
NODE_LOSS_TAINTS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")


def node_loss_tolerations(own: Sequence[Toleration], seconds: int) -> list[dict[str, Any]]:
    """How long the workers stay on a node that stopped being Ready before Kubernetes evicts them (it
    would wait 300 s): the eviction marks the pod, and the operator then reads its node to tell a lost
    one (force-delete, restart elsewhere) from a recovered one. A job's own toleration of a key wins."""
    keys = {t.key for t in own}
    return [
        {"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": seconds}
        for key in NODE_LOSS_TAINTS
        if key not in keys
    ]


def config_data(job: FineTuneJob, planned: Plan) -> dict[str, str]:
    """The ConfigMap's one file: the trainer config every worker reads. The trainer renders its DeepSpeed
    config from it, so the DeepSpeed settings have one copy and one owner."""
    return {CONFIG_FILE: render_trainer_config(job, planned).to_yaml()}


def build_gang(job: FineTuneJob, ref: JobRef, planned: Plan, options: RenderOptions, attempt: int) -> Gang:
    """The gang for one attempt of `job` as planned (raises TrainerConfigError for unusable URIs)."""
    spec = job.spec
    resources = spec.resources
    placed = placement(resources.gpu_type, resources.gpu_memory_gi_b, options.placement_preset)
    gpus = str(planned.gpus_per_node)
    requests: dict[str, str] = {placed.resource: gpus}
    limits: dict[str, str] = {placed.resource: gpus}
    if resources.cpu:
        requests["cpu"] = resources.cpu
    needs = planned.requests
    if resources.memory:
        requests["memory"] = limits["memory"] = resources.memory
    else:  # the plan's estimate: requested, not limited (an estimate is no reason to OOM-kill)
        requests["memory"] = binary_quantity(needs.memory_bytes)
    requests["ephemeral-storage"] = binary_quantity(needs.ephemeral_storage_bytes)
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
        termination_grace_seconds=spec.run_policy.termination_grace_period_seconds
        or max(options.termination_grace_seconds, needs.checkpoint_seconds),
        shared_memory=resources.shared_memory,
        config_data=config_data(job, planned),
        mounts=mounts,
        read_only_claims=frozenset(mounts) - written_claims,
        env=env,
        env_from=env_from,
        resources={"requests": requests, "limits": limits},
        node_selector=dict(spec.node_selector),
        tolerations=[
            # GPU nodes are commonly tainted with their resource name so that only GPU work lands there.
            {"key": placed.resource, "operator": "Exists", "effect": "NoSchedule"},
            *node_loss_tolerations(spec.tolerations, options.node_lost_seconds),
            *(t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations),
        ],
        affinity=worker_affinity(job, ref, planned.nodes, placed.affinity) or None,
        priority_class_name=spec.priority_class_name,
        scheduler_name=spec.scheduler_name,
        image_pull_secrets=tuple(spec.image_pull_secrets),
        labels=dict(spec.pod_labels),
        annotations=dict(spec.pod_annotations),
    )


#: A scheduling plug-in's refinement of the gang (`scheduling/`).
Refine = Callable[[Gang], Gang]
