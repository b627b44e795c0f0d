"""Training data: read records, encode them in the job's format, truncate, split, pack, and batch.

`build_datasets(spec, tokenizer)` reads top to bottom: read → encode (one registered function per
format, see `formats.FORMATS`) → truncate → drop examples with nothing left to train → split off the
validation set → pack → Arrow data sets plus a padding collator. Every problem with the data raises
`DataError` naming the file, record index and field; the trainer exits with its configuration-error code.

Packed data keeps whole examples per block with position ids that restart per example, batched by
`FlatteningCollator` so attention stays within each example; unpacked data is padded per batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from finetune_trainer.data.collate import FlatteningCollator, PaddingCollator
from finetune_trainer.data.errors import DataError
from finetune_trainer.data.formats import (
    FORMATS,
    EncodeContext,
    Example,
    FieldError,
    Format,
    build_label_index,
    label_key,
)
from finetune_trainer.data.packing import (
    chunk,
    has_trained_token,
    pack,
    position_ids,
    split_indices,
    truncate,
)
from finetune_trainer.data.sources import (
    HUB_SCHEME,
    PVC_SCHEME,
    Records,
    read_hub,
    read_local,
    resolve_local_path,
)

if TYPE_CHECKING:
    from finetune_operator.api.models import DatasetSpec

__all__ = [
    "FORMATS",
    "DataBundle",
    "DataError",
    "FlatteningCollator",
    "PaddingCollator",
    "build_datasets",
    "resolve_local_path",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataBundle:
    """What the recipe trains on."""

    #: Columns input_ids, labels (per-token with -100 = no loss; one int for classification), and
    #: attention_mask, or position_ids when packed.
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


def build_datasets(
    spec: DatasetSpec,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int = 42,
    local_path: str | None = None,
) -> DataBundle:
    """Build the training (and validation) data for `spec`.

    `local_path` is where the recipe found the data (pvc:// already resolved with `resolve_local_path`);
    without it `spec.uri` is read directly: hf://ORG/NAME from the hub (`spec.split`), file:// or a path.
    """
    records = _read(spec, local_path)
    fmt = FORMATS[spec.format]
    if fmt.task == "classification" and spec.packing:
        raise DataError("dataset.packing: packing is only for the language-modelling formats")
    context, label_names = _context(spec, tokenizer, records, fmt)

    examples, dropped = _encode_all(records, fmt, context, chunk_text=spec.packing and not fmt.masks_prompt)
    if dropped:
        log.warning(
            "dropped %d of %d examples: nothing left to train after truncation to %d tokens",
            dropped,
            len(records),
            spec.max_seq_length,
        )
    if not examples:
        raise DataError(f"dataset {spec.uri}: no usable examples ({len(records)} records, {dropped} dropped)")

    try:
        train_index, eval_index = split_indices(len(examples), spec.validation_split, seed)
    except ValueError as err:
        raise DataError(f"dataset {spec.uri}: {err}") from err
    train = [examples[i] for i in train_index]
    held_out = [examples[i] for i in eval_index]
    if spec.packing:
        train = pack(train, spec.max_seq_length)
        held_out = pack(held_out, spec.max_seq_length)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if not isinstance(pad, int):
        raise DataError("tokenizer: no pad or eos token to pad batches with")
    log.info("data: %d train and %d eval examples from %s", len(train), len(held_out), spec.uri)
    collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]] = (
        FlatteningCollator() if spec.packing else PaddingCollator(pad_token_id=pad)
    )
    return DataBundle(
        train=_to_dataset(train, packed=spec.packing),
        eval=_to_dataset(held_out, packed=spec.packing) if held_out else None,
        collator=collator,
        num_tokens=sum(len(e.input_ids) for e in train),
        label_names=label_names,
        dropped=dropped,
    )


def _read(spec: DatasetSpec, local_path: str | None) -> Records:
    if local_path is not None:
        return read_local(local_path)
    if spec.uri.startswith(HUB_SCHEME):
        return read_hub(spec.uri, spec.split)
    if spec.uri.startswith(PVC_SCHEME):
        raise DataError(f"dataset uri {spec.uri}: pvc:// needs the mounted path (resolve_local_path)")
    return read_local(resolve_local_path(spec.uri, {}))


def _context(
    spec: DatasetSpec, tokenizer: PreTrainedTokenizerBase, records: Records, fmt: Format
) -> tuple[EncodeContext, tuple[str, ...]]:
    if fmt.task != "classification":
        return EncodeContext(tokenizer=tokenizer, max_seq_length=spec.max_seq_length), ()
    if spec.num_labels is None:
        raise DataError("dataset.numLabels is required for the classification format")
    keys = []
    for index, record in enumerate(records):
        try:
            keys.append(label_key(record))
        except FieldError as err:
            raise DataError(f"{records.where(index)}: {err}") from err
    try:
        label_index = build_label_index(keys, spec.num_labels)
    except ValueError as err:
        raise DataError(f"dataset {spec.uri}: {err}") from err
    names = tuple(str(key) for key in label_index if isinstance(key, str))
    context = EncodeContext(
        tokenizer=tokenizer,
        max_seq_length=spec.max_seq_length,
        num_labels=spec.num_labels,
        label_index=label_index,
    )
    return context, names


def _encode_all(
    records: Records, fmt: Format, context: EncodeContext, *, chunk_text: bool
) -> tuple[list[Example], int]:
    """Encode every record; truncate it (or cut plain text about to be packed into block-sized pieces, so
    no token is lost) and drop the ones left with nothing to train."""
    examples = []
    dropped = 0
    for index, record in enumerate(records):
        try:
            example = fmt.encode(record, context)
        except FieldError as err:
            raise DataError(f"{records.where(index)}: {err}") from err
        if chunk_text:
            examples.extend(chunk(example, context.max_seq_length))
            continue
        example = truncate(example, context.max_seq_length)
        if fmt.masks_prompt and not has_trained_token(example):
            dropped += 1
            continue
        examples.append(example)
    return examples, dropped


def _to_dataset(examples: Sequence[Example], *, packed: bool) -> datasets.Dataset:
    columns: dict[str, list[Any]] = {
        "input_ids": [e.input_ids for e in examples],
        "labels": [e.labels if e.labels is not None else e.label for e in examples],
    }
    if packed:
        columns["position_ids"] = [position_ids(e.segments) for e in examples]
    else:
        columns["attention_mask"] = [[1] * len(e.input_ids) for e in examples]
    return datasets.Dataset.from_dict(columns)
