"""What the estimator is asked about: one training configuration on one GPU of a (possibly sharded) job.

Kept apart from `estimate` so the method models in `finetune_operator.methods` can read it without an
import cycle; `core.estimate` re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def sixteen_bit(self) -> bool:
        return self.precision in (Precision.BF16, Precision.FP16)


def validate(setup: TrainingSetup) -> None:
    """Reject impossible combinations with a one-line reason; method-specific rules live with the method."""
    checks: list[tuple[bool, str]] = [
        (setup.zero_stage in (0, 1, 2, 3), f"zero_stage must be 0..3, got {setup.zero_stage}"),
        (setup.micro_batch_size >= 1, f"micro_batch_size must be at least 1, got {setup.micro_batch_size}"),
        (setup.seq_len >= 1, f"seq_len must be at least 1, got {setup.seq_len}"),
        (setup.world_size >= 1, f"world_size must be at least 1, got {setup.world_size}"),
        (
            setup.gradient_accumulation_steps >= 1,
            f"gradient_accumulation_steps must be at least 1, got {setup.gradient_accumulation_steps}",
        ),
        (
            setup.offload == Offload.NONE or setup.zero_stage >= 1,
            f"offload {setup.offload.value!r} needs ZeRO stage 1 or more",
        ),
        (setup.offload != Offload.ALL or setup.zero_stage == 3, "offloading parameters needs ZeRO stage 3"),
    ]
    for ok, reason in checks:
        if not ok:
            raise ValueError(reason)
