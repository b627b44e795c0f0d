"""The estimator's method models: one module per family behind `MethodModel`, one registry.

The registry is derived from the method table (`api/methods.py`): each method gets its family's model,
built with the method's traits (QLoRA and DoRA are options of the LoRA model, as in PEFT). The files and
class names mirror the trainer image's `methods/` folder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from finetune_operator.api.enums import Method
from finetune_operator.api.methods import MethodTraits, build_registry
from finetune_operator.core.methods.base import MethodFootprint, MethodModel, TrainingSetup
from finetune_operator.core.methods.freeze import FreezeMethod
from finetune_operator.core.methods.full import FullMethod
from finetune_operator.core.methods.lora import LoraMethod
from finetune_operator.core.methods.prefix import PrefixMethod
from finetune_operator.core.methods.prompt import PromptMethod

#: Family (the table's `family`, the module name) → its model.
FAMILIES: Mapping[str, Callable[[MethodTraits], MethodModel]] = MappingProxyType(
    {
        "full": FullMethod,
        "freeze": FreezeMethod,
        "lora": LoraMethod,
        "prefix": PrefixMethod,
        "prompt": PromptMethod,
    }
)

REGISTRY: Mapping[Method, MethodModel] = build_registry(FAMILIES)


def method_model(method: Method) -> MethodModel:
    return REGISTRY[method]


__all__ = ["FAMILIES", "REGISTRY", "MethodFootprint", "MethodModel", "TrainingSetup", "method_model"]
