"""Prefix tuning through PEFT: learned key/value prefixes in every attention layer."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from peft import PrefixTuningConfig, get_peft_model
from transformers import PreTrainedModel

from finetune_trainer.config import TrainerConfig
from finetune_trainer.methods.lora import task_type
from finetune_trainer.methods.prompt import refuse_zero3

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig


class PrefixMethod:
    def check(self, config: TrainerConfig) -> None:
        refuse_zero3(config, "prefix")

    def quantization(self, config: TrainerConfig) -> BitsAndBytesConfig | None:
        return None

    def apply(self, model: PreTrainedModel, config: TrainerConfig) -> torch.nn.Module:
        peft_config = PrefixTuningConfig(
            task_type=task_type(config), num_virtual_tokens=config.method.virtual_tokens()
        )
        peft_model: torch.nn.Module = get_peft_model(model, peft_config)
        return peft_model

    def is_peft(self) -> bool:
        return True
