"""The contract every method family meets: from a setup, what trains and what the frozen part costs.

The estimator stays method-agnostic: it turns a `MethodFootprint` into bytes. Adding a method means one
module here and one registry line, never an edit to the estimator.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from finetune_operator.api.enums import Precision
from finetune_operator.core.setup import TrainingSetup


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


class MethodModel(Protocol):
    """One method family's memory model; `validate` raises ValueError with a one-line reason."""

    def validate(self, setup: TrainingSetup) -> None: ...

    def footprint(self, setup: TrainingSetup) -> MethodFootprint: ...


def weight_bytes_per_param(precision: Precision) -> int:
    """Storage of a 16-bit or fp32 parameter; the model is loaded in the training precision."""
    return 4 if precision == Precision.FP32 else 2
