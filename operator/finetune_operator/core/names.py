"""Every name the operator gives to objects, labels, annotations, env variables and paths, in one place.

Names are deterministic functions of the job, never random: an operator that restarts at any moment
computes the same pod names again and finds (or creates, tolerating AlreadyExists) the same objects,
which is what makes re-adoption free of duplicates.

Kubernetes limits decide the shapes here: a pod's `hostname` and a Service name are DNS labels (63
characters, no dots) and a label value is 63 characters, while a FineTuneJob name may be a 253-character
DNS subdomain. `job_base` maps every job name to a short, unique, DNS-label-safe stem.
"""

from __future__ import annotations

import hashlib
import re

# --- labels and annotations ---------------------------------------------------------------------------

#: On every object the operator creates: the job's name stem (`job_base`), used as the pod selector.
LABEL_JOB_NAME = "finetune.dev/job-name"
#: On every worker pod: its node rank, 0 … nodes-1.
LABEL_REPLICA_INDEX = "finetune.dev/replica-index"
#: On every worker pod: which gang attempt (status.restarts when it was created) the pod belongs to.
LABEL_ATTEMPT = "finetune.dev/attempt"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_APP_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
MANAGED_BY = "finetune-operator"
APP_NAME = "finetune-trainer"

#: Hash of what the worker pods and their config would be for the spec that created them.
ANNOTATION_TEMPLATE_HASH = "finetune.dev/template-hash"
#: metadata.generation of the job when the pod was created; a spec change is a newer generation.
ANNOTATION_GENERATION = "finetune.dev/generation"

# --- fixed paths in the worker ------------------------------------------------------------------------

CONFIG_MOUNT_PATH = "/etc/finetune"
SHM_PATH = "/dev/shm"
CONTAINER_NAME = "trainer"

# --- environment variables the operator sets (user env may not collide with any of them) --------------

ENV_MASTER_ADDR = "MASTER_ADDR"
ENV_MASTER_PORT = "MASTER_PORT"
ENV_NNODES = "NNODES"
ENV_NODE_RANK = "NODE_RANK"
ENV_NPROC_PER_NODE = "NPROC_PER_NODE"
ENV_WORLD_SIZE = "WORLD_SIZE"
ENV_POD_NAME = "POD_NAME"
ENV_POD_NAMESPACE = "POD_NAMESPACE"
ENV_HF_TOKEN = "HF_TOKEN"
#: How long torchrun waits for workers to checkpoint after SIGTERM before it escalates to SIGKILL.
ENV_SHUTDOWN_TIMEOUT = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
#: torchrun sets these in every process it starts; a pod-level value would be misleading or ignored.
TORCHRUN_OWNED_ENV = frozenset(
    {"RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE"}
)
RESERVED_ENV = frozenset(
    {
        ENV_MASTER_ADDR,
        ENV_MASTER_PORT,
        ENV_NNODES,
        ENV_NODE_RANK,
        ENV_NPROC_PER_NODE,
        ENV_WORLD_SIZE,
        ENV_POD_NAME,
        ENV_POD_NAMESPACE,
        ENV_HF_TOKEN,
        ENV_SHUTDOWN_TIMEOUT,
    }
    | TORCHRUN_OWNED_ENV
)

# --- object names -------------------------------------------------------------------------------------

_WORKER_SUFFIX_ROOM = len("-worker-") + 4  # up to 9999 nodes
#: The longest stem that leaves room for `-worker-NNNN` inside a 63-character DNS label.
MAX_BASE = 63 - _WORKER_SUFFIX_ROOM
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def job_base(job_name: str) -> str:
    """A DNS-label stem for the job's objects: the name itself when it is short and dot-free.

    Otherwise a readable prefix plus 8 hex digits of the name's SHA-256, so two long names that share
    a prefix (or differ only by `.` against `-`) still get different stems.
    """
    if len(job_name) <= MAX_BASE and _DNS_LABEL.match(job_name):
        return job_name
    digest = hashlib.sha256(job_name.encode()).hexdigest()[:8]
    prefix = re.sub(r"[^a-z0-9-]", "-", job_name.lower())[: MAX_BASE - 9].strip("-") or "ftj"
    return f"{prefix}-{digest}"


def worker_name(job_name: str, index: int) -> str:
    """The worker pod's name, which is also its hostname (rank 0's is the rendezvous address)."""
    return f"{job_base(job_name)}-worker-{index}"


def service_name(job_name: str) -> str:
    """The headless Service giving workers stable DNS names `<worker>.<service>`."""
    return f"{job_base(job_name)}-workers"


def configmap_name(job_name: str) -> str:
    """The ConfigMap holding the trainer and DeepSpeed configs."""
    return f"{job_base(job_name)}-config"


def master_addr(job_name: str) -> str:
    """Rank 0's DNS name, resolvable from any worker through the namespace's search path."""
    return f"{worker_name(job_name, 0)}.{service_name(job_name)}"


def selector_labels(job_name: str) -> dict[str, str]:
    """The labels that select every object of one job."""
    return {LABEL_JOB_NAME: job_base(job_name)}
