"""Prompt tuning: the base model is frozen; learned input embeddings are prepended to every sequence.

It learns `n·hidden` embeddings and lengthens every sequence by n.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune_operator.api.methods import MethodTraits
from finetune_operator.core.methods.base import MethodFootprint, TrainingSetup, weight_bytes_per_param
from finetune_operator.core.methods.prefix import check_virtual_tokens


@dataclass(frozen=True)
class PromptMethod:
    traits: MethodTraits

    def validate(self, setup: TrainingSetup) -> None:
        check_virtual_tokens(setup)

    def footprint(self, setup: TrainingSetup) -> MethodFootprint:
        arch, n = setup.arch, setup.num_virtual_tokens
        trainable = n * arch.hidden_size
        return MethodFootprint(
            trainable_params=trainable,
            frozen_weight_bytes=arch.total_params() * weight_bytes_per_param(setup.precision),
            extra_seq_tokens=n,
            trainable_largest_layer=trainable,
        )
