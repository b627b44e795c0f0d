"""Training data: read records, encode them in the job's format, truncate, split, pack, and batch.

`build_datasets(spec, tokenizer)` reads top to bottom: read → encode (one registered function per
format, see `formats.FORMATS`; a large data set in parallel, see `encode`) → truncate → drop examples
with nothing left to train → split off the validation set → pack → Arrow data sets plus a collator. Every problem with the data raises
`DataError` naming the file, record index and field; the trainer exits with its configuration-error code.

Packed data keeps whole examples per block with position ids that restart per example, so attention
stays within each example: the blocks are a batch's rows (`PackedRowsCollator`), or with
flash_attention_2 one flattened row (`FlatteningCollator`), as unpacked language-modelling data is then
too (`dataset.paddingFree`). Otherwise unpacked data is padded per batch.

With `cache_root` (the job's output directory) the result is cached there and loaded instead of built
whenever the data, tokenizer and settings are the same (see `cache`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
from transformers import PreTrainedTokenizerBase

from finetune_trainer.data import cache
from finetune_trainer.data.bundle import TOKENS, DataBundle
from finetune_trainer.data.cache import Collator
from finetune_trainer.data.collate import FlatteningCollator, PackedRowsCollator, PaddingCollator
from finetune_trainer.data.encode import Encoder, encode_all
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
from finetune_trainer.data.packing import pack, position_ids, split_indices
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
    "PackedRowsCollator",
    "PaddingCollator",
    "build_datasets",
    "resolve_local_path",
]

log = logging.getLogger(__name__)


def build_datasets(
    spec: DatasetSpec,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int = 42,
    local_path: str | None = None,
    cache_root: str | Path | None = None,
    can_share_rows: bool = True,
    varlen_attention: bool = False,
    num_proc: int | None = None,
) -> DataBundle:
    """Build the training (and validation) data for `spec`, or load it from the cache under `cache_root`.

    `local_path` is where the recipe found the data (pvc:// already resolved with `resolve_local_path`);
    without it `spec.uri` is read directly: hf://ORG/NAME from the hub (`spec.split`), file:// or a path.
    `can_share_rows` is False for a method whose examples must each have a row of their own (prefix and
    prompt tuning: the method table's `packing` trait); their batches are padded. `varlen_attention`: the
    attention kernel takes sequence boundaries from one flattened row's position ids (flash_attention_2),
    so batches are flattened (see `collate`). `num_proc`: processes that encode (None: `encode.encode_all`
    decides by the data's size).
    """
    path = _local_path(spec, local_path)
    fmt = FORMATS[spec.format]
    if fmt.task == "classification" and spec.packing:
        raise DataError("dataset.packing: packing is only for the language-modelling formats")
    flatten = varlen_attention and fmt.task == "causal-lm" and can_share_rows
    collator = _collator(spec, tokenizer, flatten=flatten)
    key = cache.cache_key(spec, tokenizer, seed, path) if cache_root is not None else None
    if cache_root is not None and key is not None:
        bundle = cache.load_or_build(
            cache_root, key, collator, lambda: _build(spec, tokenizer, fmt, collator, seed, path, num_proc)
        )
    else:
        if cache_root is not None:
            log.info("data: not cached (only local data read with a fast tokenizer is)")
        bundle = _build(spec, tokenizer, fmt, collator, seed, path, num_proc)
    log.info("data: %d train and %d eval examples from %s", *_sizes(bundle), spec.uri)
    return bundle


def _build(
    spec: DatasetSpec,
    tokenizer: PreTrainedTokenizerBase,
    fmt: Format,
    collator: Collator,
    seed: int,
    path: str | None,
    num_proc: int | None,
) -> DataBundle:
    records = read_local(path) if path is not None else read_hub(spec.uri, spec.split)
    context, label_names = _context(spec, tokenizer, records, fmt)

    encoder = Encoder(fmt, context, chunk_text=spec.packing and not fmt.masks_prompt)
    examples, dropped = encode_all(records, encoder, num_proc)
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
    return DataBundle(
        train=_to_dataset(train, packed=spec.packing),
        eval=_to_dataset(held_out, packed=spec.packing) if held_out else None,
        collator=collator,
        num_tokens=sum(len(e.input_ids) for e in train),
        label_names=label_names,
        dropped=dropped,
    )


def _sizes(bundle: DataBundle) -> tuple[int, int]:
    return len(bundle.train), len(bundle.eval) if bundle.eval is not None else 0


def _collator(spec: DatasetSpec, tokenizer: PreTrainedTokenizerBase, *, flatten: bool) -> Collator:
    """With a variable-length kernel (`flatten`) packed blocks, and with `dataset.paddingFree` unpacked
    examples, become one flattened row; otherwise packed blocks are stacked rows and examples padded."""
    if flatten and (spec.packing or spec.padding_free):
        return FlatteningCollator()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if not isinstance(pad, int):
        raise DataError("tokenizer: no pad or eos token to pad batches with")
    return PackedRowsCollator(pad_token_id=pad) if spec.packing else PaddingCollator(pad_token_id=pad)


def _local_path(spec: DatasetSpec, local_path: str | None) -> str | None:
    """Where the data is on this machine; None for a hub data set."""
    if local_path is not None:
        return local_path
    if spec.uri.startswith(HUB_SCHEME):
        return None
    if spec.uri.startswith(PVC_SCHEME):
        raise DataError(f"dataset uri {spec.uri}: pvc:// needs the mounted path (resolve_local_path)")
    return resolve_local_path(spec.uri, {})


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


def _to_dataset(examples: Sequence[Example], *, packed: bool) -> datasets.Dataset:
    """The examples as columns; the collators make attention masks, so none is stored."""
    classification = bool(examples) and examples[0].labels is None
    columns: dict[str, list[Any]] = {
        "input_ids": [e.input_ids for e in examples],
        "labels": [e.label if classification else e.labels for e in examples],
    }
    features = {"input_ids": TOKENS, "labels": datasets.Value("int64") if classification else TOKENS}
    if packed:
        columns["position_ids"] = [position_ids(e.segments) for e in examples]
        features["position_ids"] = TOKENS
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))
