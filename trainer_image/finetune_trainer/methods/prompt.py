"""Prompt tuning through PEFT: learned virtual-token embeddings prepended to the input."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from peft import PromptTuningConfig, PromptTuningInit, get_peft_model
from transformers import PreTrainedModel

from finetune_trainer.config import TrainerConfig
from finetune_trainer.exit_codes import ConfigurationError
from finetune_trainer.methods.lora import task_type

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig


def refuse_zero3(config: TrainerConfig, method: str) -> None:
    """Virtual-token methods (prompt, prefix) are refused under ZeRO-3.

    Observed with DeepSpeed 0.19.8 + PEFT 0.21.2 (tests/trainer): prompt tuning under ZeRO-3 hangs after
    a few steps, one rank in the next forward's parameter-coordinator broadcast while the other is still
    in the gradient reduce-scatter for the virtual-token embedding (the ranks' collectives diverge).
    Prefix tuning keeps its trainable table the same way and is refused with it. Their trainable state
    is kilobytes, so ZeRO-3 buys nothing: the planner should pick ZeRO ≤ 2 for them.
    """
    if config.zero_stage == 3:
        raise ConfigurationError(
            f"method {method} does not run under ZeRO-3 (DeepSpeed hangs partitioning the virtual-token "
            f"table); use distributed.zeroStage 0, 1 or 2"
        )


class PromptMethod:
    def check(self, config: TrainerConfig) -> None:
        refuse_zero3(config, "prompt")

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

    def is_peft(self) -> bool:
        return True
