"""Fine-tuning methods: one module per family behind `MethodBuilder`, one explicit registry.

The registry is written out here rather than filled by import side effects, so every method the API
names has exactly one entry and `tests/trainer/test_methods.py` can check none is missing.
"""

from __future__ import annotations

from finetune_operator.api.enums import Method
from finetune_trainer.methods.base import MethodBuilder
from finetune_trainer.methods.freeze import FreezeMethod
from finetune_trainer.methods.full import FullMethod
from finetune_trainer.methods.lora import LoraMethod
from finetune_trainer.methods.prefix import PrefixMethod
from finetune_trainer.methods.prompt import PromptMethod

REGISTRY: dict[Method, MethodBuilder] = {
    Method.FULL: FullMethod(),
    Method.FREEZE: FreezeMethod(),
    Method.LORA: LoraMethod(),
    Method.DORA: LoraMethod(dora=True),
    Method.QLORA: LoraMethod(quantize=True),
    Method.PREFIX: PrefixMethod(),
    Method.PROMPT: PromptMethod(),
}


def method_for(method: Method) -> MethodBuilder:
    return REGISTRY[method]


__all__ = ["REGISTRY", "MethodBuilder", "method_for"]
