"""Training data: read records, encode them in the job's format, truncate, split, pack, and batch.

`build_datasets(spec, tokenizer)` reads top to bottom: read → encode (one registered function per
format, see `formats.FORMATS`; a large data set in parallel, see `encode`) → truncate → drop examples
with nothing left to train → split off the validation set → pack → Arrow data sets plus a collator.
Every problem with the data raises `DataError` naming the file, record index and field; the trainer exits with its configuration-error code.

Packed data keeps whole examples per block with position ids that restart per example, so attention
stays within each example: the blocks are a batch's rows (`PackedRowsCollator`), or with
flash_attention_2 one flattened row (`FlatteningCollator`), as unpacked language-modelling data is then
too (`dataset.paddingFree`). Otherwise unpacked data is padded per batch.

With `cache_root` (the job's output directory) the result is cached there and loaded instead of built
whenever the data, tokenizer and settings are the same (see `cache`). Local data larger than
`OUT_OF_CORE_FROM` is built out of core, through Arrow files on disk (see `ondisk`), into the same data set.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerBase

from finetune_trainer.data import cache
from finetune_trainer.data.bundle import TOKENS, DataBundle
from finetune_trainer.data.cache import Collator
from finetune_trainer.data.collate import FlatteningCollator, PackedRowsCollator, PaddingCollator
from finetune_trainer.data.encode import EncodedList, Encoder, encode_all, processes
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
from finetune_trainer.data.ondisk import EncodedTable, encode_stream, write_dataset
from finetune_trainer.data.packing import Indices, pack, position_ids, split_indices
from finetune_trainer.data.sources import (
    HUB_SCHEME,
    PVC_SCHEME,
    Records,
    RecordStream,
    data_bytes,
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

#: Local data this large (on disk) or larger is built out of core (see `ondisk`): in memory, records and
#: token lists as Python objects take 10 to 40 times the bytes of the file.
OUT_OF_CORE_FROM = 64 * 2**20


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
    out_of_core: bool | None = None,
) -> DataBundle:
    """Build the training (and validation) data for `spec`, or load it from the cache under `cache_root`.

    `local_path` is where the recipe found the data (pvc:// already resolved with `resolve_local_path`);
    without it `spec.uri` is read directly: hf://ORG/NAME from the hub (`spec.split`), file:// or a path.
    `can_share_rows` is False for a method whose examples must each have a row of their own (prefix and
    prompt tuning: the method table's `packing` trait); their batches are padded. `varlen_attention`: the
    attention kernel takes sequence boundaries from one flattened row's position ids (flash_attention_2),
    so batches are flattened (see `collate`). `num_proc`: processes that encode (None: `encode.encode_all`
    decides by the data's size). `out_of_core`: build through Arrow files on disk rather than in memory
    (see `ondisk`; None: local data of `OUT_OF_CORE_FROM` bytes or more is); the files go under `cache_root`
    when there is one, else under the temporary directory.
    """
    path = _local_path(spec, local_path)
    fmt = FORMATS[spec.format]
    if fmt.task == "classification" and spec.packing:
        raise DataError("dataset.packing: packing is only for the language-modelling formats")
    flatten = varlen_attention and fmt.task == "causal-lm" and can_share_rows
    collator = _collator(spec, tokenizer, flatten=flatten)
    if out_of_core is None:
        out_of_core = path is not None and data_bytes(path) >= OUT_OF_CORE_FROM
    on_disk = OnDisk(RecordStream(path), _scratch(cache_root)) if out_of_core and path is not None else None

    def build() -> DataBundle:
        return _build(spec, tokenizer, fmt, collator, seed, path, num_proc, on_disk)

    key = cache.cache_key(spec, tokenizer, seed, path) if cache_root is not None else None
    if cache_root is not None and key is not None:
        bundle = cache.load_or_build(cache_root, key, collator, build)
    else:
        if cache_root is not None:
            log.info("data: not cached (only local data read with a fast tokenizer is)")
        bundle = build()
    if on_disk is not None and not _maps(bundle, on_disk.scratch):
        shutil.rmtree(on_disk.scratch, ignore_errors=True)
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
    on_disk: OnDisk | None,
) -> DataBundle:
    """With `on_disk`, through Arrow files in its scratch directory (see `ondisk`); else in memory. Both
    give the same data."""
    encoded: EncodedList | EncodedTable
    if on_disk is not None:
        context, label_names = _context(spec, tokenizer, on_disk.stream, fmt)
        encoded = encode_stream(
            on_disk.stream, _encoder(spec, fmt, context), num_proc or processes(), on_disk.scratch
        )
    else:
        records = read_local(path) if path is not None else read_hub(spec.uri, spec.split)
        context, label_names = _context(spec, tokenizer, records, fmt)
        encoded = encode_all(records, _encoder(spec, fmt, context), num_proc)
    if encoded.dropped:
        log.warning(
            "dropped %d of %d examples: nothing left to train after truncation to %d tokens",
            encoded.dropped,
            encoded.records,
            spec.max_seq_length,
        )
    if not len(encoded):
        raise DataError(
            f"dataset {spec.uri}: no usable examples ({encoded.records} records, {encoded.dropped} dropped)"
        )

    try:
        train_index, eval_index = split_indices(len(encoded), spec.validation_split, seed)
    except ValueError as err:
        raise DataError(f"dataset {spec.uri}: {err}") from err
    classification = fmt.task == "classification"

    def dataset(indices: Indices, name: str) -> datasets.Dataset:
        batches = (
            _columns(
                pack(w, spec.max_seq_length) if spec.packing else w,
                packed=spec.packing,
                classification=classification,
            )
            for w in encoded.windows(indices)
        )
        features = _features(packed=spec.packing, classification=classification)
        if on_disk is None:
            return datasets.Dataset.from_dict(_concatenated(batches, features), features=features)
        return write_dataset(batches, features, on_disk.scratch / f"{name}.arrow")

    train = dataset(train_index, "train")
    bundle = DataBundle(
        train=train,
        eval=dataset(eval_index, "eval") if len(eval_index) else None,
        collator=collator,
        num_tokens=pc.sum(pc.list_value_length(train.data.column("input_ids"))).as_py() or 0,
        label_names=label_names,
        dropped=encoded.dropped,
    )
    if on_disk is not None:
        _remove_intermediates(on_disk.scratch)
    return bundle


@dataclass(frozen=True)
class OnDisk:
    """An out-of-core build: the local data streamed, and the directory its Arrow files are written in."""

    stream: RecordStream
    scratch: Path


def _encoder(spec: DatasetSpec, fmt: Format, context: EncodeContext) -> Encoder:
    return Encoder(fmt, context, chunk_text=spec.packing and not fmt.masks_prompt)


def _scratch(cache_root: str | Path | None) -> Path:
    """A new directory for an out-of-core build: on the output volume (beside the cache, dot-named so
    that `cache` removes it once its writer has long gone), else under the temporary directory."""
    if cache_root is None:
        return Path(tempfile.mkdtemp(prefix="finetune-data-"))
    scratch = Path(cache_root) / cache.CACHE_DIR / f".build-{uuid.uuid4().hex}"
    scratch.mkdir(parents=True)
    return scratch


def _maps(bundle: DataBundle, scratch: Path) -> bool:
    """Whether `bundle` reads files under `scratch` (it was built there and not cached elsewhere)."""
    parts = [bundle.train] + ([bundle.eval] if bundle.eval is not None else [])
    return any(Path(f["filename"]).is_relative_to(scratch) for part in parts for f in part.cache_files)


def _remove_intermediates(scratch: Path) -> None:
    """The records and encoded files, once the train and eval files are written from them."""
    for name in ("records", "encoded"):
        for file in scratch.glob(f"{name}*.arrow"):
            file.unlink()


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
    spec: DatasetSpec, tokenizer: PreTrainedTokenizerBase, records: Records | RecordStream, fmt: Format
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


def _columns(examples: Sequence[Example], *, packed: bool, classification: bool) -> dict[str, list[Any]]:
    """The examples as columns (position ids for packed blocks); the collators make attention masks, so
    none is stored."""
    columns: dict[str, list[Any]] = {
        "input_ids": [e.input_ids for e in examples],
        "labels": [e.label if classification else e.labels for e in examples],
    }
    if packed:
        columns["position_ids"] = [position_ids(e.segments) for e in examples]
    return columns


def _features(*, packed: bool, classification: bool) -> datasets.Features:
    features = {"input_ids": TOKENS, "labels": datasets.Value("int64") if classification else TOKENS}
    if packed:
        features["position_ids"] = TOKENS
    return datasets.Features(features)


def _concatenated(
    batches: Iterable[dict[str, list[Any]]], features: datasets.Features
) -> dict[str, list[Any]]:
    columns: dict[str, list[Any]] = {name: [] for name in features}
    for batch in batches:
        for name in features:
            columns[name].extend(batch[name])
    return columns
