"""Operator settings: nested, documented groups, each field with its unit and why its default is what it is.

Every field can be set from the environment (`FINETUNE_<GROUP>_<FIELD>`, e.g.
`FINETUNE_RESTARTS_BACKOFF_SECONDS=0.5`), which is how the Helm chart and the e2e tests configure the
operator; the command line (`python -m finetune_operator --help`) overrides the most common ones.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, get_origin, get_type_hints

from finetune_operator.api.enums import AttentionImpl, GangScheduling
from finetune_operator.api.trainer import IMAGE_ATTENTION
from finetune_operator.core.gang import RenderOptions
from finetune_operator.core.lifecycle import LifecyclePolicy
from finetune_operator.core.placement import PRESETS
from finetune_operator.core.requests import quantity_bytes
from finetune_operator.scheduling.options import SCHEDULER_NAME, SchedulingOptions

ENV_PREFIX = "FINETUNE_"


@dataclass(frozen=True)
class TimingSettings:
    """How often the operator looks at each job."""

    #: Seconds between two looks at an unfinished job when nothing wakes it earlier: a safety net only.
    #: Pod and job events wake it at once, everything timed (backoff, deadlines, Stalled, TTL) schedules
    #: its own look, and a look reads the informer's stores, not the API server. A finished job is
    #: never looked at unless woken or its TTL is due.
    resync_seconds: float = 300.0
    #: Seconds to wait after a pod event before reconciling, so a gang's burst of events (8 workers
    #: going Running together) becomes one reconcile.
    debounce_seconds: float = 0.2
    #: First wait (seconds) after an API error; doubles up to `error_backoff_max_seconds`.
    error_backoff_seconds: float = 1.0
    #: The cap on that wait: long enough not to hammer a struggling API server, short enough to recover.
    error_backoff_max_seconds: float = 60.0
    #: After this many failed passes in a row, the error is also a Warning event on the job (once per
    #: distinct message): a quota or RBAC refusal that persists is the user's to see, not only the log's.
    report_errors_after: int = 3
    #: Seconds a running job's step may stay put before it is marked Stalled (a job's
    #: runPolicy.progressDeadlineSeconds overrides it): half an hour covers loading a large model.
    stalled_after_seconds: float = 1800.0
    #: Threads the operator's API writes run in (its client, adapters/rest.py, is synchronous), and the size of
    #: its connection pool: how many requests can be in flight at once when many jobs start together.
    api_threads: int = 16


@dataclass(frozen=True)
class RestartSettings:
    """Whole-gang restarts after a worker failure (the count limit is the job's runPolicy.backoffLimit)."""

    #: Seconds before the first restart; each next one waits twice as long. 10 s lets a flapping node
    #: or a storage hiccup pass without burning the job's restarts in a few seconds.
    backoff_seconds: float = 10.0
    #: Cap (seconds) on that wait: five minutes, after which waiting longer rarely helps.
    backoff_max_seconds: float = 300.0
    #: Seconds a worker's node may stay not Ready (its kubelet silent) before the worker is lost: the gang
    #: restarts as a disruption and the pod is force-deleted (core/lifecycle.py says why that is safe).
    node_lost_seconds: float = 120.0


@dataclass(frozen=True)
class TrainerSettings:
    """The worker pods' defaults; a job's spec.image and spec.serviceAccountName override them."""

    #: Trainer image used when the job names none (the chart sets the one built with this release).
    image: str = "ghcr.io/finetune-operator/trainer:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    #: Service account for workers when the job names none: rank 0 patches its own pod with progress,
    #: so it needs pods/patch. Empty means the namespace's `default`.
    service_account: str = "finetune-trainer"
    #: ClusterRole (pods get/patch; the chart makes it) the operator binds to `service_account` in a
    #: job's namespace, creating the account where missing, so jobs run in any namespace. Empty: the
    #: accounts must exist already.
    cluster_role: str = ""
    #: UID/GID the workers run as: the trainer image's own user (Dockerfile.trainer), whose home holds
    #: the Hugging Face cache and DeepSpeed's compiled ops; non-root for the restricted profile.
    run_as_user: int = 10001
    #: Seconds a worker gets after SIGTERM to write a checkpoint before it is killed.
    termination_grace_seconds: int = 120
    #: The attention kernels (model.attentionImplementation) `image` has, comma-separated in the
    #: environment: the image built here has PyTorch's sdpa and eager; one with the flash-attn package
    #: adds flash_attention_2. Jobs asking `image` for another kernel are refused at `kubectl apply`.
    attention_implementations: tuple[str, ...] = tuple(a.value for a in IMAGE_ATTENTION)

    def __post_init__(self) -> None:
        known = {a.value for a in AttentionImpl}
        unknown = [name for name in self.attention_implementations if name not in known]
        if unknown or not self.attention_implementations:
            raise ValueError(
                f"trainer attention_implementations must be some of {', '.join(sorted(known))}, "
                f"got {', '.join(self.attention_implementations) or 'none'}"
            )


@dataclass(frozen=True)
class PeeringSettings:
    """kopf peering: of several replicas only the one with the highest priority acts."""

    #: Run without peering (one replica, tests). The chart runs two replicas with peering.
    standalone: bool = False
    #: Name of the KopfPeering / ClusterKopfPeering object the replicas meet in.
    name: str = "finetune-operator"
    #: This replica's priority; replicas with equal priority all pause (kopf warns), so each draws its
    #: own (0 means: pick a random one at start-up).
    priority: int = 0
    #: Seconds a replica's peering record stays valid without a heartbeat: after a crash, the next
    #: replica takes over at most this long later. kopf's default; shorter means more API writes.
    lifetime_seconds: int = 60
    #: Seconds a replica that has just started waits before it first acts. kopf pauses the replica it
    #: outranks only once that one sees its record, and then stops its loops (each has 5 s to stop):
    #: until then both would act. Costs a failover this much on top of `lifetime_seconds`.
    handover_seconds: float = 10.0


@dataclass(frozen=True)
class MetricsSettings:
    #: Port of the Prometheus /metrics endpoint; 0 disables it.
    port: int = 8080
    #: Port of kopf's liveness endpoint (/healthz); 0 disables it.
    health_port: int = 8081
    #: Seconds a finished job's per-job series stay after its completionTime (alerts and dashboards get
    #: a last look; the series count follows running jobs, not the job history).
    finished_retention_seconds: float = 3600.0


@dataclass(frozen=True)
class PlacementSettings:
    """How this cluster labels its GPU nodes, so workers land on the GPU a job asks for."""

    #: nvidia-gfd (NVIDIA GPU feature discovery's nvidia.com/gpu.product; the GPU operator installs it),
    #: gke (cloud.google.com/gke-accelerator) or eks (node.kubernetes.io/instance-type). A job's
    #: spec.affinity.nodeAffinity replaces the placement on any cluster.
    preset: str = "nvidia-gfd"
    #: Host memory of the GPU nodes, a Kubernetes quantity (1Ti, 512Gi; allocatable, not capacity). The
    #: planner then never picks a layout (such as optimizer offload on few GPUs) whose workers request
    #: more, and says so when nothing else fits. Empty: not checked; a worker no node can hold stays
    #: Pending, and the job's status shows the scheduler's "Insufficient memory".
    node_memory: str = ""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"placement preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.node_memory:
            try:
                quantity_bytes(self.node_memory)
            except ValueError as exc:
                raise ValueError(f"placement node_memory: {exc}") from exc

    @property
    def node_memory_bytes(self) -> int | None:
        return quantity_bytes(self.node_memory) if self.node_memory else None


@dataclass(frozen=True)
class WebhookSettings:
    """The validating admission webhook: `kubectl apply` of a job that cannot run is refused with the
    planner's message. Without it (port 0) such a job is accepted and then fails as MemoryFits."""

    #: Port the webhook listens on; 0 turns it off. The chart sets 9443.
    port: int = 0
    #: Address it listens on: loopback for the local cluster, all interfaces in a pod.
    address: str = "127.0.0.1"
    #: Host name or IP in the webhook's URL and certificate (default: `address`).
    host: str = ""
    #: Directory with tls.crt and tls.key (a Secret the chart or cert-manager makes); empty: the
    #: operator makes a self-signed certificate at start.
    cert_dir: str = ""
    #: The ValidatingWebhookConfiguration the operator keeps pointing at itself by URL (the local
    #: cluster); empty when the chart renders it (a Service in front of the replicas).
    configuration: str = "finetune-operator.finetune.dev"
    #: What the API server does when the webhook cannot be reached: Ignore admits the job (the
    #: operator fails it as MemoryFits when it runs); Fail refuses every FineTuneJob change until the
    #: operator is back.
    failure_policy: str = "Ignore"

    def __post_init__(self) -> None:
        if self.failure_policy not in ("Ignore", "Fail"):
            raise ValueError(f"webhook failure_policy must be Ignore or Fail, got {self.failure_policy!r}")


@dataclass(frozen=True)
class SchedulingSettings:
    """How workers are placed when a job's runPolicy does not say (runPolicy.queueName picks Kueue)."""

    #: none: the default scheduler places each worker as it can; coscheduling: every gang is a
    #: scheduler-plugins PodGroup placed all or nothing (needs its PodGroup CRD and a kube-scheduler with
    #: the Coscheduling plugin). A job's runPolicy.gangScheduling overrides it.
    gang_scheduling: str = GangScheduling.NONE.value
    #: The schedulerName of that kube-scheduler: what scheduler-plugins' chart names it. A job's own
    #: spec.schedulerName wins.
    coscheduling_scheduler_name: str = SCHEDULER_NAME

    def __post_init__(self) -> None:
        known = [g.value for g in GangScheduling]
        if self.gang_scheduling not in known:
            raise ValueError(
                f"scheduling gang_scheduling must be one of {', '.join(known)}, got {self.gang_scheduling!r}"
            )
        if not self.coscheduling_scheduler_name:
            raise ValueError("scheduling coscheduling_scheduler_name must not be empty")


@dataclass(frozen=True)
class Settings:
    """All operator settings."""

    #: Namespaces to watch; empty watches the whole cluster.
    namespaces: tuple[str, ...] = ()
    timing: TimingSettings = field(default_factory=TimingSettings)
    restarts: RestartSettings = field(default_factory=RestartSettings)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    peering: PeeringSettings = field(default_factory=PeeringSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    webhook: WebhookSettings = field(default_factory=WebhookSettings)
    placement: PlacementSettings = field(default_factory=PlacementSettings)
    scheduling: SchedulingSettings = field(default_factory=SchedulingSettings)

    def render_options(self) -> RenderOptions:
        return RenderOptions(
            image=self.trainer.image,
            image_pull_policy=self.trainer.image_pull_policy,
            service_account=self.trainer.service_account or None,
            trainer_cluster_role=self.trainer.cluster_role or None,
            run_as_user=self.trainer.run_as_user,
            placement_preset=self.placement.preset,
            termination_grace_seconds=self.trainer.termination_grace_seconds,
            node_lost_seconds=round(self.restarts.node_lost_seconds),
            attention_implementations=frozenset(
                AttentionImpl(name) for name in self.trainer.attention_implementations
            ),
            node_memory_bytes=self.placement.node_memory_bytes,
        )

    def scheduling_options(self) -> SchedulingOptions:
        return SchedulingOptions(
            gang_scheduling=GangScheduling(self.scheduling.gang_scheduling),
            coscheduling_scheduler_name=self.scheduling.coscheduling_scheduler_name,
        )

    def lifecycle_policy(self) -> LifecyclePolicy:
        return LifecyclePolicy(
            restart_backoff_seconds=self.restarts.backoff_seconds,
            restart_backoff_max_seconds=self.restarts.backoff_max_seconds,
            stalled_after_seconds=self.timing.stalled_after_seconds,
            node_lost_seconds=self.restarts.node_lost_seconds,
        )


def _convert(kind: Any, raw: str, where: str) -> Any:
    try:
        if kind is bool:
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if get_origin(kind) is tuple:
            return tuple(item for item in raw.replace(",", " ").split() if item)
        return raw
    except ValueError as exc:
        raise ValueError(f"{where}={raw!r} is not a valid {kind.__name__}") from exc


def _group_from_env(group: Any, prefix: str, environ: Mapping[str, str]) -> Any:
    hints = get_type_hints(type(group))
    updates = {}
    for item in dataclasses.fields(group):
        key = f"{prefix}{item.name.upper()}"
        if key in environ:
            updates[item.name] = _convert(hints[item.name], environ[key], key)
    return dataclasses.replace(group, **updates)


def from_env(environ: Mapping[str, str] | None = None, base: Settings | None = None) -> Settings:
    """Settings with every `FINETUNE_<GROUP>_<FIELD>` present in `environ` applied (ValueError if malformed)."""
    environ = os.environ if environ is None else environ
    settings = base or Settings()
    groups = {}
    for item in dataclasses.fields(settings):
        value = getattr(settings, item.name)
        if dataclasses.is_dataclass(value):
            groups[item.name] = _group_from_env(value, f"{ENV_PREFIX}{item.name.upper()}_", environ)
    namespaces = environ.get(f"{ENV_PREFIX}NAMESPACES")
    if namespaces is not None:
        groups["namespaces"] = tuple(n for n in namespaces.replace(",", " ").split() if n)
    return dataclasses.replace(settings, **groups)
