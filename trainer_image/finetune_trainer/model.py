"""Load the base model and tokenizer from a local directory (a PVC mount) or the Hugging Face hub.

The hub token comes from `HF_TOKEN` (the operator injects it from `secrets.hfToken`); remote code runs
only when the job sets `trustRemoteCode`. Builders only: which layers train is the method's business.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from finetune_operator.api.enums import Precision
from finetune_operator.api.trainer import TrainerConfig
from finetune_trainer.exit_codes import ConfigurationError

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

DTYPES = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16, Precision.FP32: torch.float32}


def torch_dtype(precision: Precision) -> torch.dtype:
    return DTYPES[precision]


def model_source(config: TrainerConfig) -> str:
    """The local directory when the operator resolved one, else the hub id (hf://ORG/NAME or model.name).
    A local directory that is not there is the job's mistake (a wrong path on the volume): without this
    check transformers would take the path for a hub id and fail as if the network had."""
    if config.paths.model is not None:
        if not os.path.isdir(config.paths.model):
            raise ConfigurationError(
                f"model: {config.model.uri} (mounted at {config.paths.model}) is not a directory on the volume"
            )
        return config.paths.model
    uri = config.model.uri
    if uri is not None and uri.startswith("hf://"):
        return uri.removeprefix("hf://")
    if config.model.name is None:
        raise ConfigurationError("model: neither a local path nor a hub name to load from")
    return config.model.name


def _hub_kwargs(config: TrainerConfig) -> dict[str, Any]:
    return {
        "revision": config.model.revision,
        "token": os.environ.get("HF_TOKEN") or None,
        "trust_remote_code": config.model.trust_remote_code,
    }


def load_tokenizer(config: TrainerConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer; a pad token is borrowed from EOS when the model has none (Llama)."""
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
        model_source(config), **_hub_kwargs(config)
    )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigurationError("the tokenizer has neither a pad nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    config: TrainerConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    quantization: BitsAndBytesConfig | None = None,
    device_map: dict[str, Any] | None = None,
) -> PreTrainedModel:
    """A causal LM, or a sequence classifier for the classification format, in the training precision.

    Under ZeRO-3 HF's `from_pretrained` partitions the weights as it loads (the caller has created the
    DeepSpeed config first); `device_map` is only for quantized loading outside ZeRO-3, where bitsandbytes
    needs the weights on this rank's device before it quantises them.
    """
    kwargs: dict[str, Any] = _hub_kwargs(config) | {
        "dtype": torch_dtype(config.training.precision),
        "attn_implementation": config.model.attention_implementation.value,
    }
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if device_map is not None:
        kwargs["device_map"] = device_map
    source = model_source(config)
    model: PreTrainedModel
    if config.is_classification:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=config.dataset.num_labels, **kwargs
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        # Training never reads a KV cache, and with one transformers stops telling packed examples apart
        # by their position ids: they would attend to each other. `save` turns it back on for inference.
        model.config.use_cache = False
    if model.config.pad_token_id is None:
        # Sequence classifiers find the last real token through pad_token_id; causal LMs ignore it.
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; ZeRO-3 partitions hold `ds_numel` for the full size.

    A bitsandbytes 4-bit weight is stored packed; its quant state keeps the unpacked shape, which counts.
    """
    trainable = total = 0
    for param in model.parameters():
        numel = int(getattr(param, "ds_numel", param.numel()))
        quant_state = getattr(param, "quant_state", None)
        if quant_state is not None:
            numel = int(torch.Size(quant_state.shape).numel())
        total += numel
        if param.requires_grad:
            trainable += numel
    return trainable, total
