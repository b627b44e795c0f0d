"""Full fine-tuning: every parameter trains."""

from __future__ import annotations

from dataclasses import dataclass

from finetune_operator.api.methods import MethodTraits
from finetune_operator.core.methods.base import MethodFootprint, TrainingSetup


@dataclass(frozen=True)
class FullMethod:
    """Nothing is frozen and every block keeps activations."""

    traits: MethodTraits

    def validate(self, setup: TrainingSetup) -> None:
        return None

    def footprint(self, setup: TrainingSetup) -> MethodFootprint:
        arch = setup.arch
        return MethodFootprint(
            trainable_params=arch.total_params(),
            frozen_weight_bytes=0,
            trained_modules=frozenset(arch.linear_shapes()),
            norms_trained=True,
            head_trained=True,
            trainable_largest_layer=arch.largest_layer_params(),
        )
