"""The one protocol every fine-tuning method implements, in the order the recipe calls it.

1. `check` refuses combinations the method cannot train (before any weight is loaded),
2. `quantization` says how to load the base (only QLoRA quantises),
3. `apply` turns the loaded base into the model to train (freezing, PEFT wrapping).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from transformers import PreTrainedModel

from finetune_operator.api.trainer import TrainerConfig

if TYPE_CHECKING:
    import torch
    from transformers import BitsAndBytesConfig


class MethodBuilder(Protocol):
    def check(self, config: TrainerConfig) -> None:
        """Raise ConfigurationError for a combination this method cannot train."""
        ...

    def quantization(self, config: TrainerConfig) -> BitsAndBytesConfig | None:
        """How to quantise the base model on load, or None to load it in the training precision."""
        ...

    def apply(self, model: PreTrainedModel, config: TrainerConfig) -> torch.nn.Module:
        """The model to train, with exactly the trainable parameters the method defines."""
        ...
