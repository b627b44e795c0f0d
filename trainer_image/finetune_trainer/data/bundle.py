"""What the data pipeline hands the recipe: the encoded data sets, their collator and their counts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import datasets
import torch

#: Token columns as int32 (vocabularies and -100 fit): half of int64's bytes in memory and in the cache.
TOKENS = datasets.Sequence(datasets.Value("int32"))


@dataclass(frozen=True)
class DataBundle:
    """What the recipe trains on."""

    #: Columns input_ids, labels (per-token with -100 = no loss; one int for classification), and
    #: position_ids when packed; int32 tokens. The collators make the attention masks.
    train: datasets.Dataset
    #: The held-out `validationSplit` part, encoded and packed the same way; None when the split is 0.
    eval: datasets.Dataset | None
    collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
    #: Non-padding tokens in `train` (for tokens/s).
    num_tokens: int
    #: Classification with string labels: the class names by index (for the model's id2label); else ().
    label_names: tuple[str, ...] = ()
    #: Examples dropped because truncation left no trained token.
    dropped: int = 0
