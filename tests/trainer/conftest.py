"""Fixtures shared by the trainer tests. Everything is built locally; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the tiny tokenizer (save_pretrained), loadable with AutoTokenizer offline."""
    path = tmp_path_factory.mktemp("tiny-tokenizer")
    build_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    """The tiny tokenizer as the trainer loads it: AutoTokenizer.from_pretrained on the saved directory."""
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    return tokenizer


@pytest.fixture(scope="session")
def base_tokenizer(tiny_tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    """The tiny tokenizer without a chat template, as a base model's (alpaca uses the Stanford prompt)."""
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.chat_template = None
    return tokenizer


# --- tiny models and data for the training tests (tests/trainer/tiny_models.py) ---------------------------


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A randomly initialised Llama-style causal LM saved with the tiny tokenizer, like a model on a PVC."""
    from .tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A randomly initialised BERT-style two-class sequence classifier saved with the tiny tokenizer."""
    from .tiny_models import build_tiny_bert

    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def text_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from .tiny_models import write_text_data

    return write_text_data(tmp_path_factory.mktemp("text-data") / "train.jsonl")


@pytest.fixture(scope="session")
def classification_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from .tiny_models import write_classification_data

    return write_classification_data(tmp_path_factory.mktemp("cls-data") / "train.jsonl")
