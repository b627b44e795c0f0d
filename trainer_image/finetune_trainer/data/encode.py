"""Encoding every record: in this process, or for a large data set in parallel with `datasets.map`.

Each record becomes zero or more examples: truncated to the sequence length, or cut into block-sized
pieces when plain text is about to be packed (no token is lost), and dropped when truncation left
nothing to train (counted). Both ways give the same examples in the same order, so every worker and every
attempt of a job builds the same data whichever way it ran.

In parallel the records travel to `num_proc` worker processes as one column of JSON strings: an Arrow
table of the records themselves would infer one schema for all rows and drop a key that the first
record lacks (see `sources`). A record a worker cannot encode becomes an error row, which this process
raises as the usual `DataError` naming the file and record.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow.compute as pc

from finetune_trainer.data.bundle import TOKENS
from finetune_trainer.data.errors import DataError
from finetune_trainer.data.formats import EncodeContext, Example, FieldError, Format
from finetune_trainer.data.packing import Indices, chunk, has_trained_token, truncate, windows
from finetune_trainer.data.sources import Records

#: Below this many records, starting worker processes costs more than it saves.
PARALLEL_FROM = 20_000
#: Records per `datasets.map` batch: large enough to amortise the call, small enough to spread evenly.
BATCH = 1_000
#: The most processes a worker starts; tokenising is fast enough that more only add start-up time.
MAX_PROCESSES = 16
#: What a worker returns per example (`labels` for language modelling, `label` for classification).
FEATURES = datasets.Features(
    {
        "input_ids": TOKENS,
        "labels": TOKENS,
        "label": datasets.Value("int64"),
        "kept": datasets.Value("bool"),
        "error": datasets.Value("string"),
    }
)


@dataclass(frozen=True)
class Encoder:
    """One record → its examples (none when dropped); picklable, so `datasets.map` workers can run it."""

    fmt: Format
    context: EncodeContext
    chunk_text: bool

    def __call__(self, record: Mapping[str, Any]) -> list[Example]:
        """Raises FieldError for a record the format cannot read."""
        example = self.fmt.encode(record, self.context)
        if self.chunk_text:
            return chunk(example, self.context.max_seq_length)
        example = truncate(example, self.context.max_seq_length)
        if self.fmt.masks_prompt and not has_trained_token(example):
            return []
        return [example]

    def batch(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        """`datasets.map` over JSON-encoded records: one output row per example, a row with `kept` False
        for a dropped record, and a row with `error` for one that cannot be encoded."""
        rows: dict[str, list[Any]] = {"input_ids": [], "labels": [], "label": [], "kept": [], "error": []}

        def add(example: Example | None, kept: bool = True, error: str = "") -> None:
            rows["input_ids"].append(example.input_ids if example else [])
            rows["labels"].append(example.labels if example else None)
            rows["label"].append(example.label if example else None)
            rows["kept"].append(kept)
            rows["error"].append(error)

        for text, index in zip(batch["record"], indices, strict=True):
            try:
                examples = self(json.loads(text))
            except FieldError as err:
                add(None, kept=False, error=f"{index}\t{err}")
                continue
            for example in examples:
                add(example)
            if not examples:
                add(None, kept=False)
        return rows


def processes() -> int:
    """The CPUs this worker may use (its affinity, which a CPU limit does not narrow), up to the cap."""
    return max(1, min(len(os.sched_getaffinity(0)), MAX_PROCESSES))


@dataclass(frozen=True)
class EncodedList:
    """Encoded examples in memory (`ondisk.EncodedTable` holds them in an Arrow file)."""

    examples: list[Example]
    #: Records that left no example.
    dropped: int
    records: int

    def __len__(self) -> int:
        return len(self.examples)

    def windows(self, indices: Indices) -> Iterator[list[Example]]:
        """The examples at `indices`, in order, a `PACK_WINDOW` at a time."""
        for window in windows(indices):
            yield [self.examples[index] for index in window]


def encode_all(records: Records, encoder: Encoder, num_proc: int | None = None) -> EncodedList:
    """Every record's examples in order. `num_proc` None: parallel for `PARALLEL_FROM` records or more, on
    `processes()`; 1: in this process."""
    if num_proc is None:
        num_proc = processes() if len(records) >= PARALLEL_FROM else 1
    if num_proc <= 1:
        examples, dropped = _sequential(records, encoder)
    else:
        examples, dropped = _parallel(records, encoder, num_proc)
    return EncodedList(examples=examples, dropped=dropped, records=len(records))


def _sequential(records: Records, encoder: Encoder) -> tuple[list[Example], int]:
    examples: list[Example] = []
    dropped = 0
    for index, record in enumerate(records):
        try:
            encoded = encoder(record)
        except FieldError as err:
            raise DataError(f"{records.where(index)}: {err}") from err
        examples.extend(encoded)
        dropped += not encoded
    return examples, dropped


def record_json(record: Any) -> str:
    """A record as the `record` column of `encode_table` holds it (see the module's docstring)."""
    return json.dumps(record, default=str)


def _parallel(records: Records, encoder: Encoder, num_proc: int) -> tuple[list[Example], int]:
    table = datasets.Dataset.from_dict({"record": [record_json(r) for r in records]})
    encoded = encode_table(table, encoder, num_proc, records.where)
    return list(_examples(encoded)), sum(1 for kept in encoded["kept"] if not kept)


def encode_table(
    table: datasets.Dataset,
    encoder: Encoder,
    num_proc: int,
    where: Callable[[int], str],
    cache_file: Path | None = None,
) -> datasets.Dataset:
    """Encode a `record` column of JSON strings on `num_proc` processes into `FEATURES` rows: in memory, or
    with `cache_file` into Arrow files there (for data larger than memory). Raises `DataError` for the
    first record that cannot be encoded, naming it with `where`."""
    if not len(table):  # `map` would leave no columns at all
        return datasets.Dataset.from_dict({name: [] for name in FEATURES}, features=FEATURES)
    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # a bar per process is noise in a pod's log
    try:
        encoded = table.map(
            encoder.batch,
            batched=True,
            batch_size=BATCH,
            with_indices=True,
            num_proc=max(1, min(num_proc, -(-len(table) // BATCH))),
            remove_columns=["record"],
            features=FEATURES,
            keep_in_memory=cache_file is None,
            cache_file_name=str(cache_file) if cache_file is not None else None,
        )
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    errors = encoded.data.column("error")
    failed = pc.indices_nonzero(pc.not_equal(errors, ""))
    if len(failed):
        index, _, message = errors[failed[0].as_py()].as_py().partition("\t")
        raise DataError(f"{where(int(index))}: {message}")
    return encoded


def _examples(encoded: datasets.Dataset) -> Iterator[Example]:
    for row in encoded:
        if row["kept"]:
            yield Example(input_ids=row["input_ids"], labels=row["labels"], label=row["label"])
