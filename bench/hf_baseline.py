"""The yardstick for `trainer_methods.py`: a plain HF Trainer run with the same model, data and settings.

What a user gets from the ecosystem's own tools without this project: `AutoModelForCausalLM`, PEFT's
configs with their defaults, right-padded batches (`DataCollatorForLanguageModeling`), HF's default
optimizer (fused AdamW since torch 2.8), no DeepSpeed, one process. The same micro batch, sequence
length, steps, precision and gradient checkpointing as our run, and the same token count: non-padding
tokens seen per second of `train()`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import (
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
    prepare_model_for_kbit_training,
)
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    DataCollatorForLanguageModeling,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from finetune_operator.api.enums import Method
from finetune_operator.api.models import FreezeSpec, LoraSpec, VirtualTokensSpec


class Throughput(TrainerCallback):
    """Tokens/s as our trainer's progress reports it: non-padding tokens seen at the latest log, over the
    time since training began (model loading and Trainer setup excluded on both sides)."""

    def __init__(self) -> None:
        self.start = 0.0
        self.tokens_per_second = 0.0

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.start = time.monotonic()

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        elapsed = time.monotonic() - self.start
        if elapsed > 0 and state.num_input_tokens_seen:
            self.tokens_per_second = int(state.num_input_tokens_seen) / elapsed


def adapted(model: PreTrainedModel, method: Method) -> torch.nn.Module:
    """The method as PEFT (or a plain `requires_grad` freeze) applies it, with the API's defaults."""
    if method == Method.FULL:
        return model
    if method == Method.FREEZE:
        keep = FreezeSpec().trainable_layers
        layers = model.model.layers
        for name, param in model.named_parameters():
            param.requires_grad = any(
                name.startswith(f"model.layers.{i}.") for i in range(len(layers) - keep, len(layers))
            )
        return model
    if method in (Method.LORA, Method.QLORA, Method.DORA):
        lora = LoraSpec()
        config = LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            use_dora=method == Method.DORA,
        )
        return get_peft_model(model, config)
    tokens = VirtualTokensSpec().num_virtual_tokens
    virtual: PrefixTuningConfig | PromptTuningConfig = (
        PrefixTuningConfig(num_virtual_tokens=tokens, task_type=TaskType.CAUSAL_LM)
        if method == Method.PREFIX
        else PromptTuningConfig(num_virtual_tokens=tokens, task_type=TaskType.CAUSAL_LM)
    )
    return get_peft_model(model, virtual)


def run_baseline(
    method: Method, model_dir: Path, data: Path, settings: dict[str, Any], workdir: Path
) -> dict[str, Any]:
    """Train `method` the plain HF way; its tokens/s and peak memory."""
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines() if line.strip()]
    tokenized = Dataset.from_dict({"text": texts}).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=settings["seq_len"]),
        batched=True,
        remove_columns=["text"],
    )
    quantization = None
    if method == Method.QLORA:
        quantization = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4"
        )
    device_map: dict[str, int | str] | None = {"": 0} if on_gpu else ({"": "cpu"} if quantization else None)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, quantization_config=quantization, device_map=device_map
    )
    args = TrainingArguments(
        output_dir=str(workdir / "hf-baseline" / method.value),
        max_steps=settings["steps"],
        per_device_train_batch_size=settings["micro_batch"],
        learning_rate=2e-4,
        bf16=on_gpu,
        gradient_checkpointing=settings["gradient_checkpointing"],
        logging_steps=max(1, settings["steps"] // 10),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        use_cpu=not on_gpu,
    )
    if quantization is not None:
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=settings["gradient_checkpointing"]
        )
    clock = Throughput()
    trainer = Trainer(
        model=adapted(model, method),
        args=args,
        train_dataset=tokenized,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[clock],
    )
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return {
        "tokensPerSecond": round(clock.tokens_per_second, 1),
        "peakAllocatedGiB": round(torch.cuda.max_memory_allocated() / 2**30, 3) if on_gpu else None,
        "peakReservedGiB": round(torch.cuda.max_memory_reserved() / 2**30, 3) if on_gpu else None,
    }
