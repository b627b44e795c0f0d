"""What a worker asks of its node besides GPUs: host memory, local disk, and time to checkpoint on SIGTERM.

Without these a worker requests only GPUs: the scheduler may put an offload job on a node without the
host memory its optimizer states need, the memory-backed /dev/shm goes unaccounted, hub downloads fill
the node's disk unannounced, and a large checkpoint is cut off by the kubelet's SIGKILL. The numbers
are estimates that err high; a job's own `resources.memory` and `runPolicy.terminationGracePeriodSeconds`
win over them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from finetune_operator.api.models import FineTuneJobSpec

GIB = 1024**3
#: Host memory of one worker process beyond offloaded states: Python, torch and CUDA's host side, the
#: data loader and tokeniser, and one shard of weights in flight while the model loads.
HOST_BYTES_PER_PROCESS = 6 * GIB
#: Local disk of a worker beyond downloads: logs, DeepSpeed's compiled ops, temporary files.
LOCAL_DISK_BYTES = 2 * GIB
#: Bytes per parameter of a hub checkpoint on disk (16-bit safetensors, how models are published).
HUB_BYTES_PER_PARAM = 2
#: What one node is assumed to sustain writing a checkpoint to network storage (bytes per second).
CHECKPOINT_WRITE_BYTES_PER_SECOND = 200 * 1000**2
#: Bytes per trainable parameter in a checkpoint: 16-bit weights, plus fp32 master weights and Adam's two
#: moments for the optimizer (sharded across ranks under ZeRO); under training.pureBf16 the moments are
#: bf16, and only ZeRO keeps a (bf16) master copy.
CHECKPOINT_WEIGHT_BYTES = 2
CHECKPOINT_OPTIMIZER_BYTES = 12
CHECKPOINT_PURE_BF16_OPTIMIZER_BYTES = 4
CHECKPOINT_PURE_BF16_MASTER_BYTES = 2
#: Slack on the write-time estimate, and the fixed time to stop the step and start saving (seconds).
CHECKPOINT_MARGIN = 1.5
CHECKPOINT_SETUP_SECONDS = 30

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][0-9]+)?$")
_SUFFIX = {
    **{s: 1024 ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))},
    **{s: 1000 ** (i + 1) for i, s in enumerate(("k", "M", "G", "T", "P", "E"))},
    "n": 1e-9,
    "u": 1e-6,
    "m": 1e-3,
}


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes quantity (as the schema admits: 16Gi, 500M, 1e9) in whole units, rounded up."""
    match = _QUANTITY.match(quantity)
    if match is None:
        raise ValueError(f"not a quantity: {quantity!r}")
    number, suffix = float(match[1]), match[2] or ""
    factor: float = 10.0 ** int(suffix[1:]) if suffix[:1] in ("e", "E") else _SUFFIX.get(suffix, 1)
    return math.ceil(number * factor)


def binary_quantity(value: int) -> str:
    """`value` rounded up to whole MiB, in the canonical form the API server stores (64Gi, not 65536Mi),
    so rendered pods read back unchanged."""
    amount, suffixes = -(-value // 1024**2), ("Mi", "Gi", "Ti", "Pi", "Ei")
    for suffix in suffixes:
        if amount % 1024 or suffix == suffixes[-1]:
            return f"{amount}{suffix}"
        amount //= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class WorkerRequests:
    """Per worker (one per node): host memory, local disk, and the seconds to write a checkpoint."""

    memory_bytes: int
    ephemeral_storage_bytes: int
    checkpoint_seconds: int


def worker_requests(
    spec: FineTuneJobSpec,
    *,
    gpus: int,
    gpus_per_node: int,
    zero_stage: int,
    host_offload_bytes_per_node: int,
    total_params: int,
    trainable_params: int,
) -> WorkerRequests:
    """What one worker of this layout needs from its node."""
    memory = (
        host_offload_bytes_per_node
        + quantity_bytes(spec.resources.shared_memory)  # /dev/shm is memory-backed
        + HOST_BYTES_PER_PROCESS * gpus_per_node
    )
    from_hub = spec.model.uri is None or spec.model.uri.startswith("hf://")
    downloads = math.ceil(total_params * HUB_BYTES_PER_PARAM * 1.1) if from_hub else 0
    # Rank 0's node writes the 16-bit trainable weights; every rank its optimizer shard (ZeRO ≥ 1), or
    # rank 0 all of it (ZeRO-0).
    optimizer_share = gpus_per_node / gpus if zero_stage >= 1 else 1.0
    optimizer_bytes = CHECKPOINT_OPTIMIZER_BYTES
    if spec.training.pure_bf16:
        optimizer_bytes = CHECKPOINT_PURE_BF16_OPTIMIZER_BYTES + (
            CHECKPOINT_PURE_BF16_MASTER_BYTES if zero_stage >= 1 else 0
        )
    node_bytes = trainable_params * (CHECKPOINT_WEIGHT_BYTES + optimizer_bytes * optimizer_share)
    seconds = (
        math.ceil(node_bytes / CHECKPOINT_WRITE_BYTES_PER_SECOND * CHECKPOINT_MARGIN)
        + CHECKPOINT_SETUP_SECONDS
    )
    return WorkerRequests(
        memory_bytes=memory,
        ephemeral_storage_bytes=LOCAL_DISK_BYTES + downloads,
        checkpoint_seconds=seconds,
    )
