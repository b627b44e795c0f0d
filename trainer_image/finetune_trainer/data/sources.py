"""Where records come from: local files (JSONL, JSON, CSV, Parquet, a `save_to_disk` directory) or the hub.

Readers return plain Python records (one dict per example) together with where each came from, so an error
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
        start, name = next((s, n) for s, n in reversed(self.origins) if s <= index)
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


def _read_jsonl(path: Path) -> Sequence[Record]:
    records: list[Record] = []
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
            records.append(record)
    return records


def _read_json(path: Path) -> Sequence[Record]:
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
    return document


def _read_csv(path: Path) -> Sequence[Record]:
    """CSV with a header row; every cell is a string (the classification format reads "0"/"1" as ints)."""
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for index, row in enumerate(rows):
        if None in row:
            raise DataError(f"{path.name} record {index}: more cells than header columns")
    return rows


def _read_parquet(path: Path) -> Sequence[Record]:
    import pyarrow.parquet as pq

    records: list[Record] = pq.read_table(path).to_pylist()
    return records


READERS: dict[str, Callable[[Path], Sequence[Record]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}


def read_local(path: str | Path) -> Records:
    """Read a file by its extension, or every supported file of a directory (sorted by name).

    A directory written by `datasets.Dataset.save_to_disk` (it has state.json) is loaded as that data set.
    """
    root = Path(path)
    if root.is_dir() and (root / "state.json").exists():
        from datasets import load_from_disk

        loaded = load_from_disk(str(root))
        if not hasattr(loaded, "to_list"):
            raise DataError(f"{root}: a saved DatasetDict; point the uri at one split's directory")
        return Records(records=loaded.to_list(), origins=((0, root.name),))
    files = sorted(p for p in root.iterdir() if p.suffix in READERS) if root.is_dir() else [root]
    if not files:
        raise DataError(f"{root}: no data files (supported: {', '.join(READERS)})")
    records: list[Record] = []
    origins = []
    for file in files:
        reader = READERS.get(file.suffix)
        if reader is None:
            raise DataError(f"{file.name}: unsupported file type (supported: {', '.join(READERS)})")
        if not file.is_file():
            raise DataError(f"{file}: no such file")
        origins.append((len(records), file.name))
        records.extend(reader(file))
    return Records(records=records, origins=tuple(origins))


def read_hub(uri: str, split: str) -> Records:
    """Load hf://ORG/NAME with `datasets.load_dataset` (downloads; never used by the tests)."""
    from datasets import load_dataset

    name = uri.removeprefix(HUB_SCHEME)
    dataset = load_dataset(name, split=split)
    return Records(records=dataset.to_list(), origins=((0, f"{name}[{split}]"),))
