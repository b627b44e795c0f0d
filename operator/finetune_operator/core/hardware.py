"""The GPU catalogue: usable memory per product, and the node label that identifies it.

Memory is what the driver reports as total (`nvidia-smi --query-gpu=memory.total`, equal to
`torch.cuda.mem_get_info()[1]`), in bytes: an "80GB" A100 is 81920 MiB but an "80GB" H100 is 81559 MiB,
and a planner that believed the marketing number would place jobs that cannot fit. What a process can
allocate is less again (CUDA context, other processes); the estimator accounts for the context, the
planner for any safety margin.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources

MIB = 1024**2


class UnknownGpuError(ValueError):
    """A GPU name the catalogue does not hold; the message lists the known names."""


@dataclass(frozen=True)
class GpuModel:
    """One GPU product. `resource` is the extended resource nodes advertise it as; `labels` the node
    label values that mean it, per placement preset (`core/placement.py`); `bf16` says whether the
    hardware computes in bfloat16 (pre-Ampere NVIDIA cards do not, so fp16 is the choice)."""

    name: str
    memory_bytes: int
    resource: str
    labels: Mapping[str, tuple[str, ...]]
    bf16: bool

    @property
    def gfd_product(self) -> str:
        """The `nvidia.com/gpu.product` value of its main board variant."""
        return self.labels["nvidia-gfd"][0]


def _normalise(name: str) -> str:
    """Lower-case, drop vendor words and punctuation: `NVIDIA-A100-SXM4-80GB` → `a100sxm480gb`."""
    key = name.strip().lower()
    key = re.sub(r"^(nvidia|tesla|amd)[-_ ]+", "", key)
    key = re.sub(r"^(nvidia|tesla|geforce|amd)[-_ ]+", "", key)
    return re.sub(r"[^a-z0-9]", "", key)


@cache
def _catalogue() -> tuple[dict[str, GpuModel], dict[str, GpuModel]]:
    """(models by canonical name, models by every normalised alias, canonical and GFD names included)."""
    raw = json.loads(resources.files("finetune_operator.core").joinpath("data/gpus.json").read_text("utf-8"))
    by_name: dict[str, GpuModel] = {}
    by_key: dict[str, GpuModel] = {}
    for name, entry in raw["gpus"].items():
        labels = {preset: tuple(values) for preset, values in entry["labels"].items()}
        model = GpuModel(name, int(entry["memory_mib"]) * MIB, entry["resource"], labels, bool(entry["bf16"]))
        by_name[name] = model
        for alias in (name, *labels["nvidia-gfd"], *entry["aliases"]):
            key = _normalise(alias)
            if key in by_key and by_key[key] is not model:
                raise ValueError(f"GPU alias {alias!r} is ambiguous in gpus.json")
            by_key[key] = model
    return by_name, by_key


def gpu_names() -> list[str]:
    """Canonical product names, in catalogue order (smallest memory first)."""
    return sorted(_catalogue()[0], key=lambda n: (_catalogue()[0][n].memory_bytes, n))


def gpu_models() -> list[GpuModel]:
    """Every product, smallest memory first."""
    return [_catalogue()[0][name] for name in gpu_names()]


def gpu_model(name: str) -> GpuModel:
    """Look up a canonical name, an alias or a GFD product label, ignoring case and punctuation."""
    model = _catalogue()[1].get(_normalise(name))
    if model is None:
        raise UnknownGpuError(f"unknown GPU {name!r}; known: {', '.join(gpu_names())}")
    return model
