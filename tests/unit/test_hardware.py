"""The GPU catalogue: driver-reported memory and the node labels GPU feature discovery writes."""

from __future__ import annotations

import pytest

from finetune_operator.core.hardware import UnknownGpuError, gpu_model, gpu_names

MIB = 1024**2


@pytest.mark.parametrize(
    ("label", "name", "mib"),
    [
        ("NVIDIA-A100-SXM4-80GB", "A100-80GB", 81920),
        ("NVIDIA-A100-SXM4-40GB", "A100-40GB", 40960),
        ("NVIDIA-H100-80GB-HBM3", "H100-80GB", 81559),
        ("NVIDIA-H100-NVL", "H100-94GB", 95830),
        ("Tesla-T4", "T4", 15360),
        ("NVIDIA-GeForce-RTX-4090", "RTX-4090", 24564),
        ("nvidia-l40s", "L40S", 46068),
        ("h200", "H200", 143771),
    ],
)
def test_gfd_labels_and_names_resolve_to_driver_memory(label: str, name: str, mib: int) -> None:
    gpu = gpu_model(label)
    assert (gpu.name, gpu.memory_bytes) == (name, mib * MIB)


def test_every_gpu_resolves_by_name_and_by_its_gfd_label() -> None:
    names = gpu_names()
    assert len(names) == 16
    for name in names:
        gpu = gpu_model(name)
        assert gpu_model(gpu.gfd_product) is gpu
        assert gpu_model(name.lower().replace("-", " ")) is gpu


def test_pre_ampere_cards_have_no_bf16() -> None:
    assert not gpu_model("T4").bf16 and not gpu_model("V100-32GB").bf16
    assert gpu_model("A10G").bf16


def test_names_sorted_by_memory() -> None:
    sizes = [gpu_model(n).memory_bytes for n in gpu_names()]
    assert sizes == sorted(sizes)


def test_unknown_gpu_lists_known_names() -> None:
    with pytest.raises(UnknownGpuError, match="A100-80GB") as info:
        gpu_model("K80")
    assert isinstance(info.value, ValueError)
