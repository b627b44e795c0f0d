"""Freeze tuning: only the last N transformer blocks train (and a new classification head, if any).

Blocks are found as the model's ModuleList with `num_hidden_layers` entries, which covers Llama-style
decoders (`model.layers`), BERT (`bert.encoder.layer`) and GPT-2 (`transformer.h`) without a per-family
table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from finetune_operator.api.methods import MethodTraits
from finetune_operator.api.trainer import TrainerConfig
from finetune_trainer.exit_codes import ConfigurationError

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

#: Heads a sequence classifier adds, randomly initialised: they must train or the model learns nothing.
CLASSIFIER_HEADS = ("classifier", "score")


def transformer_blocks(model: PreTrainedModel) -> torch.nn.ModuleList:
    layers = int(model.config.num_hidden_layers)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == layers:
            return module
    raise ConfigurationError(
        f"freeze: found no list of {layers} transformer blocks in {type(model).__name__}"
    )


@dataclass(frozen=True)
class FreezeMethod:
    traits: MethodTraits

    def check(self, config: TrainerConfig) -> None:
        """Freezing works under every ZeRO stage: requires_grad is set before DeepSpeed wraps the model."""

    def quantization(self, config: TrainerConfig) -> BitsAndBytesConfig | None:
        return None

    def apply(self, model: PreTrainedModel, config: TrainerConfig) -> torch.nn.Module:
        settings = config.method.freeze_settings()
        blocks = transformer_blocks(model)
        if settings.trainable_layers > len(blocks):
            raise ConfigurationError(
                f"method.freeze.trainableLayers {settings.trainable_layers} exceeds the model's {len(blocks)} layers"
            )
        model.requires_grad_(False)
        for block in blocks[len(blocks) - settings.trainable_layers :]:
            block.requires_grad_(True)
        if settings.train_embeddings:
            model.get_input_embeddings().requires_grad_(True)
        for name in CLASSIFIER_HEADS:
            head = getattr(model, name, None)
            if isinstance(head, torch.nn.Module):
                head.requires_grad_(True)
        return model
