"""The admission verdict: what `kubectl apply` hears from the webhook, the same as `ftctl plan` says."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.core.admission import review as review_with
from finetune_operator.settings import Settings, from_env

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "llama2-7b-alpaca-lora.yaml"
OPTIONS = Settings().render_options()


def review(
    body: dict[str, Any], old: dict[str, Any] | None = None, placement_preset: str = "nvidia-gfd"
) -> str | None:
    """The webhook's verdict under the operator's default settings, with the cluster's preset."""
    return review_with(body, old, replace(OPTIONS, placement_preset=placement_preset))


@pytest.fixture
def job() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return document


def too_large(job: dict[str, Any]) -> dict[str, Any]:
    """Full fine-tuning of a 70B model on two L4s: no count fits it, cheaper variants are suggested."""
    job = copy.deepcopy(job)
    job["spec"]["model"] = {"name": "meta-llama/Meta-Llama-3-70B"}
    job["spec"]["method"] = {"type": "full"}
    job["spec"]["resources"] = {"gpuType": "L4", "gpusPerNode": 1, "gpus": 2}
    return job


def test_a_feasible_job_is_admitted(job: dict[str, Any]) -> None:
    assert review(job) is None


def test_a_job_that_does_not_fit_is_refused_with_the_planners_message_and_suggestions(
    job: dict[str, Any],
) -> None:
    message = review(too_large(job))
    assert message is not None and message.startswith("MemoryFits: does not fit on 2 GPUs")
    assert "would fit: " in message


def test_an_uneven_explicit_gpu_count_is_refused(job: dict[str, Any]) -> None:
    job["spec"]["resources"] |= {"gpus": 9, "gpusPerNode": 8}  # 2 nodes cannot hold 9 evenly
    message = review(job)
    assert message is not None and "resources.gpus 9 cannot be spread evenly" in message


def test_a_reserved_env_name_is_refused(job: dict[str, Any]) -> None:
    job["spec"]["env"] = [{"name": "MASTER_ADDR", "value": "elsewhere"}]
    message = review(job)
    assert message == "InvalidSpec: spec.env: MASTER_ADDR are set by the operator and cannot be overridden"


def test_updates_are_judged_only_when_the_spec_changes(job: dict[str, Any]) -> None:
    """A job admitted while the webhook was down keeps taking metadata and status writes."""
    stuck = too_large(job)
    relabelled = copy.deepcopy(stuck)
    relabelled["metadata"]["labels"] = {"team": "a"}
    assert review(relabelled, old=stuck) is None
    assert review(stuck, old=job) is not None  # a spec change into a misfit is refused
    assert review(job, old=stuck) is None  # and the fix is admitted


def test_a_gpu_the_clusters_placement_preset_cannot_name_is_refused(job: dict[str, Any]) -> None:
    job["spec"]["resources"] = {"gpuType": "RTX-4090", "gpusPerNode": 1}
    assert review(job) is None  # NVIDIA GPU feature discovery labels it
    message = review(job, placement_preset="eks")
    assert message is not None and "has no node.kubernetes.io/instance-type value" in message


def test_an_attention_kernel_the_trainer_image_lacks_is_refused(job: dict[str, Any]) -> None:
    """The image built here has no flash-attn: its workers would all fail at load."""
    job["spec"]["model"]["attentionImplementation"] = "flash_attention_2"
    assert review(job) == (
        "InvalidSpec: spec.model.attentionImplementation: the trainer image "
        "ghcr.io/finetune-operator/trainer:0.1.0 has no flash_attention_2 (it has sdpa and eager); use "
        "sdpa, the default, or spec.image with an image that has it"
    )
    # an operator whose trainer image has it (FINETUNE_TRAINER_ATTENTION_IMPLEMENTATIONS), or the job's
    # own image, which its trainer checks at start
    with_flash = from_env({"FINETUNE_TRAINER_ATTENTION_IMPLEMENTATIONS": "sdpa,eager,flash_attention_2"})
    assert review_with(job, None, with_flash.render_options()) is None
    job["spec"]["image"] = "registry.example/trainer-flash:1"
    assert review(job) is None
    job["spec"]["model"]["attentionImplementation"] = "eager"
    del job["spec"]["image"]
    assert review(job) is None


def test_the_trainer_images_attention_kernels_must_be_known_ones() -> None:
    with pytest.raises(ValueError, match="must be some of eager, flash_attention_2, sdpa, got flash"):
        from_env({"FINETUNE_TRAINER_ATTENTION_IMPLEMENTATIONS": "flash"})


def test_a_layout_no_gpu_node_has_the_memory_for_is_never_planned(job: dict[str, Any]) -> None:
    """Full Llama-2-7B on one A100: only optimizer offload fits one GPU, and its worker asks its node for
    ~122 GiB. On 64 GiB nodes (FINETUNE_PLACEMENT_NODE_MEMORY) that pod could never be scheduled."""
    job["spec"]["method"] = {"type": "full"}
    job["spec"]["distributed"] = {"offload": "auto"}
    job["spec"]["resources"] = {"gpuType": "A100-80GB", "gpusPerNode": 8, "gpus": 1}
    assert review(job) is None  # unchecked: offload on one GPU
    small = from_env({"FINETUNE_PLACEMENT_NODE_MEMORY": "64Gi"}).render_options()
    assert small.node_memory_bytes == 64 * 1024**3
    refusal = review_with(job, None, small)
    assert refusal is not None and refusal.startswith("MemoryFits: does not fit on 1 GPU")
    assert "a worker needs at least" in refusal and "more than the 64.0 GiB a GPU node has" in refusal
    job["spec"]["resources"]["gpus"] = "auto"  # more GPUs, no offload: fits the nodes
    assert review_with(job, None, small) is None


def test_the_gpu_nodes_memory_must_be_a_quantity() -> None:
    with pytest.raises(ValueError, match="placement node_memory: not a quantity: 'lots'"):
        from_env({"FINETUNE_PLACEMENT_NODE_MEMORY": "lots"})
