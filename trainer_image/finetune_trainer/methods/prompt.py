"""Prompt tuning through PEFT: learned virtual-token embeddings prepended to the input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from peft import PromptTuningConfig, PromptTuningInit, get_peft_model
from transformers import PreTrainedModel

from finetune_operator.api.methods import MethodTraits
from finetune_operator.api.trainer import TrainerConfig
from finetune_trainer.methods.lora import task_type

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig


@dataclass(frozen=True)
class PromptMethod:
    traits: MethodTraits

    def check(self, config: TrainerConfig) -> None:
        return None

    def quantization(self, config: TrainerConfig) -> BitsAndBytesConfig | None:
        return None

    def apply(self, model: PreTrainedModel, config: TrainerConfig) -> torch.nn.Module:
        peft_config = PromptTuningConfig(
            task_type=task_type(config),
            num_virtual_tokens=config.method.virtual_tokens(),
            prompt_tuning_init=PromptTuningInit.RANDOM,
        )
        peft_model: torch.nn.Module = get_peft_model(model, peft_config)
        return peft_model
