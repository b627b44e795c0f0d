"""Reading files by extension, directories, saved data sets, and resolving URIs to local paths."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from finetune_trainer.data import DataError, resolve_local_path
from finetune_trainer.data.sources import read_local

RECORDS = [
    {"instruction": "Say hi.", "output": "Hi."},
    {"instruction": "Add.", "input": "1 + 1", "output": "2"},
]


def test_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + json.dumps(RECORDS[1]) + "\n")
    assert list(read_local(path)) == RECORDS  # the key missing from record 0 is not lost


@pytest.mark.parametrize("document", [RECORDS, {"data": RECORDS}])
def test_json_list_or_data_object(tmp_path: Path, document: object) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps(document))
    assert list(read_local(path)) == RECORDS


def test_csv_keeps_strings(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"hello, world",1\nbye,neg\n')
    assert list(read_local(path)) == [{"text": "hello, world", "label": "1"}, {"text": "bye", "label": "neg"}]


def test_parquet(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list([{"text": "a", "label": 0}, {"text": "b", "label": 1}]).to_parquet(str(path))
    assert list(read_local(path)) == [{"text": "a", "label": 0}, {"text": "b", "label": 1}]


def test_saved_dataset_directory(tmp_path: Path) -> None:
    datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}]).save_to_disk(str(tmp_path / "saved"))
    assert list(read_local(tmp_path / "saved")) == [{"text": "a"}, {"text": "b"}]


def test_directory_reads_every_data_file_and_knows_where_each_record_came_from(tmp_path: Path) -> None:
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "b0"}) + "\n" + json.dumps({"text": "b1"}) + "\n")
    (tmp_path / "a.json").write_text(json.dumps([{"text": "a0"}]))
    (tmp_path / "README.md").write_text("not data")
    records = read_local(tmp_path)
    assert [r["text"] for r in records] == ["a0", "b0", "b1"]
    assert [records.where(i) for i in range(3)] == ["a.json record 0", "b.jsonl record 0", "b.jsonl record 1"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("d.jsonl", '{"text": "a"}\n{"text": \n', "d.jsonl line 2: invalid JSON"),
        ("d.jsonl", '{"text": "a"}\n[1, 2]\n', "d.jsonl line 2: a record must be a JSON object"),
        (
            "d.json",
            '{"text": "a"}\n{"text": "b"}\n',
            r"d.json line 2: invalid JSON: Extra data \(one record per line",
        ),
        ("d.json", '{"rows": []}', "d.json: expected a JSON list of records"),
        ("d.json", '[{"text": "a"}, "b"]', "d.json record 1: a record must be a JSON object"),
        ("d.csv", "text\na\nb,c\n", "d.csv record 1: more cells than header columns"),
        ("d.txt", "hello", "d.txt: unsupported file type"),
    ],
)
def test_unreadable_files_raise_data_error(tmp_path: Path, name: str, content: str, message: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=f"^{message}"):
        read_local(tmp_path / name)


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no data files"):
        read_local(tmp_path)


def test_resolve_local_path(tmp_path: Path) -> None:
    (tmp_path / "sets").mkdir()
    (tmp_path / "sets" / "train.jsonl").write_text("{}\n")
    mounts = {"data": str(tmp_path)}
    assert resolve_local_path("pvc://data/sets/train.jsonl", mounts) == f"{tmp_path}/sets/train.jsonl"
    assert resolve_local_path("pvc://data", mounts) == str(tmp_path)
    assert resolve_local_path(f"file://{tmp_path}/sets", mounts) == f"{tmp_path}/sets"
    assert resolve_local_path(str(tmp_path / "sets"), {}) == str(tmp_path / "sets")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("pvc://other/x.jsonl", "claim 'other' is not mounted \\(mounted claims: data\\)"),
        ("pvc://data/missing.jsonl", "nothing at .*/missing.jsonl"),
        ("s3://bucket/x.jsonl", "s3:// is not a local path"),
        ("hf://org/name", "hf:// is not a local path"),
        ("/no/such/file.jsonl", "nothing at /no/such/file.jsonl"),
    ],
)
def test_resolve_local_path_errors(tmp_path: Path, uri: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        resolve_local_path(uri, {"data": str(tmp_path)})
