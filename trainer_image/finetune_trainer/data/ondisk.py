"""Data larger than memory: the in-memory pipeline's steps, with Arrow files on disk between them.

Records are read a pass at a time (`sources.RecordStream`) into an Arrow column of JSON strings, encoded on
every CPU by `datasets.map` into Arrow files, split by index and packed a `PACK_WINDOW` of examples at a
time, as the in-memory pipeline packs too: so the same data gives the same data set either way, and only
one window of examples is ever Python objects. Everything is written under one scratch directory (on the
job's output volume when there is one: a container's own disk is small).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa

from finetune_trainer.data.encode import Encoder, encode_table, record_json
from finetune_trainer.data.formats import Example
from finetune_trainer.data.packing import Indices, windows
from finetune_trainer.data.sources import RecordStream

#: Records per Arrow batch while reading.
READ_BATCH = 1_000


@dataclass(frozen=True)
class EncodedTable:
    """Encoded examples in an Arrow file: the rows `rows` (those a record kept) are the examples."""

    table: datasets.Dataset
    rows: Indices
    records: int

    @property
    def dropped(self) -> int:
        """Records that left no example (each left one row marked not kept)."""
        return len(self.table) - len(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def windows(self, indices: Indices) -> Iterator[list[Example]]:
        """The examples at `indices`, in order, a `PACK_WINDOW` at a time."""
        arrow = self.table.data.table
        for window in windows(indices):
            taken = arrow.take(pa.array(self.rows[window])).to_pydict()
            yield [
                Example(input_ids=ids, labels=labels, label=label)
                for ids, labels, label in zip(
                    taken["input_ids"], taken["labels"], taken["label"], strict=True
                )
            ]


def encode_stream(records: RecordStream, encoder: Encoder, num_proc: int, scratch: Path) -> EncodedTable:
    """Read every record into `scratch` and encode them there on `num_proc` processes."""
    table = write_dataset(
        ({"record": batch} for batch in _json_batches(records)),
        datasets.Features({"record": datasets.Value("string")}),
        scratch / "records.arrow",
    )
    encoded = encode_table(table, encoder, num_proc, records.where, cache_file=scratch / "encoded.arrow")
    kept = encoded.data.column("kept").to_numpy(zero_copy_only=False)
    return EncodedTable(table=encoded, rows=np.flatnonzero(kept).astype(np.int64), records=len(table))


def write_dataset(
    batches: Iterable[dict[str, list[Any]]], features: datasets.Features, path: Path
) -> datasets.Dataset:
    """Column batches written one after another to an Arrow file at `path`, then memory-mapped."""
    schema = features.arrow_schema
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(pa.RecordBatch.from_pydict(batch, schema=schema))
    return datasets.Dataset.from_file(str(path))


def _json_batches(records: Iterable[Any]) -> Iterator[list[str]]:
    """Records as JSON strings (see `encode`: no schema inferred across them), `READ_BATCH` at a time."""
    batch: list[str] = []
    for record in records:
        batch.append(record_json(record))
        if len(batch) == READ_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch
