"""Placement on real clusters: each preset's labels, every board variant, AMD's resource, and the
per-job overrides (affinity, scheduler, pull secrets, pod labels and annotations)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from operator_fixtures import OPTIONS, job, ref

from finetune_operator.core.desire import Desired, desire
from finetune_operator.core.placement import PlacementError, placement


def terms(affinity: dict[str, Any] | None) -> list[dict[str, Any]]:
    assert affinity is not None
    required = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    return list(required["nodeSelectorTerms"][0]["matchExpressions"])


@pytest.mark.parametrize(
    ("preset", "gpu", "expression"),
    [
        (
            "nvidia-gfd",
            "H100-PCIe",
            ("nvidia.com/gpu.product", ["NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe"]),
        ),
        ("nvidia-gfd", "L4", ("nvidia.com/gpu.product", ["NVIDIA-L4"])),
        ("gke", "A100-80GB-PCIe", ("cloud.google.com/gke-accelerator", ["nvidia-a100-80gb"])),
        ("gke", "A100-40GB", ("cloud.google.com/gke-accelerator", ["nvidia-tesla-a100"])),
        ("eks", "A100-80GB", ("node.kubernetes.io/instance-type", ["p4de.24xlarge"])),
        ("eks", "H100-80GB", ("node.kubernetes.io/instance-type", ["p5.48xlarge"])),
    ],
)
def test_each_preset_places_a_gpu_type_by_its_own_label(
    preset: str, gpu: str, expression: tuple[str, list[str]]
) -> None:
    placed = placement(gpu, None, preset)
    assert placed.resource == "nvidia.com/gpu"
    key, values = expression
    assert terms(placed.affinity) == [{"key": key, "operator": "In", "values": values}]


def test_gpu_memory_without_a_memory_label_matches_every_catalogued_gpu_with_enough() -> None:
    expressions = terms(placement(None, 80, "gke").affinity)
    assert expressions[0]["key"] == "cloud.google.com/gke-accelerator"
    # By the memory the driver reports: an "80GB" H100 has 81559 MiB, less than 80 GiB, so it is out.
    assert set(expressions[0]["values"]) == {"nvidia-a100-80gb", "nvidia-h200-141gb", "nvidia-b200"}
    assert "nvidia-h100-80gb" in terms(placement(None, 79, "gke").affinity)[0]["values"]
    with pytest.raises(PlacementError, match="no gke GPU in the catalogue has 4096 GiB"):
        placement(None, 4096, "gke")


def test_amd_gpus_request_their_own_resource_under_every_preset() -> None:
    for preset in ("nvidia-gfd", "gke", "eks"):
        placed = placement("MI300X", None, preset)
        assert placed.resource == "amd.com/gpu"
        assert terms(placed.affinity) == [
            {"key": "amd.com/gpu.product-name", "operator": "In", "values": ["AMD-Instinct-MI300X"]}
        ]


def test_a_gpu_the_preset_cannot_name_and_an_unknown_preset_are_refused_with_what_to_do() -> None:
    with pytest.raises(
        PlacementError, match=r"RTX-4090 has no node.kubernetes.io/instance-type .* spec.affinity"
    ):
        placement("RTX-4090", None, "eks")
    with pytest.raises(PlacementError, match="unknown placement preset 'aks'"):
        placement("L4", None, "aks")


def rendered(options: Any = OPTIONS, **spec: Any) -> Desired:
    result = desire(job(**spec), ref(), options, attempt=0)
    assert isinstance(result, Desired), result
    return result


def test_an_amd_job_requests_and_tolerates_amd_gpus() -> None:
    pod = rendered(resources={"gpuType": "MI300X", "gpusPerNode": 8, "gpus": 8}).pods[0]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {"amd.com/gpu": "8"}
    assert {"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_the_operators_preset_reaches_the_pods() -> None:
    options = replace(OPTIONS, placement_preset="gke")
    pod = rendered(options, resources={"gpuType": "L4", "gpusPerNode": 8, "gpus": 8}).pods[0]["spec"]
    assert terms(pod["affinity"])[0]["key"] == "cloud.google.com/gke-accelerator"


def test_several_workers_get_one_node_each_and_one_worker_gets_no_spread() -> None:
    two = rendered(resources={"gpuType": "A100-80GB", "gpusPerNode": 4, "gpus": 8})
    (rule,) = two.pods[0]["spec"]["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert rule == {
        "labelSelector": {"matchLabels": {"finetune.dev/job-name": "tiny"}},
        "topologyKey": "kubernetes.io/hostname",
    }
    one = rendered(resources={"gpuType": "A100-80GB", "gpusPerNode": 8, "gpus": 8})
    assert "podAntiAffinity" not in one.pods[0]["spec"]["affinity"]


def test_the_jobs_own_affinity_replaces_placement_and_spread_part_by_part() -> None:
    own_nodes = {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["ml"]}]}]
        }
    }
    pod = rendered(
        resources={"gpuType": "A100-80GB", "gpusPerNode": 4, "gpus": 8}, affinity={"nodeAffinity": own_nodes}
    ).pods[0]["spec"]
    assert pod["affinity"]["nodeAffinity"] == own_nodes  # the GPU placement is the job's now
    assert "podAntiAffinity" in pod["affinity"]  # the spread stays unless the job replaces it too


def test_scheduler_pull_secrets_and_pod_metadata_pass_through_under_the_operators_own() -> None:
    result = rendered(
        schedulerName="volcano",
        imagePullSecrets=["registry-creds"],
        podLabels={"team": "nlp", "finetune.dev/job-name": "hijack"},
        podAnnotations={"sidecar.istio.io/inject": "false"},
    )
    pod = result.pods[0]
    assert pod["spec"]["schedulerName"] == "volcano"
    assert pod["spec"]["imagePullSecrets"] == [{"name": "registry-creds"}]
    assert pod["metadata"]["labels"]["team"] == "nlp"
    assert pod["metadata"]["labels"]["finetune.dev/job-name"] == "tiny"  # selectors cannot be broken
    assert pod["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    # Pod metadata is bookkeeping: changing it alone does not restart running training.
    assert (
        rendered(podLabels={"team": "cv"}).template_hash == rendered(podLabels={"team": "nlp"}).template_hash
    )
