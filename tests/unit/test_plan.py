"""The planner picks the fewest GPUs that fit, then the fastest configuration, and explains misses."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_operator.api.enums import Method, Offload
from finetune_operator.api.methods import METHODS
from finetune_operator.api.models import FineTuneJobSpec, parse_job
from finetune_operator.core.estimate import estimate
from finetune_operator.core.plan import GIB, PlanningError, full_nodes, layout, plan, setup_for
from finetune_operator.core.plan import architecture_for as arch_of


def spec(**overrides: Any) -> FineTuneJobSpec:
    """The README example with dotted-path overrides, e.g. spec(**{"method.type": "full"})."""
    document: dict[str, Any] = {
        "model": {"name": "meta-llama/Llama-2-7b-hf"},
        "dataset": {"uri": "pvc://datasets/alpaca.jsonl", "format": "alpaca", "maxSeqLength": 512},
        "method": {"type": "lora", "lora": {"r": 16, "alpha": 32, "targetModules": ["q_proj", "v_proj"]}},
        "training": {"microBatchSize": 4, "precision": "bf16", "gradientCheckpointing": True},
        "resources": {"gpuType": "A100-80GB", "gpusPerNode": 8, "gpus": "auto"},
        "distributed": {"zeroStage": "auto", "offload": "none"},
        "output": {"uri": "pvc://models/out"},
    }
    for dotted, value in overrides.items():
        node = document
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return parse_job({"spec": document}).spec


def test_lora_7b_fits_one_a100_without_zero() -> None:
    result = plan(spec())
    assert result.fits
    assert (result.gpus, result.nodes, result.gpus_per_node, result.zero_stage, result.offload) == (
        1,
        1,
        1,
        0,
        Offload.NONE,
    )
    assert result.per_gpu_bytes <= result.usable_bytes
    assert result.usable_bytes == int(80 * GIB * 0.92) or result.usable_bytes < 80 * GIB


def test_full_70b_needs_zero3_across_nodes() -> None:
    result = plan(spec(**{"model.name": "meta-llama/Meta-Llama-3-70B", "method": {"type": "full"}}))
    assert result.fits
    assert result.zero_stage == 3
    assert result.gpus > 8 and result.nodes == -(-result.gpus // 8)
    # Whole nodes: a gang over several nodes takes all their GPUs (no 3 x 7 on 8-GPU nodes).
    assert result.gpus_per_node == 8 and result.gpus == result.nodes * 8
    # Minimality in nodes: the largest even layout on one node fewer does not fit under any configuration.
    smaller = [n for n in range(1, (result.nodes - 1) * 8 + 1) if layout(n, 8) is not None][-1]
    explicit = plan(
        spec(
            **{
                "model.name": "meta-llama/Meta-Llama-3-70B",
                "method": {"type": "full"},
                "resources.gpus": smaller,
            }
        )
    )
    assert not explicit.fits
    smallest = int(explicit.message.split("the smallest count that fits is ")[1].split(";")[0].split(":")[0])
    assert full_nodes(smallest, 8) == result.gpus  # the fewest GPUs that fit fill exactly these nodes


def test_ties_go_to_the_lower_stage_and_no_offload() -> None:
    result = plan(spec(**{"distributed.offload": "auto"}))
    assert (result.zero_stage, result.offload) == (0, Offload.NONE)


def test_fixed_stage_is_respected() -> None:
    result = plan(spec(**{"distributed.zeroStage": 2}))
    assert result.fits and result.zero_stage == 2


def test_offload_lets_full_tuning_use_fewer_gpus() -> None:
    base = spec(**{"model.name": "meta-llama/Llama-2-13b-hf", "method": {"type": "full"}})
    with_offload = spec(
        **{
            "model.name": "meta-llama/Llama-2-13b-hf",
            "method": {"type": "full"},
            "distributed.offload": "auto",
        }
    )
    assert plan(with_offload).gpus <= plan(base).gpus


def test_explicit_gpus_that_fit_pick_the_fastest_stage() -> None:
    result = plan(spec(**{"resources.gpus": 4, "resources.gpusPerNode": 2}))
    assert result.fits and (result.gpus, result.nodes, result.gpus_per_node) == (4, 2, 2)
    assert result.zero_stage == 0


def test_uneven_explicit_gpus_are_refused() -> None:
    with pytest.raises(PlanningError, match="cannot be spread evenly"):
        plan(spec(**{"resources.gpus": 9}))


def test_infeasible_job_says_what_would_fit() -> None:
    job = spec(
        **{
            "model.name": "meta-llama/Llama-2-7b-hf",
            "method": {"type": "full"},
            "resources.gpuType": "T4",
            "training.precision": "fp16",  # a T4 has no bf16
            "resources.gpusPerNode": 1,
            "training.gradientCheckpointing": False,
            "distributed.zeroStage": 0,
        }
    )
    result = plan(job, max_gpus=8)
    assert not result.fits
    assert "does not fit on any GPU count" in result.message
    assert result.suggestions, result.message
    assert all(" on " in s for s in result.suggestions)
    assert any("ZeRO-3 with" in s for s in result.suggestions), result.suggestions
    assert result.suggestions[-1].endswith("QLoRA on 1 GPU"), result.suggestions
    assert "would fit: " in result.message


def test_suggestion_names_qlora_when_only_qlora_fits() -> None:
    job = spec(
        **{
            "model.name": "meta-llama/Llama-2-7b-hf",
            "method": {"type": "lora"},
            "resources.gpuMemoryGiB": 12,
            "resources.gpusPerNode": 1,
            "resources.gpus": "auto",
            "training.microBatchSize": 1,
            "distributed.zeroStage": 0,
        }
    )
    result = plan(job, max_gpus=1)
    assert not result.fits
    assert result.suggestions == ("ZeRO-3 with all offload on 1 GPU", "QLoRA on 1 GPU"), result.message


def test_gpu_memory_overrides_the_product() -> None:
    small = plan(spec(**{"resources.gpuMemoryGiB": 16}))
    large = plan(spec())
    assert small.usable_bytes == int(16 * GIB * 0.92)
    assert small.gpus >= large.gpus


def test_unknown_model_and_gpu_are_planning_errors() -> None:
    with pytest.raises(PlanningError, match=r"model\.architecture"):
        plan(spec(**{"model.name": "acme/unknown-model"}))
    with pytest.raises(PlanningError):
        plan(spec(**{"resources.gpuType": "Z9000"}))


def test_inline_architecture_wins() -> None:
    inline = {
        "vocabSize": 32000,
        "hiddenSize": 4096,
        "intermediateSize": 11008,
        "numLayers": 32,
        "numHeads": 32,
    }
    job = spec(**{"model.name": "acme/private-7b", "model.architecture": inline})
    assert plan(job).estimate.total_params == plan(spec()).estimate.total_params


def test_plan_matches_a_direct_estimate() -> None:
    job = spec()
    result = plan(job)
    direct = estimate(setup_for(job, arch_of(job.model)))
    assert result.per_gpu_bytes == direct.per_gpu_bytes
    status = result.to_status()
    assert status.gpus == 1 and status.breakdown == dict(direct.breakdown)
    assert sum(status.breakdown.values()) == status.per_gpu_bytes


@pytest.mark.parametrize(
    ("gpus", "per_node", "expected"),
    [(1, 8, (1, 1)), (8, 8, (1, 8)), (10, 8, (2, 5)), (9, 8, None), (16, 8, (2, 8)), (24, 8, (3, 8))],
)
def test_layout_spreads_evenly(gpus: int, per_node: int, expected: tuple[int, int] | None) -> None:
    assert layout(gpus, per_node) == expected


def test_every_method_plans() -> None:
    for method in Method:
        checkpointing = METHODS[method].gradient_checkpointing
        result = plan(
            spec(**{"method": {"type": method.value}, "training.gradientCheckpointing": checkpointing})
        )
        assert result.fits, (method, result.message)


def test_explicit_count_that_misses_suggests_variants_on_that_count() -> None:
    job = spec(
        **{
            "method": {"type": "full"},
            "resources.gpuType": "L4",
            "resources.gpusPerNode": 1,
            "resources.gpus": 2,
            "training.gradientCheckpointing": False,
        }
    )
    result = plan(job)
    assert not result.fits and result.gpus == 2
    assert "the smallest count that fits is" in result.message
    assert result.suggestions and all(s.endswith("on 2 GPUs") for s in result.suggestions)
    for suggestion in result.suggestions:
        assert "QLoRA" in suggestion or "offload" in suggestion


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_virtual_token_methods_never_plan_zero3(method: str) -> None:
    """The trainer refuses them under ZeRO-3, so a frozen 13B base that needs sharding does not fit."""
    checkpointing = {"training.gradientCheckpointing": METHODS[Method(method)].gradient_checkpointing}
    small = plan(spec(**{"method": {"type": method}}, **checkpointing))
    assert small.fits and small.zero_stage == 0
    job = spec(
        **{"model.name": "meta-llama/Llama-2-13b-hf", "method": {"type": method}, "resources.gpuType": "L4"},
        **checkpointing,
    )
    result = plan(job)
    assert not result.fits and result.zero_stage <= 2
    assert "ZeRO-3 is not available" in result.message
    full = plan(
        spec(
            **{
                "model.name": "meta-llama/Llama-2-13b-hf",
                "method": {"type": "lora"},
                "resources.gpuType": "L4",
            }
        )
    )
    assert full.fits and full.zero_stage == 3  # the same model shards fine for LoRA


@pytest.mark.parametrize("method", list(Method))
def test_gradient_checkpointing_is_suggested_only_where_the_method_table_allows_it(method: Method) -> None:
    """Activations are what does not fit here (a 7B base, 16 × 4096 tokens on one L40S), so recomputing would
    help every method; prefix tuning cannot recompute (the trainer crashes), so it is never suggested."""
    job = spec(
        **{
            "method": {"type": method.value},
            "resources.gpuType": "L40S",
            "resources.gpusPerNode": 1,
            "resources.gpus": 1,
            "training.gradientCheckpointing": False,
            "training.microBatchSize": 16,
            "dataset.maxSeqLength": 4096,
        }
    )
    result = plan(job)
    assert not result.fits and result.suggestions
    suggested = any("gradient checkpointing" in s for s in result.suggestions)
    assert suggested is METHODS[method].gradient_checkpointing, result.suggestions


def test_offload_is_only_planned_for_adamw() -> None:
    """DeepSpeed's CPU Adam steps offloaded states; 8-bit optimizers have no host implementation."""
    full_13b = {
        "model.name": "meta-llama/Llama-2-13b-hf",
        "method": {"type": "full"},
        "distributed.offload": "auto",
    }
    assert (
        plan(spec(**full_13b, **{"resources.gpus": 1, "resources.gpuType": "H200"})).offload != Offload.NONE
    )
    eight_bit = plan(
        spec(
            **full_13b,
            **{"resources.gpus": 1, "resources.gpuType": "H200", "training.optimizer": "adamw_8bit"},
        )
    )
    assert eight_bit.offload == Offload.NONE


@pytest.mark.parametrize(("gpus", "whole"), [(1, 1), (3, 3), (8, 8), (9, 16), (21, 24), (24, 24), (25, 32)])
def test_a_gang_over_several_nodes_takes_whole_nodes(gpus: int, whole: int) -> None:
    assert full_nodes(gpus, 8) == whole


def test_suggestions_are_not_repeated() -> None:
    """Two variants can read alike once ZeRO-0 is left out of the label (seen in make demo)."""
    job = spec(
        **{
            "resources.gpuType": "L4",
            "resources.gpusPerNode": 1,
            "resources.gpus": 1,
            "training.microBatchSize": 64,
            "training.gradientCheckpointing": False,
        }
    )
    result = plan(job)
    assert not result.fits and len(result.suggestions) >= 2
    assert len(set(result.suggestions)) == len(result.suggestions)


@pytest.mark.parametrize(
    ("changes", "refused"),
    [
        ({}, "training.precision bf16: T4 GPUs have no bfloat16"),
        ({"method": {"type": "qlora"}, "training.precision": "fp16"}, "method.qlora.computeDtype bf16"),
        ({"training.precision": "fp16"}, None),
        ({"resources.gpuType": "A100-80GB"}, None),
    ],
)
def test_bf16_is_refused_on_gpus_without_it(changes: dict[str, Any], refused: str | None) -> None:
    job = spec(**{"resources.gpuType": "T4", "resources.gpusPerNode": 1, **changes})
    if refused is None:
        plan(job)
    else:
        with pytest.raises(PlanningError, match=refused):
            plan(job)


def test_the_plan_counts_liger_and_pure_bf16_as_the_trainer_runs_them() -> None:
    job = spec(**{"model.name": "meta-llama/Llama-3.1-8B", "dataset.maxSeqLength": 4096})
    arch = arch_of(job.model)
    setup = setup_for(job, arch)
    assert setup.fused_cross_entropy and setup.master_weights
    off = spec(
        **{
            "model.name": "meta-llama/Llama-3.1-8B",
            "dataset.maxSeqLength": 4096,
            "training.useLigerKernel": False,
        }
    )
    assert not setup_for(off, arch).fused_cross_entropy
    assert plan(off, arch, 64).per_gpu_bytes > plan(job, arch, 64).per_gpu_bytes
    classifier = spec(**{"dataset.format": "classification", "dataset.numLabels": 2})
    assert not setup_for(classifier, arch_of(classifier.model)).fused_cross_entropy
    pure = spec(**{"training.pureBf16": True})
    assert not setup_for(pure, arch_of(pure.model)).master_weights


def test_pure_bf16_never_plans_offload() -> None:
    # full Llama-2-7B on one A100-80GB: 135 GB of mixed-precision states only fit with their optimizer on
    # the host; pure bf16's 54 GB fit on the GPU
    overrides = {"method": {"type": "full"}, "distributed.offload": "auto", "resources.gpus": 1}
    pure = spec(**overrides, **{"training.pureBf16": True})
    assert plan(pure, arch_of(pure.model), 64).offload == Offload.NONE
    mixed = spec(**overrides)
    assert plan(mixed, arch_of(mixed.model), 64).offload != Offload.NONE


def test_the_planner_keeps_workers_within_the_nodes_memory() -> None:
    """Offload trades GPUs for host memory; where nodes lack that memory, more GPUs without it win."""
    job = spec(**{"method": {"type": "full"}, "distributed.offload": "auto", "training.microBatchSize": 1})
    arch = arch_of(job.model)
    unchecked = plan(job, arch, 64)
    assert unchecked.offload != Offload.NONE
    need = unchecked.requests.memory_bytes
    roomy = plan(job, arch, 64, node_memory=need)
    assert (roomy.gpus, roomy.offload) == (unchecked.gpus, unchecked.offload)  # exactly enough is enough
    tight = plan(job, arch, 64, node_memory=need - 1)
    assert tight.fits and tight.requests.memory_bytes < need
    assert tight.gpus > unchecked.gpus or tight.offload != unchecked.offload
