"""Tiny randomly initialised models saved like hub checkpoints, for the trainer tests (nothing downloads).

Both use the tiny tokenizer's vocabulary and are saved with it, so a directory works as `model.uri`
exactly like a real model on a PVC.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

#: Llama-style: grouped-query attention (4 heads, 2 KV heads), gated MLP, RMSNorm, untied head.
LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
BERT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 256,
}


def build_tiny_llama(path: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **LLAMA,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_bert(path: Path, tokenizer_dir: Path, num_labels: int = 2, seed: int = 0) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, num_labels=num_labels, **BERT
    )
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


#: Four sentences repeated: a tiny LM memorises them within a few dozen steps, so the loss falls reliably.
SENTENCES = (
    "the quick brown fox jumps over the lazy dog",
    "a small cat sits on the warm mat",
    "the river runs down to the sea",
    "green trees grow tall in the quiet park",
)


def write_text_data(path: Path, repeats: int = 16) -> Path:
    path.write_text("".join(json.dumps({"text": s}) + "\n" for _ in range(repeats) for s in SENTENCES))
    return path


def write_classification_data(path: Path, repeats: int = 16) -> Path:
    """Label 1 for sentences about animals, 0 otherwise: learnable from a word or two."""
    rows = [{"text": s, "label": int(any(w in s for w in ("fox", "cat")))} for s in SENTENCES]
    path.write_text("".join(json.dumps(row) + "\n" for _ in range(repeats) for row in rows))
    return path
