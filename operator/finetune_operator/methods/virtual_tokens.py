"""Prompt tuning and prefix tuning: the base model is frozen and learned virtual tokens steer it.

Prompt tuning learns `n·hidden` input embeddings and lengthens every sequence by n. Prefix tuning learns
a key and a value per layer per virtual token (`2·layers·kv_dim·n`, PEFT without the reparametrising MLP)
that every layer's attention attends to, so only attention sees a longer sequence.
"""

from __future__ import annotations

from finetune_operator.api.enums import Method
from finetune_operator.core.setup import TrainingSetup
from finetune_operator.methods.base import MethodFootprint, weight_bytes_per_param


class VirtualTokens:
    def __init__(self, method: Method) -> None:
        self.method = method

    def validate(self, setup: TrainingSetup) -> None:
        if setup.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be at least 1, got {setup.num_virtual_tokens}")

    def footprint(self, setup: TrainingSetup) -> MethodFootprint:
        arch, n = setup.arch, setup.num_virtual_tokens
        if self.method == Method.PREFIX:
            trainable = 2 * arch.num_layers * arch.kv_dim * n
            extra_seq, extra_kv = 0, n
        else:
            trainable = n * arch.hidden_size
            extra_seq, extra_kv = n, 0
        return MethodFootprint(
            trainable_params=trainable,
            frozen_weight_bytes=arch.total_params() * weight_bytes_per_param(setup.precision),
            extra_seq_tokens=extra_seq,
            extra_kv_tokens=extra_kv,
            trainable_largest_layer=trainable,
        )
