"""Prefix tuning: the base model is frozen; learned keys and values steer every attention layer.

It learns a key and a value per layer per virtual token (`2·layers·kv_dim·n`, PEFT without the
reparametrising MLP) that every layer's attention attends to, so only attention sees a longer sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune_operator.api.methods import MethodTraits
from finetune_operator.core.methods.base import MethodFootprint, TrainingSetup, weight_bytes_per_param


def check_virtual_tokens(setup: TrainingSetup) -> None:
    if setup.num_virtual_tokens < 1:
        raise ValueError(f"num_virtual_tokens must be at least 1, got {setup.num_virtual_tokens}")


@dataclass(frozen=True)
class PrefixMethod:
    traits: MethodTraits

    def validate(self, setup: TrainingSetup) -> None:
        check_virtual_tokens(setup)

    def footprint(self, setup: TrainingSetup) -> MethodFootprint:
        arch, n = setup.arch, setup.num_virtual_tokens
        trainable = 2 * arch.num_layers * arch.kv_dim * n
        return MethodFootprint(
            trainable_params=trainable,
            frozen_weight_bytes=arch.total_params() * weight_bytes_per_param(setup.precision),
            extra_kv_tokens=n,
            trainable_largest_layer=trainable,
        )
