"""Batching: right-pad every example of a batch to the longest one, stack packed blocks as rows, or flatten
the batch into one row."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from finetune_trainer.data.formats import IGNORE_INDEX


@dataclass(frozen=True)
class PaddingCollator:
    """Pads input_ids with `pad_token_id`, attention_mask with 0 and per-token labels with -100.

    Integer (classification) labels become one int64 tensor of shape [batch]. A plain picklable object,
    so DataLoader worker processes can use it. `pad_to_multiple_of` rounds the padded length up (8 suits
    tensor cores).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": _padded([f["input_ids"] for f in features], length, self.pad_token_id),
            "attention_mask": _padded(
                [f.get("attention_mask") or [1] * len(f["input_ids"]) for f in features], length, 0
            ),
        }
        labels = [f["labels"] for f in features]
        if all(isinstance(label, int) for label in labels):
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        else:
            batch["labels"] = _padded(labels, length, IGNORE_INDEX)
        return batch


def _padded(rows: Sequence[Sequence[int]], length: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for index, row in enumerate(rows):
        out[index, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _segments(feature: Mapping[str, Any]) -> tuple[list[int], list[int], list[int]]:
    """input_ids, labels and position ids of one row of whole examples (a packed block, or one example).

    The position ids restart at 0 where an example starts (a packed block's `position_ids` column, else
    0… for the one example), and there each label is IGNORE_INDEX, so the previous example's last token
    does not learn to predict the next example's first.
    """
    positions = feature.get("position_ids") or list(range(len(feature["input_ids"])))
    labels = [
        IGNORE_INDEX if position == 0 else label
        for position, label in zip(positions, feature["labels"], strict=True)
    ]
    return list(feature["input_ids"]), labels, list(positions)


@dataclass(frozen=True)
class FlatteningCollator:
    """Padding-free batches: a batch's rows one after another in a single row, with position ids.

    input_ids, labels and position_ids of shape [1, total tokens], no attention mask and no padding, as
    transformers' `DataCollatorWithFlattening`. Only for flash_attention_2, which takes the sequence
    boundaries from the position ids of a single row (variable-length kernels: each example costs its own
    length squared). SDPA and eager attention would see one long sequence, with a block-diagonal mask:
    attention over the whole batch's tokens squared, up to the micro batch size times what padded rows
    cost. Only for per-token (causal-LM) labels.
    """

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for feature in features:
            row_ids, row_labels, row_positions = _segments(feature)
            ids += row_ids
            labels += row_labels
            positions += row_positions
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
        }


@dataclass(frozen=True)
class PackedRowsCollator:
    """Packed blocks as rows of a batch, for SDPA and eager attention: [batch, longest block].

    No attention mask: transformers builds each row's mask from its position ids (examples restart at
    0, so each attends only to itself). A shorter block is padded with `pad_token_id`, labels
    IGNORE_INDEX and position ids 0, 1, …: the padding is a segment of its own that no example sees.
    """

    pad_token_id: int

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        rows = [_segments(feature) for feature in features]
        length = max(len(ids) for ids, _, _ in rows)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
        for ids, labels, positions in rows:
            pad = length - len(ids)
            batch["input_ids"].append(ids + [self.pad_token_id] * pad)
            batch["labels"].append(labels + [IGNORE_INDEX] * pad)
            batch["position_ids"].append(positions + list(range(pad)))
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
