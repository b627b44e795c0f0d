"""Fine-tuning methods: one module per family behind `MethodBuilder`, one registry.

The registry is derived from the method table (`finetune_operator.api.methods`): each method gets its
family's builder with the method's traits (QLoRA and DoRA are options of the LoRA builder, as in PEFT).
What the table says a method cannot do (ZeRO-3, gradient checkpointing) is refused in `check`, in one
place, with the same table the API's rules and the planner read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from finetune_operator.api.enums import Method
from finetune_operator.api.methods import METHODS, MethodTraits, build_registry
from finetune_operator.api.trainer import TrainerConfig
from finetune_trainer.exit_codes import ConfigurationError
from finetune_trainer.methods.base import MethodBuilder
from finetune_trainer.methods.freeze import FreezeMethod
from finetune_trainer.methods.full import FullMethod
from finetune_trainer.methods.lora import LoraMethod
from finetune_trainer.methods.prefix import PrefixMethod
from finetune_trainer.methods.prompt import PromptMethod

#: Family (the table's `family`, the module name) → its builder.
FAMILIES: Mapping[str, Callable[[MethodTraits], MethodBuilder]] = MappingProxyType(
    {
        "full": FullMethod,
        "freeze": FreezeMethod,
        "lora": LoraMethod,
        "prefix": PrefixMethod,
        "prompt": PromptMethod,
    }
)

REGISTRY: Mapping[Method, MethodBuilder] = build_registry(FAMILIES)


def method_for(method: Method) -> MethodBuilder:
    return REGISTRY[method]


def check(config: TrainerConfig) -> MethodBuilder:
    """The builder for the config's method, once the table's refusals and the method's own checks pass.

    ZeRO-3: observed with DeepSpeed 0.19.8 + PEFT 0.21.2 (tests/trainer), prompt tuning under ZeRO-3
    hangs after a few steps, one rank in the next forward's parameter-coordinator broadcast while the
    other is still in the gradient reduce-scatter for the virtual-token embedding; prefix tuning keeps
    its trainable table the same way. Their trainable state is kilobytes, so ZeRO-3 buys nothing.
    Gradient checkpointing: the HF Trainer turns it on after PEFT wrapping, which drops prefix tuning's
    `past_key_values`, and the first backward fails on mismatched sequence lengths.
    """
    method = config.method.type
    traits = METHODS[method]
    if config.zero_stage == 3 and not traits.zero3:
        raise ConfigurationError(
            f"method {method.value} does not run under ZeRO-3 (DeepSpeed hangs partitioning the "
            f"virtual-token table); use distributed.zeroStage 0, 1 or 2"
        )
    if config.training.gradient_checkpointing and not traits.gradient_checkpointing:
        raise ConfigurationError(
            f"method {method.value} does not run with training.gradientCheckpointing "
            f"(recomputation drops its virtual keys and values)"
        )
    builder = method_for(method)
    builder.check(config)
    return builder


__all__ = ["FAMILIES", "REGISTRY", "MethodBuilder", "check", "method_for"]
