"""Freeze tuning: only the last N blocks train, which is full tuning of a suffix."""

from __future__ import annotations

from dataclasses import dataclass

from finetune_operator.api.methods import MethodTraits
from finetune_operator.core.methods.base import MethodFootprint, TrainingSetup, weight_bytes_per_param


@dataclass(frozen=True)
class FreezeMethod:
    """The last `trainable_layers` blocks (and the final norm) train; the LM head and embeddings stay frozen,
    as LLaMA-Factory's freeze tuning does. Activations are kept only from the first trainable block on,
    because nothing below it needs a gradient."""

    traits: MethodTraits

    def validate(self, setup: TrainingSetup) -> None:
        if not 1 <= setup.trainable_layers <= setup.arch.num_layers:
            raise ValueError(
                f"trainable_layers must be 1..{setup.arch.num_layers} (the model's layers), "
                f"got {setup.trainable_layers}"
            )

    def footprint(self, setup: TrainingSetup) -> MethodFootprint:
        arch = setup.arch
        trainable = setup.trainable_layers * arch.layer_params()
        largest_linear = max(i * o for i, o in arch.linear_shapes().values())
        return MethodFootprint(
            trainable_params=trainable,
            frozen_weight_bytes=(arch.total_params() - trainable) * weight_bytes_per_param(setup.precision),
            first_grad_layer=arch.num_layers - setup.trainable_layers,
            trained_modules=frozenset(arch.linear_shapes()),
            norms_trained=True,
            trainable_largest_layer=largest_linear,
        )
