"""Method families behind one protocol (`MethodModel`) and one explicit registry (no import side effects)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from finetune_operator.api.enums import Method
from finetune_operator.methods.base import MethodFootprint, MethodModel
from finetune_operator.methods.full import FreezeTuning, FullTuning
from finetune_operator.methods.lora import LoraFamily
from finetune_operator.methods.virtual_tokens import VirtualTokens

REGISTRY: Mapping[Method, MethodModel] = MappingProxyType(
    {
        Method.FULL: FullTuning(),
        Method.FREEZE: FreezeTuning(),
        Method.LORA: LoraFamily(Method.LORA),
        Method.QLORA: LoraFamily(Method.QLORA),
        Method.DORA: LoraFamily(Method.DORA),
        Method.PREFIX: VirtualTokens(Method.PREFIX),
        Method.PROMPT: VirtualTokens(Method.PROMPT),
    }
)


def method_model(method: Method) -> MethodModel:
    return REGISTRY[method]


__all__ = ["REGISTRY", "MethodFootprint", "MethodModel", "method_model"]
