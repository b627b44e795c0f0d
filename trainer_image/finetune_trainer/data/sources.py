"""Where records come from: local files (JSONL, JSON, CSV, Parquet, a `save_to_disk` directory) or the hub.

Readers yield plain Python records (one dict per example), and both `read_local` (all of them, in memory)
and `RecordStream` (a pass at a time, for data larger than memory) say where each came from, so an error
can say "train.jsonl record 12". Records stay dicts rather than an Arrow table here on purpose: Arrow infers
one schema for all rows and would silently drop a key that the first record lacks (an optional `input`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_trainer.data.errors import DataError

Record = Mapping[str, Any]

#: URI schemes the trainer can open itself; pvc:// must first become a local path (resolve_local_path).
HUB_SCHEME = "hf://"
FILE_SCHEME = "file://"
PVC_SCHEME = "pvc://"
#: Rows per read from a Parquet file or a saved data set: bounded memory without a call per row.
ROWS_PER_READ = 1_000


@dataclass(frozen=True)
class Records:
    """Records read from one or more files, with the file each index range came from."""

    records: Sequence[Record]
    #: (first index, file name) per file, in order; `where()` turns an index back into "file record N".
    origins: tuple[tuple[int, str], ...]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def where(self, index: int) -> str:
        return _where(self.origins, index)


def _where(origins: tuple[tuple[int, str], ...], index: int) -> str:
    """Index → "file record N", from (first index, file name) per file."""
    start, name = next((s, n) for s, n in reversed(origins) if s <= index)
    return f"{name} record {index - start}"


def resolve_local_path(uri: str, mounts: Mapping[str, str]) -> str:
    """Turn a data set URI into a local path: pvc://CLAIM/PATH → MOUNT/PATH, file:///x → /x, paths unchanged.

    `mounts` maps claim names to where the worker mounts them. Raises DataError for a claim that is not
    mounted, for URIs that are not local (hf://, s3://) and when nothing exists at the path.
    """
    if uri.startswith(PVC_SCHEME):
        claim, _, rest = uri.removeprefix(PVC_SCHEME).partition("/")
        if claim not in mounts:
            known = ", ".join(sorted(mounts)) or "none"
            raise DataError(f"dataset uri {uri}: claim {claim!r} is not mounted (mounted claims: {known})")
        path = f"{mounts[claim].rstrip('/')}/{rest}" if rest else mounts[claim]
    elif uri.startswith(FILE_SCHEME):
        path = uri.removeprefix(FILE_SCHEME)
    elif "://" in uri:
        raise DataError(f"dataset uri {uri}: {uri.split('://')[0]}:// is not a local path")
    else:
        path = uri
    if not Path(path).exists():
        raise DataError(f"dataset uri {uri}: nothing at {path}")
    return path


def _read_jsonl(path: Path) -> Iterator[Record]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path.name} line {number}: invalid JSON: {err.msg}") from err
            if not isinstance(record, dict):
                raise DataError(f"{path.name} line {number}: a record must be a JSON object")
            yield record


def _read_json(path: Path) -> Iterator[Record]:
    """One JSON document is parsed whole, even when streaming: large data belongs in JSONL or Parquet."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        hint = " (one record per line? name the file .jsonl)" if err.msg == "Extra data" else ""
        raise DataError(f"{path.name} line {err.lineno}: invalid JSON: {err.msg}{hint}") from err
    if isinstance(document, dict) and isinstance(document.get("data"), list):
        document = document["data"]
    if not isinstance(document, list):
        raise DataError(f"{path.name}: expected a JSON list of records or an object with a 'data' list")
    for index, record in enumerate(document):
        if not isinstance(record, dict):
            raise DataError(f"{path.name} record {index}: a record must be a JSON object")
    yield from document


def _read_csv(path: Path) -> Iterator[Record]:
    """CSV with a header row; every cell is a string (the classification format reads "0"/"1" as ints)."""
    with path.open(encoding="utf-8", newline="") as handle:
        for index, row in enumerate(csv.DictReader(handle)):
            if None in row:
                raise DataError(f"{path.name} record {index}: more cells than header columns")
            yield row


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=ROWS_PER_READ):
        yield from batch.to_pylist()


def _read_saved(root: Path) -> Iterator[Record]:
    """A `save_to_disk` directory, memory-mapped and read a slice at a time."""
    from datasets import load_from_disk

    loaded = load_from_disk(str(root))
    if not hasattr(loaded, "to_list"):
        raise DataError(f"{root}: a saved DatasetDict; point the uri at one split's directory")
    for start in range(0, len(loaded), ROWS_PER_READ):
        columns = loaded[start : start + ROWS_PER_READ]
        yield from (dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True))


READERS: dict[str, Callable[[Path], Iterator[Record]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}


def _parts(path: str | Path) -> Iterator[tuple[str, Iterator[Record]]]:
    """(name, its records) per file: a file by its extension, or every supported file of a directory
    (sorted by name); a directory written by `datasets.Dataset.save_to_disk` (it has state.json) is one."""
    root = Path(path)
    if root.is_dir() and (root / "state.json").exists():
        yield root.name, _read_saved(root)
        return
    files = sorted(p for p in root.iterdir() if p.suffix in READERS) if root.is_dir() else [root]
    if not files:
        raise DataError(f"{root}: no data files (supported: {', '.join(READERS)})")
    for file in files:
        reader = READERS.get(file.suffix)
        if reader is None:
            raise DataError(f"{file.name}: unsupported file type (supported: {', '.join(READERS)})")
        if not file.is_file():
            raise DataError(f"{file}: no such file")
        yield file.name, reader(file)


def read_local(path: str | Path) -> Records:
    """Every record of a file or directory (see `_parts`), in memory."""
    records: list[Record] = []
    origins = []
    for name, part in _parts(path):
        origins.append((len(records), name))
        records.extend(part)
    return Records(records=records, origins=tuple(origins))


class RecordStream:
    """The records of a file or directory read one at a time, each pass anew, for data larger than memory.

    Like `Records` it iterates and says where an index came from: `where` knows the files a pass has
    reached, which is every file once a pass has ended.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = path
        self.origins: tuple[tuple[int, str], ...] = ()

    def __iter__(self) -> Iterator[Record]:
        origins: list[tuple[int, str]] = []
        count = 0
        for name, part in _parts(self.path):
            origins.append((count, name))
            self.origins = tuple(origins)
            for record in part:
                yield record
                count += 1

    def where(self, index: int) -> str:
        return _where(self.origins, index)


def data_files(path: str | Path) -> list[Path]:
    """The files a data path holds: the file itself, or every file under a directory in name order (the
    order the cache key hashes them in)."""
    root = Path(path)
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]


def data_bytes(path: str | Path) -> int:
    """The size of the data on disk."""
    return sum(f.stat().st_size for f in data_files(path))


def read_hub(uri: str, split: str) -> Records:
    """Load hf://ORG/NAME with `datasets.load_dataset` (downloads; never used by the tests)."""
    from datasets import load_dataset

    name = uri.removeprefix(HUB_SCHEME)
    dataset = load_dataset(name, split=split)
    return Records(records=dataset.to_list(), origins=((0, f"{name}[{split}]"),))
