"""Data larger than memory: built through Arrow files on disk, into the same data set as in memory."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedTokenizerBase

import finetune_trainer.data as data
from finetune_operator.api.models import DatasetSpec
from finetune_trainer.data import DataBundle, DataError, build_datasets, packing, sources

WORDS = [
    "the",
    "cat",
    "sleeps",
    "in",
    "the",
    "warm",
    "sun",
    "while",
    "a",
    "dog",
    "runs",
    "after",
    "every",
    "red",
    "ball",
]


def text(n: int) -> str:
    return " ".join(WORDS[(n * 7 + i) % len(WORDS)] for i in range(3 + n % 29))


def write(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def contents(bundle: DataBundle) -> tuple[Any, ...]:
    held_out = bundle.eval.to_dict() if bundle.eval is not None else None
    return bundle.train.to_dict(), held_out, bundle.num_tokens, bundle.dropped, bundle.train.features


SPECS = {
    "packed text, cut into blocks": ({"format": "text", "packing": True, "max_seq_length": 24}, "text"),
    "alpaca, padded, some dropped": (
        {"format": "alpaca", "max_seq_length": 48, "validation_split": 0.1},
        "alpaca",
    ),
    "packed alpaca with a split": (
        {"format": "alpaca", "packing": True, "max_seq_length": 64, "validation_split": 0.2},
        "alpaca",
    ),
    "classification": (
        {"format": "classification", "num_labels": 3, "validation_split": 0.1},
        "classification",
    ),
}


def records_for(kind: str, count: int) -> list[dict[str, Any]]:
    if kind == "text":
        return [{"text": text(n) * (1 + n % 3)} for n in range(count)]
    if kind == "alpaca":
        return [
            {"instruction": text(n), "output": text(n + 1)} | ({"input": text(n + 2)} if n % 4 == 0 else {})
            for n in range(count)
        ]
    return [{"text": text(n), "label": n % 3} for n in range(count)]


@pytest.mark.parametrize("spec, kind", list(SPECS.values()), ids=list(SPECS))
def test_out_of_core_builds_the_same_data_set_as_in_memory(
    tmp_path: Path,
    tiny_tokenizer: PreTrainedTokenizerBase,
    monkeypatch: pytest.MonkeyPatch,
    spec: dict[str, Any],
    kind: str,
) -> None:
    monkeypatch.setattr(packing, "PACK_WINDOW", 16)  # several windows, a short last one
    path = write(tmp_path / "data.jsonl", records_for(kind, 150))
    built = {
        out_of_core: build_datasets(
            DatasetSpec(uri=str(path), **spec), tiny_tokenizer, out_of_core=out_of_core, num_proc=1
        )
        for out_of_core in (False, True)
    }
    assert contents(built[True]) == contents(built[False])
    assert len(built[True].train) > 1
    assert built[True].train.cache_files and not built[False].train.cache_files  # on disk, memory-mapped


def test_out_of_core_encodes_in_parallel_alike(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    path = write(tmp_path / "data.jsonl", records_for("text", 2_500))
    spec = DatasetSpec(uri=str(path), format="text", packing=True, max_seq_length=32, validation_split=0.05)
    one, two = (build_datasets(spec, tiny_tokenizer, out_of_core=True, num_proc=n) for n in (1, 2))
    assert contents(one) == contents(two)


def test_out_of_core_holds_one_window_of_examples_not_the_data_set(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(packing, "PACK_WINDOW", 300)
    path = write(tmp_path / "data.jsonl", records_for("text", 6_000))
    spec = DatasetSpec(uri=str(path), format="text", packing=True, max_seq_length=48)
    peaks = {}
    for out_of_core in (False, True):
        tracemalloc.start()
        bundle = build_datasets(spec, tiny_tokenizer, out_of_core=out_of_core, num_proc=1)
        peaks[out_of_core] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert bundle.num_tokens > 250_000
    # in memory, every record and token list is a Python object at once; out of core, one window's
    assert peaks[True] * 5 < peaks[False], peaks  # measured: 44 MB in memory, 2.5 MB out of core


def test_out_of_core_names_the_file_and_record_of_a_bad_one(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    write(folder / "a.jsonl", records_for("text", 30))
    write(folder / "b.jsonl", [*records_for("text", 5), {"txt": "no text field"}])
    with pytest.raises(DataError, match=r"^b\.jsonl record 5: field 'text'"):
        build_datasets(
            DatasetSpec(uri=str(folder), format="text"), tiny_tokenizer, out_of_core=True, num_proc=2
        )


def test_out_of_core_refuses_empty_data_as_in_memory(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    path = write(tmp_path / "data.jsonl", [])
    for out_of_core in (False, True):
        with pytest.raises(DataError, match=r"no usable examples \(0 records, 0 dropped\)"):
            build_datasets(DatasetSpec(uri=str(path), format="text"), tiny_tokenizer, out_of_core=out_of_core)


def test_large_local_data_is_built_out_of_core_and_cached_with_no_scratch_left(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "data.jsonl", records_for("alpaca", 40))
    monkeypatch.setattr(data, "OUT_OF_CORE_FROM", sources.data_bytes(path))
    monkeypatch.setattr(sources, "read_local", lambda path: pytest.fail("read into memory"))
    monkeypatch.setattr(data, "read_local", lambda path: pytest.fail("read into memory"))
    out = tmp_path / "out"
    spec = DatasetSpec(uri=str(path), format="alpaca", validation_split=0.1)
    bundle = build_datasets(spec, tiny_tokenizer, cache_root=out)
    entries = sorted(p.name for p in (out / ".tokenized").iterdir())
    assert len(entries) == 1 and not entries[0].startswith(".")  # the entry, no .build-* scratch left
    assert all(
        Path(f["filename"]).is_relative_to(out / ".tokenized" / entries[0]) for f in bundle.train.cache_files
    )
    again = build_datasets(spec, tiny_tokenizer, cache_root=out)
    assert contents(again) == contents(bundle)


def test_uncached_out_of_core_data_keeps_only_its_train_and_eval_files(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    path = write(tmp_path / "data.jsonl", records_for("alpaca", 40))
    bundle = build_datasets(
        DatasetSpec(uri=str(path), format="alpaca", validation_split=0.1), tiny_tokenizer, out_of_core=True
    )
    [scratch] = (tmp_path / "tmp").iterdir()
    assert sorted(p.name for p in scratch.iterdir()) == ["eval.arrow", "train.arrow"]
    assert len(bundle.train) + len(bundle.eval or ()) == 40
