"""Full fine-tuning: every parameter trains."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from finetune_operator.api.methods import MethodTraits
from finetune_operator.api.trainer import TrainerConfig

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig


@dataclass(frozen=True)
class FullMethod:
    traits: MethodTraits

    def check(self, config: TrainerConfig) -> None:
        """Full tuning runs under every ZeRO stage."""

    def quantization(self, config: TrainerConfig) -> BitsAndBytesConfig | None:
        return None

    def apply(self, model: PreTrainedModel, config: TrainerConfig) -> torch.nn.Module:
        model.requires_grad_(True)
        return model
