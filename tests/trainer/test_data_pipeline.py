"""Truncation, dropping, packing, the validation split and the collator."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from finetune_operator.api.models import DatasetSpec
from finetune_trainer.data import DataBundle, DataError, PaddingCollator, build_datasets
from finetune_trainer.data.formats import ALPACA_PROMPT_NO_INPUT, IGNORE_INDEX, Example
from finetune_trainer.data.packing import pack, split_indices

SENTENCES = [f"Sentence number {n}: the cat sleeps in the warm sun." for n in range(40)]


def build(
    tmp_path: Path,
    records: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int = 42,
    **spec: Any,
) -> DataBundle:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return build_datasets(DatasetSpec(uri=str(path), **spec), tokenizer, seed=seed)


def test_truncation_keeps_the_beginning(tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    text = " ".join(SENTENCES[:5])
    row = build(tmp_path, [{"text": text}], tiny_tokenizer, format="text", max_seq_length=12).train[0]
    full = tiny_tokenizer(text)["input_ids"]
    assert row["input_ids"] == full[:12]
    assert row["labels"] == full[:12]


def test_truncated_instruction_examples_without_trained_tokens_are_dropped_and_logged(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase, caplog: pytest.LogCaptureFixture
) -> None:
    short = {"instruction": "Hi.", "output": "Hello."}
    long = {"instruction": " ".join(SENTENCES[:10]), "output": "Yes."}
    prompt_length = len(tiny_tokenizer(ALPACA_PROMPT_NO_INPUT.format(instruction="Hi."))["input_ids"])
    limit = prompt_length + 2  # the short example keeps two response tokens; the long one keeps none
    with caplog.at_level(logging.WARNING, logger="finetune_trainer.data"):
        bundle = build(tmp_path, [short, long, short], tiny_tokenizer, format="alpaca", max_seq_length=limit)
    assert len(bundle.train) == 2
    assert bundle.dropped == 1
    assert "dropped 1 of 3 examples" in caplog.text
    row = bundle.train[0]
    assert len(row["input_ids"]) == limit
    assert row["labels"][prompt_length:] == row["input_ids"][prompt_length:]
    assert row["labels"][:prompt_length] == [IGNORE_INDEX] * prompt_length


def test_all_records_dropped_is_an_error(tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    long = {"instruction": " ".join(SENTENCES[:10]), "output": "Yes."}
    with pytest.raises(DataError, match="no usable examples"):
        build(tmp_path, [long], tiny_tokenizer, format="alpaca", max_seq_length=16)


def test_pack_cuts_blocks_and_keeps_labels_aligned() -> None:
    examples = [
        Example(input_ids=[1, 2, 3], labels=[-100, 2, 3]),
        Example(input_ids=[4, 5, 6, 7, 8], labels=[-100, -100, 6, 7, 8]),
        Example(input_ids=[9, 10], labels=[9, 10]),
    ]
    blocks = pack(examples, 4)
    assert [b.input_ids for b in blocks] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert [b.labels for b in blocks] == [[-100, 2, 3, -100], [-100, 6, 7, 8], [9, 10]]


def test_packing_text_keeps_every_token(tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    records = [{"text": s} for s in SENTENCES[:10]]
    bundle = build(tmp_path, records, tiny_tokenizer, format="text", packing=True, max_seq_length=32)
    stream = [
        t for s in SENTENCES[:10] for t in [*tiny_tokenizer(s)["input_ids"], tiny_tokenizer.eos_token_id]
    ]
    lengths = [len(ids) for ids in bundle.train["input_ids"]]
    assert all(length == 32 for length in lengths[:-1]) and 0 < lengths[-1] <= 32
    assert [t for block in bundle.train["input_ids"] for t in block] == stream
    assert bundle.train["labels"] == bundle.train["input_ids"]
    assert bundle.num_tokens == len(stream)


def test_packing_instruction_data_carries_the_masks(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    records = [{"instruction": f"Repeat {n}.", "output": f"{n}"} for n in range(6)]
    plain = build(tmp_path, records, tiny_tokenizer, format="alpaca", max_seq_length=128)
    packed = build(tmp_path, records, tiny_tokenizer, format="alpaca", packing=True, max_seq_length=128)
    assert max(len(row) for row in plain.train["input_ids"]) < 128  # nothing truncated: packing only moves
    assert [t for row in packed.train["input_ids"] for t in row] == [
        t for row in plain.train["input_ids"] for t in row
    ]
    assert [t for row in packed.train["labels"] for t in row] == [
        t for row in plain.train["labels"] for t in row
    ]
    assert len(packed.train) < len(plain.train)
    assert all(len(row) == 128 for row in packed.train["input_ids"][:-1])


def test_validation_split_is_seeded_disjoint_and_complete(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    records = [{"text": s} for s in SENTENCES]

    def split(seed: int) -> tuple[list[str], list[str]]:
        bundle = build(tmp_path, records, tiny_tokenizer, seed=seed, format="text", validation_split=0.25)
        assert bundle.eval is not None
        return (
            [str(tiny_tokenizer.decode(row[:-1])) for row in bundle.train["input_ids"]],
            [str(tiny_tokenizer.decode(row[:-1])) for row in bundle.eval["input_ids"]],
        )

    train, held_out = split(7)
    assert len(held_out) == 10 and len(train) == 30
    assert sorted(train + held_out) == sorted(SENTENCES)
    assert split(7) == (train, held_out)
    assert split(8)[1] != held_out
    assert build(tmp_path, records, tiny_tokenizer, format="text").eval is None


def test_split_indices_edges() -> None:
    assert split_indices(5, 0.0, 1) == ([0, 1, 2, 3, 4], [])
    assert len(split_indices(5, 0.01, 1)[1]) == 1  # a non-zero split holds out at least one example
    with pytest.raises(ValueError, match="nothing to train on"):
        split_indices(1, 0.5, 1)


def test_collator_pads_inputs_masks_and_labels() -> None:
    collate = PaddingCollator(pad_token_id=0)
    batch = collate(
        [
            {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
            {"input_ids": [8], "attention_mask": [1], "labels": [8]},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())
    assert PaddingCollator(0, pad_to_multiple_of=8)([{"input_ids": [1], "labels": [1]}])[
        "input_ids"
    ].shape == (1, 8)


def test_collator_classification_labels_are_one_per_example(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    records = [{"text": "good day", "label": 1}, {"text": "bad", "label": 0}]
    bundle = build(tmp_path, records, tiny_tokenizer, format="classification", num_labels=2)
    batch = bundle.collator([bundle.train[0], bundle.train[1]])
    assert batch["labels"].tolist() == [1, 0]
    assert batch["input_ids"][1, -1].item() == tiny_tokenizer.pad_token_id
    assert batch["attention_mask"].sum().item() == bundle.num_tokens
