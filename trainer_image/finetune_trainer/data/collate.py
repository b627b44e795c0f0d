"""Batching: right-pad every example of a batch to the longest one, or flatten the batch into one row."""

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


@dataclass(frozen=True)
class FlatteningCollator:
    """Padding-free batches: a batch's examples one after another in a single row, with position ids.

    input_ids, labels and position_ids of shape [1, total tokens], no attention mask and no padding:
    the position ids restart at 0 where an example starts (a packed block's `position_ids` column, else
    0… per example), which is how transformers keeps attention within each example (its block-diagonal
    mask for eager and SDPA attention, variable-length kernels for flash-attention), as its own
    `DataCollatorWithFlattening` does. The label of each example's first token is IGNORE_INDEX, so the
    previous example's last token does not learn to predict it. Only for per-token (causal-LM) labels.
    """

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for feature in features:
            row_positions = feature.get("position_ids") or list(range(len(feature["input_ids"])))
            ids.extend(feature["input_ids"])
            positions.extend(row_positions)
            labels.extend(
                IGNORE_INDEX if position == 0 else label
                for position, label in zip(row_positions, feature["labels"], strict=True)
            )
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
        }
