"""Where workers may run: the GPU's extended resource and the node affinity for it, per cluster flavour.

A preset says how a cluster labels its GPU nodes; the catalogue (`data/gpus.json`) holds each GPU's
label values per preset, every board variant included (an A100 80GB asks for SXM4 and PCIe nodes alike):
- `nvidia-gfd` (default): NVIDIA GPU feature discovery's `nvidia.com/gpu.product` (the GPU operator
  installs it); `gpuMemoryGiB` uses its `nvidia.com/gpu.memory` label, so unknown GPUs match too.
- `gke`: GKE's `cloud.google.com/gke-accelerator`.
- `eks`: the EKS instance types that carry the GPU (`node.kubernetes.io/instance-type`).
AMD GPUs are `amd.com/gpu` in every preset and are placed by AMD's node labeller's
`amd.com/gpu.product-name`. A job's own `spec.affinity.nodeAffinity` replaces all of this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from finetune_operator.core.hardware import GpuModel, gpu_model, gpu_models

PRESETS = ("nvidia-gfd", "gke", "eks")
#: Preset → the node label whose values the catalogue lists.
LABEL_KEYS = {
    "nvidia-gfd": "nvidia.com/gpu.product",
    "gke": "cloud.google.com/gke-accelerator",
    "eks": "node.kubernetes.io/instance-type",
}
#: NVIDIA GPU feature discovery's label of per-GPU memory in MiB (what gpuMemoryGiB matches with GFD).
GFD_MEMORY_MIB = "nvidia.com/gpu.memory"
NVIDIA_RESOURCE = "nvidia.com/gpu"
AMD_RESOURCE = "amd.com/gpu"
AMD_PRODUCT_LABEL = "amd.com/gpu.product-name"


class PlacementError(ValueError):
    """The GPU cannot be placed under this preset (no label value is known for it)."""


@dataclass(frozen=True)
class Placement:
    """The extended resource the workers request, and the node affinity that picks their nodes."""

    resource: str
    affinity: dict[str, Any] | None


def _required(key: str, operator: str, values: list[str]) -> dict[str, Any]:
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": key, "operator": operator, "values": values}]}
                ]
            }
        }
    }


def _label(gpu: GpuModel, preset: str) -> tuple[str, list[str]]:
    """The label key and values that mean `gpu` under `preset`."""
    if gpu.resource == AMD_RESOURCE:
        return AMD_PRODUCT_LABEL, list(gpu.labels["nvidia-gfd"])
    return LABEL_KEYS[preset], list(gpu.labels.get(preset, ()))


def placement(gpu_type: str | None, gpu_memory_gib: float | None, preset: str = "nvidia-gfd") -> Placement:
    """Resource and affinity for a job's `gpuType` or `gpuMemoryGiB` (which wins, as the API says)."""
    if preset not in PRESETS:
        raise PlacementError(f"unknown placement preset {preset!r}; known: {', '.join(PRESETS)}")
    if gpu_memory_gib is not None:
        mib = math.ceil(round(gpu_memory_gib * 1024, 6))
        if preset == "nvidia-gfd":  # `Gt` takes integers, so ≥ N is > N-1
            return Placement(NVIDIA_RESOURCE, _required(GFD_MEMORY_MIB, "Gt", [str(mib - 1)]))
        # Without a memory label: every catalogued NVIDIA GPU with at least that much, by its labels.
        values = [
            v
            for gpu in gpu_models()
            if gpu.resource == NVIDIA_RESOURCE and gpu.memory_bytes >= mib * 1024**2
            for v in gpu.labels.get(preset, ())
        ]
        if not values:
            raise PlacementError(f"no {preset} GPU in the catalogue has {gpu_memory_gib} GiB; use gpuType")
        return Placement(NVIDIA_RESOURCE, _required(LABEL_KEYS[preset], "In", values))
    if gpu_type is None:
        return Placement(NVIDIA_RESOURCE, None)
    gpu = gpu_model(gpu_type)
    key, values = _label(gpu, preset)
    if not values:
        raise PlacementError(
            f"resources.gpuType {gpu.name} has no {key} value under the {preset} preset; "
            f"set spec.affinity to place it"
        )
    return Placement(gpu.resource, _required(key, "In", values))
