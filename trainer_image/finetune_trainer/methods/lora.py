"""LoRA and its variants through PEFT: DoRA is LoRA with `use_dora`, QLoRA is LoRA on a 4-bit base.

As in torchtune, QLoRA is not a separate builder: `LoraMethod` with the table's `quantized` adds a bitsandbytes NF4/FP4
load of the frozen base and otherwise builds exactly the LoRA adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig, PreTrainedModel

from finetune_operator.api.methods import MethodTraits
from finetune_operator.api.trainer import TrainerConfig
from finetune_trainer.exit_codes import ConfigurationError
from finetune_trainer.model import torch_dtype


def task_type(config: TrainerConfig) -> TaskType:
    """SEQ_CLS makes PEFT also train (and save) the new classification head; CAUSAL_LM for the rest."""
    return TaskType.SEQ_CLS if config.is_classification else TaskType.CAUSAL_LM


@dataclass(frozen=True)
class LoraMethod:
    """`traits.dora` and `traits.quantized` (from the method table) select DoRA and QLoRA."""

    traits: MethodTraits

    def check(self, config: TrainerConfig) -> None:
        return None

    def quantization(self, config: TrainerConfig) -> BitsAndBytesConfig | None:
        """NF4/FP4 with double quantisation. The packed 4-bit weights are stored in the training precision,
        the dtype of every other tensor of the model: DeepSpeed casts the whole module to it (ZeRO-3
        partitions it as such), and a packed tensor cast to another dtype is garbage ("shape '[64, 32]' is
        invalid for input of size 1024" when bf16 training stored them as fp32). The compute dtype is
        only what the 4-bit matmuls dequantise to, and may differ (HF's QLoRA + DeepSpeed rule)."""
        if not self.traits.quantized:
            return None
        settings = config.method.qlora_settings()
        return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type=settings.quant_type.value,
            bnb_4bit_use_double_quant=settings.double_quant,
            bnb_4bit_compute_dtype=torch_dtype(settings.compute_dtype),
            bnb_4bit_quant_storage=torch_dtype(config.training.precision),
        )

    def apply(self, model: PreTrainedModel, config: TrainerConfig) -> torch.nn.Module:
        lora = config.method.lora_settings()
        if self.traits.quantized and config.zero_stage < 3:
            # Casts norms to fp32 and freezes the base; under ZeRO-3 the weights are partitioned
            # placeholders and DeepSpeed owns the casting, so it is skipped there.
            model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
                model, use_gradient_checkpointing=config.training.gradient_checkpointing
            )
        targets: list[str] | str = lora.target_modules
        if targets == ["all-linear"]:
            targets = "all-linear"
        peft_config = LoraConfig(
            task_type=task_type(config),
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=targets,
            bias=lora.bias,
            use_dora=self.traits.dora,
        )
        try:
            peft_model: torch.nn.Module = get_peft_model(model, peft_config)
        except ValueError as exc:  # PEFT's message names the target modules it could not find
            raise ConfigurationError(f"method.lora: {exc}") from exc
        return peft_model
