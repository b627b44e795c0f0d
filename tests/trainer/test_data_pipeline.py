"""Truncation, dropping, packing, the validation split and the collator."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from finetune_operator.api.models import DatasetSpec
from finetune_trainer.data import (
    DataBundle,
    DataError,
    FlatteningCollator,
    PackedRowsCollator,
    PaddingCollator,
    build_datasets,
)
from finetune_trainer.data.formats import ALPACA_PROMPT_NO_INPUT, IGNORE_INDEX, Example
from finetune_trainer.data.packing import pack, position_ids, split_indices

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


def pieces_of(row: list[int], positions: list[int]) -> list[list[int]]:
    """A packed row cut where its position ids restart: one piece per example."""
    starts = [p for p, position in enumerate(positions) if position == 0] + [len(row)]
    return [row[a:b] for a, b in itertools.pairwise(starts)]


def test_truncation_keeps_the_beginning(tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    text = " ".join(SENTENCES[:5])
    row = build(tmp_path, [{"text": text}], tiny_tokenizer, format="text", max_seq_length=12).train[0]
    full = tiny_tokenizer(text)["input_ids"]
    assert row["input_ids"] == full[:12]
    assert row["labels"] == full[:12]


def test_truncated_instruction_examples_without_trained_tokens_are_dropped_and_logged(
    tmp_path: Path, base_tokenizer: PreTrainedTokenizerBase, caplog: pytest.LogCaptureFixture
) -> None:
    short = {"instruction": "Hi.", "output": "Hello."}
    long = {"instruction": " ".join(SENTENCES[:10]), "output": "Yes."}
    prompt_length = len(base_tokenizer(ALPACA_PROMPT_NO_INPUT.format(instruction="Hi."))["input_ids"])
    limit = prompt_length + 2  # the short example keeps two response tokens; the long one keeps none
    with caplog.at_level(logging.WARNING, logger="finetune_trainer.data"):
        bundle = build(tmp_path, [short, long, short], base_tokenizer, format="alpaca", max_seq_length=limit)
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


def test_pack_keeps_whole_examples_and_fills_blocks() -> None:
    sizes = [5, 3, 2, 4, 1, 6, 3]
    examples = [
        Example(input_ids=[100 * n + i for i in range(size)], labels=[-100, *range(1, size)])
        for n, size in enumerate(sizes)
    ]
    blocks = pack(examples, 8)
    assert len(blocks) == 3  # 24 tokens, three full 8-token blocks: best-fit decreasing wastes none
    placed = []
    for block in blocks:
        assert len(block.input_ids) <= 8 and sum(block.segments) == len(block.input_ids)
        start = 0
        for length in block.segments:  # each segment is one example, whole, labels aligned with it
            ids = block.input_ids[start : start + length]
            n = ids[0] // 100
            assert examples[n].input_ids == ids and examples[n].labels == block.labels[start : start + length]
            placed.append(n)
            start += length
    assert sorted(placed) == list(range(len(sizes)))
    assert pack(examples, 8) == blocks  # the same on every worker
    with pytest.raises(ValueError, match="does not fit"):
        pack(examples, 5)


def test_position_ids_restart_per_example() -> None:
    assert position_ids((3, 1, 2)) == [0, 1, 2, 0, 0, 1]


def test_packing_text_keeps_every_token(tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    long = " ".join(SENTENCES[:6])  # longer than a block: cut into block-sized documents, nothing lost
    texts = [*SENTENCES[:10], long]
    bundle = build(
        tmp_path, [{"text": t} for t in texts], tiny_tokenizer, format="text", packing=True, max_seq_length=32
    )
    documents = [[*tiny_tokenizer(t)["input_ids"], tiny_tokenizer.eos_token_id] for t in texts]
    assert len(documents[-1]) > 32
    tokens = sorted(t for document in documents for t in document)
    assert sorted(t for block in bundle.train["input_ids"] for t in block) == tokens
    assert all(len(block) <= 32 for block in bundle.train["input_ids"])
    assert bundle.train["labels"] == bundle.train["input_ids"]
    assert bundle.num_tokens == len(tokens)
    starts = [
        piece[0]
        for block, positions in zip(bundle.train["input_ids"], bundle.train["position_ids"], strict=True)
        for piece in pieces_of(block, positions)
    ]
    assert sorted(starts) == sorted(d[i] for d in documents for i in range(0, len(d), 32))


def test_packing_instruction_data_never_splits_an_example(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    records = [
        {"instruction": f"Repeat {'after me ' * (n % 4)}{n}.", "output": f"{n} " * n} for n in range(12)
    ]
    plain = build(tmp_path, records, tiny_tokenizer, format="alpaca", max_seq_length=400)
    packed = build(tmp_path, records, tiny_tokenizer, format="alpaca", packing=True, max_seq_length=400)
    assert max(len(row) for row in plain.train["input_ids"]) < 400  # nothing truncated: packing only moves
    examples = sorted(zip(plain.train["input_ids"], plain.train["labels"], strict=True))
    pieces = []
    for ids, labels, positions in zip(
        packed.train["input_ids"], packed.train["labels"], packed.train["position_ids"], strict=True
    ):
        pieces += zip(pieces_of(ids, positions), pieces_of(labels, positions), strict=True)
    assert sorted(pieces) == examples  # every example whole, in one block, with its own masks
    assert len(packed.train) < len(plain.train)
    assert "attention_mask" not in packed.train.column_names
    assert isinstance(packed.collator, PackedRowsCollator)


@pytest.mark.parametrize(
    ("format", "spec", "can_share_rows", "varlen", "collator"),
    [
        # flash_attention_2 reads boundaries from one flattened row's position ids: padding-free
        ("text", {}, True, True, FlatteningCollator),
        ("alpaca", {}, True, True, FlatteningCollator),
        ("text", {"packing": True}, True, True, FlatteningCollator),
        ("text", {"padding_free": False}, True, True, PaddingCollator),
        ("text", {}, False, True, PaddingCollator),  # prefix and prompt tuning: a row each, padded
        ("classification", {"num_labels": 2}, True, True, PaddingCollator),  # one label per example
        # SDPA and eager: a flattened row would cost the batch's tokens squared in attention
        ("text", {}, True, False, PaddingCollator),
        ("text", {"packing": True}, True, False, PackedRowsCollator),
    ],
)
def test_the_collator_follows_the_attention_kernel_and_what_may_share_a_row(
    tmp_path: Path,
    tiny_tokenizer: PreTrainedTokenizerBase,
    format: str,
    spec: dict[str, Any],
    can_share_rows: bool,
    varlen: bool,
    collator: type,
) -> None:
    record = {"text": "Hi.", "label": 1, "instruction": "Say hi.", "output": "Hi."}
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(record) + "\n")
    bundle = build_datasets(
        DatasetSpec(uri=str(path), format=format, **spec),
        tiny_tokenizer,
        can_share_rows=can_share_rows,
        varlen_attention=varlen,
    )
    assert type(bundle.collator) is collator


def test_packed_rows_collator_stacks_blocks_and_pads_as_a_segment_of_its_own() -> None:
    batch = PackedRowsCollator(pad_token_id=0)(
        [
            {"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9], "position_ids": [0, 1, 2, 0, 1]},
            {"input_ids": [3, 4], "labels": [-100, 4], "position_ids": [0, 1]},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [3, 4, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    # each example's first label is ignored (the previous example's last token must not predict it)
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 4, -100, -100, -100]]
    assert "attention_mask" not in batch


def test_flattening_collator_makes_one_row_with_position_ids() -> None:
    batch = FlatteningCollator()(
        [
            {"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9], "position_ids": [0, 1, 2, 0, 1]},
            {"input_ids": [3, 4], "labels": [-100, 4]},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 3, 4]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    # an example's first token is never the target of the previous example's last one
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, 4]]
    assert "attention_mask" not in batch


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
    assert [part.tolist() for part in split_indices(5, 0.0, 1)] == [[0, 1, 2, 3, 4], []]
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


def _rows(data: Any) -> list[dict[str, Any]]:
    return [dict(row) for row in data] if data is not None else []


@pytest.mark.parametrize(
    ("spec", "records"),
    [
        # plain text cut into block-sized pieces and packed
        (
            {"format": "text", "max_seq_length": 16, "packing": True},
            [{"text": " ".join(SENTENCES[: n % 7 + 1])} for n in range(60)],
        ),
        # instructions, some dropped by truncation (nothing left to train), validation split off
        (
            {"format": "alpaca", "max_seq_length": 96, "validation_split": 0.1},
            [
                {"instruction": SENTENCES[n % 40] * (1 + n % 4), "output": "Yes."}
                if n % 5
                else {"instruction": "Hi.", "output": "Hello."}
                for n in range(60)
            ],
        ),
        (
            {"format": "classification", "num_labels": 2},
            [{"text": SENTENCES[n % 40], "label": n % 2} for n in range(60)],
        ),
    ],
    ids=["text-packed", "alpaca-dropping", "classification"],
)
def test_encoding_in_parallel_builds_exactly_what_one_process_does(
    tmp_path: Path,
    base_tokenizer: PreTrainedTokenizerBase,
    spec: dict[str, Any],
    records: list[dict[str, Any]],
) -> None:
    """datasets.map over worker processes, in batches, against the in-process loop: same rows, same order,
    same drop count, whatever the batch boundaries (60 records, batches of 7)."""
    from finetune_trainer.data import encode

    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    one = build_datasets(DatasetSpec(uri=str(path), **spec), base_tokenizer, num_proc=1)
    encode.BATCH = 7  # several batches per process; restored below
    try:
        three = build_datasets(DatasetSpec(uri=str(path), **spec), base_tokenizer, num_proc=3)
    finally:
        encode.BATCH = 1_000
    assert _rows(one.train) == _rows(three.train) and len(one.train) > 5
    assert _rows(one.eval) == _rows(three.eval)
    assert (one.num_tokens, one.dropped) == (three.num_tokens, three.dropped)
    if spec["format"] == "alpaca":
        assert one.dropped > 0


def test_a_bad_record_found_by_a_worker_process_is_named_as_in_one_process(
    tmp_path: Path, base_tokenizer: PreTrainedTokenizerBase
) -> None:
    records: list[dict[str, Any]] = [{"text": SENTENCES[n % 40]} for n in range(50)]
    records[37] = {"txt": "a typo"}
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    messages = []
    for procs in (1, 2):
        with pytest.raises(DataError) as raised:
            build_datasets(DatasetSpec(uri=str(path), format="text"), base_tokenizer, num_proc=procs)
        messages.append(str(raised.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith("data.jsonl record 37: field 'text'")


def test_a_large_data_set_is_encoded_in_parallel_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune_trainer.data import encode
    from finetune_trainer.data.sources import Records

    calls: list[int] = []
    monkeypatch.setattr(encode, "_parallel", lambda records, encoder, n: calls.append(n) or ([], 0))
    monkeypatch.setattr(encode, "_sequential", lambda records, encoder: calls.append(1) or ([], 0))
    monkeypatch.setattr(encode, "processes", lambda: 4)
    small = Records(records=[{}] * (encode.PARALLEL_FROM - 1), origins=((0, "x"),))
    large = Records(records=[{}] * encode.PARALLEL_FROM, origins=((0, "x"),))
    encoder: Any = None
    encode.encode_all(small, encoder)
    encode.encode_all(large, encoder)
    encode.encode_all(large, encoder, num_proc=1)
    assert calls == [1, 4, 1]
