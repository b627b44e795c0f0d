"""LoRA and its variants: QLoRA (the same adapters on a 4-bit base) and DoRA (plus a magnitude vector).

Variants are options of one model, as in PEFT, not separate code paths.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune_operator.api.methods import MethodTraits
from finetune_operator.core.architecture import ModelArchitecture
from finetune_operator.core.methods.base import MethodFootprint, TrainingSetup, weight_bytes_per_param

#: HF module names (Llama, Mistral, Qwen2, Gemma 2; Phi-3's fused ones; BERT's) → canonical modules.
#: BERT's `dense` names three layers (attention output, intermediate, output), as PEFT matches it.
TARGET_ALIASES: dict[str, tuple[str, ...]] = {
    "q_proj": ("q_proj",),
    "k_proj": ("k_proj",),
    "v_proj": ("v_proj",),
    "o_proj": ("o_proj",),
    "gate_proj": ("gate_proj",),
    "up_proj": ("up_proj",),
    "down_proj": ("down_proj",),
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "query": ("q_proj",),
    "key": ("k_proj",),
    "value": ("v_proj",),
    "dense": ("o_proj", "up_proj", "down_proj"),
}

#: Bits per quantized weight. NF4/FP4 with block 64 store one fp32 absmax per block: 4 + 32/64 = 4.5.
#: Double quantization stores those absmax as 8-bit with one fp32 constant per 256 of them:
#: 4 + 8/64 + 32/(64·256) ≈ 4.127 (Dettmers et al. 2023).
BITS_PER_QUANT_WEIGHT = 4 + 32 / 64
BITS_PER_QUANT_WEIGHT_DOUBLE = 4 + 8 / 64 + 32 / (64 * 256)


def adapted_modules(arch: ModelArchitecture, targets: tuple[str, ...]) -> tuple[str, ...]:
    """Canonical modules the targets name; `all-linear` is every block linear (not the LM head, as PEFT)."""
    shapes = arch.linear_shapes()
    if any(t.lower() == "all-linear" for t in targets):
        return tuple(shapes)
    chosen: list[str] = []
    for target in targets:
        canon = TARGET_ALIASES.get(target.split(".")[-1])
        if canon is None:
            known = ", ".join(sorted(TARGET_ALIASES))
            raise ValueError(f"unknown LoRA target module {target!r}; known: all-linear, {known}")
        chosen += [m for m in canon if m in shapes and m not in chosen]
    if not chosen:
        raise ValueError(f"LoRA targets {targets!r} match no linear layer of this model")
    return tuple(chosen)


@dataclass(frozen=True)
class LoraMethod:
    """Trainable: A (r×in) and B (out×r) per adapted module per block, plus DoRA's magnitude (out).
    Frozen: the whole base model, in 16-bit, or for QLoRA (`traits.quantized`) every block linear in
    4-bit while embeddings, LM head and norms stay in the compute dtype."""

    traits: MethodTraits

    def validate(self, setup: TrainingSetup) -> None:
        if setup.lora_r < 1:
            raise ValueError(f"lora_r must be at least 1, got {setup.lora_r}")
        if not setup.lora_target_modules:
            raise ValueError("lora_target_modules must name at least one module")
        adapted_modules(setup.arch, setup.lora_target_modules)

    def footprint(self, setup: TrainingSetup) -> MethodFootprint:
        arch = setup.arch
        shapes = arch.linear_shapes()
        modules = adapted_modules(arch, setup.lora_target_modules)
        r = setup.lora_r
        per_block = sum(r * (shapes[m][0] + shapes[m][1]) for m in modules)
        if self.traits.dora:
            per_block += sum(shapes[m][1] for m in modules)
        trainable = per_block * arch.num_layers
        wbytes = weight_bytes_per_param(setup.precision)
        base = arch.total_params()
        unquantized = 0
        if self.traits.quantized:
            linear = sum(i * o for i, o in shapes.values()) * arch.num_layers
            bits = BITS_PER_QUANT_WEIGHT_DOUBLE if setup.double_quant else BITS_PER_QUANT_WEIGHT
            unquantized = base - linear
            frozen = int(linear * bits / 8) + unquantized * wbytes
            dequant = max(i * o for i, o in shapes.values())
        else:
            frozen = base * wbytes
            dequant = 0
        return MethodFootprint(
            trainable_params=trainable,
            frozen_weight_bytes=frozen,
            adapters=dict.fromkeys(modules, r),
            dora=self.traits.dora,
            dequant_elems=dequant,
            trainable_largest_layer=max(r * (shapes[m][0] + shapes[m][1]) for m in modules),
            adapter_dropout=setup.lora_dropout > 0,
            unquantized_params=unquantized,
        )
