"""Truncation, chunking, packing and the validation split: pure list-of-ints work, no tokenizer, no torch."""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from finetune_trainer.data.formats import IGNORE_INDEX, Example

#: Examples packed together at most: packing a window at a time bounds its memory (data larger than
#: memory is packed a window at a time, see `ondisk`), and a window this size already fills blocks.
PACK_WINDOW = 65_536

Indices = npt.NDArray[np.int64]


def truncate(example: Example, max_length: int) -> Example:
    """Keep the first `max_length` tokens (and their labels): the prompt survives, the response's end goes."""
    if len(example.input_ids) <= max_length:
        return example
    labels = example.labels[:max_length] if example.labels is not None else None
    return replace(example, input_ids=example.input_ids[:max_length], labels=labels)


def chunk(example: Example, max_length: int) -> list[Example]:
    """Cut a plain-text example into pieces of at most `max_length` tokens, so packing keeps every token.

    Only for formats where every token trains (`text`): a piece of a document is still a document, whereas
    a piece of a conversation would be a response without its prompt.
    """
    if example.labels is None:
        raise ValueError("chunking needs per-token labels (a language-modelling format)")
    return [
        Example(
            input_ids=example.input_ids[start : start + max_length],
            labels=example.labels[start : start + max_length],
        )
        for start in range(0, len(example.input_ids), max_length)
    ]


def has_trained_token(example: Example) -> bool:
    return example.labels is not None and any(label != IGNORE_INDEX for label in example.labels)


def pack(examples: Sequence[Example], block_size: int) -> list[Example]:
    """Put whole examples into blocks of at most `block_size` tokens (best-fit decreasing, a
    `PACK_WINDOW` of examples at a time).

    No example is split across blocks (each must already fit: truncated, or `chunk`ed for plain text), so
    a response never starts a block whose prompt is in the previous one. A block remembers the lengths of
    its examples (`Example.segments`): the data set turns them into position ids that restart at 0 for each
    example, and `FlatteningCollator` passes those instead of an attention mask, so attention does not
    cross examples (transformers builds a block-diagonal causal mask for eager and SDPA attention from such
    position ids; flash-attention runs them as variable-length sequences), as transformers'
    `DataCollatorWithFlattening`, LLaMA-Factory's neat packing and axolotl's multipack do.

    Longest first, each into the fullest block it fits (ties to the oldest block), gives blocks that are
    almost all full; the result depends only on the examples, so every worker packs alike.
    """
    return [
        block
        for start in range(0, len(examples), PACK_WINDOW)
        for block in _pack_window(examples[start : start + PACK_WINDOW], block_size)
    ]


def _pack_window(examples: Sequence[Example], block_size: int) -> list[Example]:
    order = sorted(range(len(examples)), key=lambda index: (-len(examples[index].input_ids), index))
    blocks: list[list[Example]] = []
    free: list[tuple[int, int]] = []  # (tokens left, block index), sorted: the best fit is a bisect away
    for index in order:
        example = examples[index]
        size = len(example.input_ids)
        if example.labels is None:
            raise ValueError("packing needs per-token labels (a language-modelling format)")
        if size > block_size:
            raise ValueError(f"an example of {size} tokens does not fit a {block_size}-token block")
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            left, block = free.pop(at)
        else:
            left, block = block_size, len(blocks)
            blocks.append([])
        blocks[block].append(example)
        if left > size:
            bisect.insort(free, (left - size, block))
    return [_join(block) for block in blocks]


def _join(examples: Sequence[Example]) -> Example:
    ids: list[int] = []
    labels: list[int] = []
    for example in examples:
        ids.extend(example.input_ids)
        labels.extend(example.labels or ())
    return Example(
        input_ids=ids, labels=labels, segments=tuple(len(example.input_ids) for example in examples)
    )


def windows(indices: Indices) -> Iterator[Indices]:
    """`indices` a `PACK_WINDOW` at a time: how both pipelines hand examples to `pack`, so they agree."""
    for start in range(0, len(indices), PACK_WINDOW):
        yield indices[start : start + PACK_WINDOW]


def position_ids(segments: Sequence[int]) -> list[int]:
    """0, 1, … restarting at each example of a packed block: how the model tells the examples apart."""
    return [position for length in segments for position in range(length)]


def split_indices(count: int, fraction: float, seed: int) -> tuple[Indices, Indices]:
    """Deterministic train/eval split of `count` examples: round(count * fraction) (at least 1) held out.

    The same (count, fraction, seed) always gives the same split, on every worker. Both arrays are
    sorted, disjoint and together cover range(count); 8 bytes an example, so the split of data larger than
    memory fits in it. Raises ValueError when no training example would remain.
    """
    if fraction <= 0:
        return np.arange(count, dtype=np.int64), np.empty(0, dtype=np.int64)
    held_out = max(1, round(count * fraction))
    if held_out >= count:
        raise ValueError(f"validationSplit {fraction} of {count} examples leaves nothing to train on")
    order = np.random.default_rng(seed).permutation(count).astype(np.int64)
    return np.sort(order[held_out:]), np.sort(order[:held_out])
