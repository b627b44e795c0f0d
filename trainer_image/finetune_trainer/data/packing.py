"""Truncation, packing and the validation split: pure list-of-ints work, no tokenizer and no torch."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

from finetune_trainer.data.formats import IGNORE_INDEX, Example


def truncate(example: Example, max_length: int) -> Example:
    """Keep the first `max_length` tokens (and their labels): the prompt survives, the response's end goes."""
    if len(example.input_ids) <= max_length:
        return example
    labels = example.labels[:max_length] if example.labels is not None else None
    return replace(example, input_ids=example.input_ids[:max_length], labels=labels)


def has_trained_token(example: Example) -> bool:
    return example.labels is not None and any(label != IGNORE_INDEX for label in example.labels)


def pack(examples: Sequence[Example], block_size: int) -> list[Example]:
    """Concatenate examples (each already ends with eos / end-of-turn) and cut into `block_size` blocks.

    Every token is kept: an example may continue into the next block, and the last block may be shorter
    (the collator pads it). Labels are cut at the same places, so they stay aligned with input_ids.
    Attention is NOT reset at example boundaries and position ids run on across them (no per-example
    position-id reset or block-diagonal mask): a token can attend to the end of the previous example in
    its block, as in Hugging Face's `group_texts`. The eos between examples tells the model where one ends.
    """
    ids: list[int] = []
    labels: list[int] = []
    for example in examples:
        if example.labels is None:
            raise ValueError("packing needs per-token labels (a language-modelling format)")
        ids.extend(example.input_ids)
        labels.extend(example.labels)
    return [
        Example(input_ids=ids[start : start + block_size], labels=labels[start : start + block_size])
        for start in range(0, len(ids), block_size)
    ]


def split_indices(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/eval split of `count` examples: round(count * fraction) (at least 1) held out.

    The same (count, fraction, seed) always gives the same split, on every worker. Both lists are sorted,
    disjoint and together cover range(count). Raises ValueError when no training example would remain.
    """
    if fraction <= 0:
        return list(range(count)), []
    held_out = max(1, round(count * fraction))
    if held_out >= count:
        raise ValueError(f"validationSplit {fraction} of {count} examples leaves nothing to train on")
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return sorted(order[held_out:]), sorted(order[:held_out])
