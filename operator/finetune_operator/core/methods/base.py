"""The contract every method family meets: from a `TrainingSetup`, what trains and what the frozen part costs.

The estimator stays method-agnostic: it turns a `MethodFootprint` into bytes. Adding a method means a
row in the method table (`api/methods.py`), one module here and its line in the registry, never an edit
to the estimator. The files and class names mirror the trainer image's `methods/` folder.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from finetune_operator.api.enums import AttentionImpl, Method, Offload, Optimizer, Precision, QuantType
from finetune_operator.core.architecture import ModelArchitecture


@dataclass(frozen=True)
class TrainingSetup:
    """One training configuration. Cross-field rules live in `validate`, in one place.

    `master_weights` (16-bit precisions only): True keeps an fp32 master copy and fp32 optimizer states
    for trainable parameters (DeepSpeed mixed precision; PEFT's fp32 adapters); False trains entirely in
    16-bit, optimizer states included (torchtune, litgpt "bf16-true", a bf16-loaded model under the HF
    Trainer). `gradient_accumulation_steps` > 1 keeps gradients alive through the next forward.
    `zero_stage` 0 means no ZeRO partitioning (plain data parallel); `world_size` is the data-parallel size.
    `fused_optimizer`: AdamW steps in torch's fused kernel (no step temporary). `lora_dropout` above 0
    gives every adapted module its own dropped-out copy of its input, saved for backward.
    `fused_cross_entropy`: the loss is Liger's fused linear cross-entropy, which never holds the
    vocabulary-wide logits (causal LMs on GPUs, `training.useLigerKernel`), below ZeRO-3 only.
    """

    arch: ModelArchitecture
    method: Method
    precision: Precision = Precision.BF16
    optimizer: Optimizer = Optimizer.ADAMW
    micro_batch_size: int = 1
    seq_len: int = 512
    gradient_checkpointing: bool = False
    attention: AttentionImpl = AttentionImpl.SDPA
    zero_stage: int = 0
    offload: Offload = Offload.NONE
    world_size: int = 1
    lora_r: int = 8
    lora_target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    quant_type: QuantType = QuantType.NF4
    double_quant: bool = True
    trainable_layers: int = 2
    num_virtual_tokens: int = 20
    master_weights: bool = True
    gradient_accumulation_steps: int = 1
    fused_optimizer: bool = True
    lora_dropout: float = 0.0
    fused_cross_entropy: bool = False

    @property
    def liger_loss(self) -> bool:
        """The loss is Liger's fused one: asked for, and below ZeRO-3, where the trainer leaves Liger off
        (its fused loss reads the LM head's weight directly, which ZeRO-3 keeps partitioned)."""
        return self.fused_cross_entropy and self.zero_stage < 3

    @property
    def sixteen_bit(self) -> bool:
        return self.precision in (Precision.BF16, Precision.FP16)


@dataclass(frozen=True)
class MethodFootprint:
    """What a method changes about training, in the terms memory depends on.

    - `trainable_params`: parameters with gradients and optimizer states.
    - `frozen_weight_bytes`: storage of parameters that do not train (16-bit, or 4-bit for QLoRA).
    - `first_grad_layer`: blocks before it need no gradient, so they keep no activations.
    - `trained_modules`: linear modules whose base weight trains in blocks from `first_grad_layer` on.
    - `norms_trained` / `head_trained`: norm weights, and the LM head or tied embeddings, train.
    - `adapters`: LoRA rank per adapted module in every block; `dora` adds DoRA's magnitude scaling.
    - `extra_seq_tokens`: prompt tuning's virtual tokens, prepended to every sequence.
    - `extra_kv_tokens`: prefix tuning's virtual keys and values, seen by every layer's attention.
    - `dequant_elems`: elements of the largest weight dequantized on the fly (QLoRA's working buffer).
    - `adapter_dropout`: each adapter saves its own dropped-out input and mask (LoRA dropout above 0).
    - `unquantized_params`: with a 4-bit base, the parameters left in 16-bit (embeddings, norms, head).
    """

    trainable_params: int
    frozen_weight_bytes: int
    first_grad_layer: int = 0
    trained_modules: frozenset[str] = frozenset()
    norms_trained: bool = False
    head_trained: bool = False
    adapters: Mapping[str, int] = field(default_factory=dict)
    dora: bool = False
    extra_seq_tokens: int = 0
    extra_kv_tokens: int = 0
    dequant_elems: int = 0
    trainable_largest_layer: int = 0
    adapter_dropout: bool = False
    unquantized_params: int = 0


class MethodModel(Protocol):
    """One method family's memory model; `validate` raises ValueError with a one-line reason."""

    def validate(self, setup: TrainingSetup) -> None: ...

    def footprint(self, setup: TrainingSetup) -> MethodFootprint: ...


def weight_bytes_per_param(precision: Precision) -> int:
    """Storage of a 16-bit or fp32 parameter; the model is loaded in the training precision."""
    return 4 if precision == Precision.FP32 else 2
