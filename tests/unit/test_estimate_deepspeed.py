"""The estimator's model states agree with DeepSpeed's own estimators, called from the installed package.

What DeepSpeed counts (deepspeed/runtime/zero/stage_1_and_2.py and stage3.py), for Adam with 16-bit mixed
precision and full fine-tuning, no activations, no buffers:
- ZeRO-2, GPU: `2·P` (16-bit params, replicated) + `18·P/N` (16-bit grads 2, fp32 grads 4, fp32 master 4,
  Adam m and v 8, all partitioned); with CPU offload only `2·P` stays.
- ZeRO-3, GPU: `4·L` (the largest module gathered in 16-bit with its 16-bit gradient) + `18·P/N`; with
  optimizer offload `4·L + 2·P/N`; with parameter offload too, `4·L`.
- ZeRO-3, CPU with `zero_init`: per node `16·P/nodes` (optimizer offload) or `18·P/nodes` (also params),
  times `additional_buffer_factor`.

Our `model_states` (weights + gradients + optimizer, before activations and overhead) counts the same
things, so the GPU side must agree to within integer rounding (0.01%), with one explained exception:
DeepSpeed's ZeRO-3 figure without offload, `4·L + 18·P/N`, leaves out the 16-bit parameter partition
(`2·P/N`) that its own optimizer-offload figure (`4·L + 2·P/N`) does count; the partition is real, so we
count it and the test adds it to DeepSpeed's number. Differences by design, not tested:
ZeRO-2's CPU figure (`P·max(4·N, 16)·1.5` per node) counts the fp32 model every process loads at start-up,
which we do not model; our host figure is the steady state per GPU, without the 1.5 buffer factor.
"""

from __future__ import annotations

import pytest

from finetune_operator.api.enums import Method, Offload
from finetune_operator.core.architecture import catalogue_architecture
from finetune_operator.core.estimate import TrainingSetup, estimate

# A guard for machines without the trainer extras; the venv and CI install deepspeed, so these run there.
stage3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
stage_1_and_2 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")

MODELS = ["meta-llama/Llama-2-7b-hf", "meta-llama/Llama-3.1-70B", "Qwen/Qwen2.5-0.5B", "google/gemma-2-9b"]
LAYOUTS = [(1, 1), (8, 1), (4, 2), (8, 4)]  # (GPUs per node, nodes)
TOLERANCE = 1e-4


def model_states(name: str, stage: int, gpus: int, offload: Offload) -> tuple[int, int, int]:
    """(our GPU model states, our host bytes per GPU, total params) for full fine-tuning with Adam."""
    setup = TrainingSetup(
        catalogue_architecture(name), Method.FULL, zero_stage=stage, world_size=gpus, offload=offload
    )
    result = estimate(setup)
    return sum(result.model_states.values()), result.host_bytes, result.total_params


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(("per_node", "nodes"), LAYOUTS)
@pytest.mark.parametrize("cpu_offload", [False, True])
def test_zero2_gpu_model_states_match_deepspeed(
    name: str, per_node: int, nodes: int, cpu_offload: bool
) -> None:
    offload = Offload.OPTIMIZER if cpu_offload else Offload.NONE
    ours, _, params = model_states(name, 2, per_node * nodes, offload)
    _, ds_gpu = stage_1_and_2.estimate_zero2_model_states_mem_needs(
        params, num_gpus_per_node=per_node, num_nodes=nodes, cpu_offload=cpu_offload
    )
    assert ours == pytest.approx(ds_gpu, rel=TOLERANCE)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(("per_node", "nodes"), LAYOUTS)
@pytest.mark.parametrize("offload", list(Offload))
def test_zero3_model_states_match_deepspeed(name: str, per_node: int, nodes: int, offload: Offload) -> None:
    arch = catalogue_architecture(name)
    ours, host, params = model_states(name, 3, per_node * nodes, offload)
    ds_cpu, ds_gpu, _ = stage3.estimate_zero3_model_states_mem_needs(
        params,
        arch.largest_layer_params(),
        num_gpus_per_node=per_node,
        num_nodes=nodes,
        cpu_offload=offload != Offload.NONE,
        cpu_offload_params=offload == Offload.ALL,
        zero_init=True,
        additional_buffer_factor=1.0,
    )
    param_partition = 2 * params // (per_node * nodes) if offload == Offload.NONE else 0
    assert ours == pytest.approx(ds_gpu + param_partition, rel=TOLERANCE)
    if offload != Offload.NONE:
        assert host * per_node == pytest.approx(ds_cpu, rel=TOLERANCE)
