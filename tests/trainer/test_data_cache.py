"""The tokenised data set is cached on the output volume: built once, loaded after, rebuilt when anything
it depends on changes."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from finetune_operator.api.models import DatasetSpec
from finetune_trainer.data import FORMATS, DataBundle, build_datasets
from finetune_trainer.data.cache import CACHE_DIR, META_FILE, STALE_AFTER_S, cache_key
from finetune_trainer.data.formats import Format

SENTENCES = [f"Sentence number {n}: the cat sleeps in the warm sun." for n in range(40)]
TEXT = [{"text": " ".join(SENTENCES[n : n + 1 + n % 3])} for n in range(30)]
LABELLED = [{"text": s, "label": ["neg", "pos", "mixed"][n % 3]} for n, s in enumerate(SENTENCES)]
#: (format, records, spec settings): packed text with a held-out part, and named classes
CASES = [
    ("text", TEXT, {"packing": True, "maxSeqLength": 48, "validationSplit": 0.2}),
    ("classification", LABELLED, {"numLabels": 3, "validationSplit": 0.1}),
]


def write(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def build(
    data: Path, tokenizer: PreTrainedTokenizerBase, out: Path, *, seed: int = 42, **spec: Any
) -> DataBundle:
    return build_datasets(
        DatasetSpec.model_validate({"uri": str(data), **spec}), tokenizer, seed=seed, cache_root=out
    )


def entries(out: Path) -> list[str]:
    return sorted(p.name for p in (out / CACHE_DIR).iterdir())


@pytest.mark.parametrize(("fmt", "records", "spec"), CASES, ids=[c[0] for c in CASES])
def test_the_second_build_loads_what_the_first_tokenised(
    tmp_path: Path,
    tiny_tokenizer: PreTrainedTokenizerBase,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fmt: str,
    records: list[dict[str, Any]],
    spec: dict[str, Any],
) -> None:
    data, out = write(tmp_path / "data.jsonl", records), tmp_path / "out"
    first = build(data, tiny_tokenizer, out, format=fmt, **spec)
    (entry,) = entries(out)
    assert (out / CACHE_DIR / entry / META_FILE).is_file()

    def fail(record: Any, context: Any) -> Any:
        raise AssertionError("tokenised again")

    original = FORMATS[fmt]
    monkeypatch.setitem(FORMATS, fmt, Format(fail, original.task, original.masks_prompt, original.fields))
    with caplog.at_level(logging.INFO, logger="finetune_trainer.data"):
        second = build(data, tiny_tokenizer, out, format=fmt, **spec)
    assert "tokenised before, loaded from" in caplog.text
    assert first.eval is not None and second.eval is not None
    assert second.train.to_list() == first.train.to_list() and len(first.train) > 0
    assert second.eval.to_list() == first.eval.to_list()
    assert (second.num_tokens, second.label_names, second.dropped) == (
        first.num_tokens,
        first.label_names,
        first.dropped,
    )
    assert second.collator == first.collator
    assert fmt != "classification" or first.label_names == ("mixed", "neg", "pos")


def test_the_key_follows_the_data_the_tokenizer_and_the_settings(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase, tiny_tokenizer_dir: Path
) -> None:
    data = write(tmp_path / "data.jsonl", TEXT)
    spec = DatasetSpec(uri=str(data), format="text")

    def key(**changes: Any) -> str | None:
        tokenizer = changes.pop("tokenizer", tiny_tokenizer)
        path = changes.pop("path", data)
        seed = changes.pop("seed", 42)
        return cache_key(spec.model_copy(update=changes), tokenizer, seed, str(path))

    base = key()
    assert base is not None
    # the same bytes under another name and a freshly loaded copy of the tokenizer share the entry
    same_bytes = tmp_path / "copy"
    same_bytes.mkdir()
    (same_bytes / "data.jsonl").write_bytes(data.read_bytes())
    assert key(path=same_bytes / "data.jsonl", uri="file:///elsewhere.jsonl") == base
    assert key(tokenizer=AutoTokenizer.from_pretrained(tiny_tokenizer_dir)) == base

    retemplated = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    retemplated.chat_template = "{{ messages[0]['content'] }}"
    appended = write(tmp_path / "more.jsonl", [*TEXT, {"text": "One more."}])
    changed = [
        key(path=appended),
        key(tokenizer=retemplated),
        key(max_seq_length=64),
        key(packing=True),
        key(validation_split=0.1),
        key(seed=7),
    ]
    assert base not in changed and len(set(changed)) == len(changed)

    hub = DatasetSpec(uri="hf://org/name", format="text")
    assert cache_key(hub, tiny_tokenizer, 42, None) is None  # no digest before downloading
    slow = type("Slow", (), {"is_fast": False})()
    assert cache_key(spec, slow, 42, str(data)) is None  # type: ignore[arg-type]


def test_a_new_entry_replaces_the_old_and_an_unreadable_one_is_rebuilt(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase, caplog: pytest.LogCaptureFixture
) -> None:
    data, out = write(tmp_path / "data.jsonl", TEXT), tmp_path / "out"
    build(data, tiny_tokenizer, out, format="text", maxSeqLength=32)
    (old,) = entries(out)
    left_behind, writing = out / CACHE_DIR / ".dead-writer", out / CACHE_DIR / ".live-writer"
    left_behind.mkdir()
    writing.mkdir()
    os.utime(left_behind, (time.time() - STALE_AFTER_S - 60,) * 2)
    built = build(data, tiny_tokenizer, out, format="text", maxSeqLength=64)
    (live, new) = entries(out)
    assert new != old and live == writing.name

    (out / CACHE_DIR / new / "train" / "state.json").write_text("{")
    with caplog.at_level(logging.WARNING, logger="finetune_trainer.data"):
        rebuilt = build(data, tiny_tokenizer, out, format="text", maxSeqLength=64)
    assert "unreadable, tokenising again" in caplog.text
    assert rebuilt.train.to_list() == built.train.to_list()


def test_an_unwritable_output_only_costs_the_cache(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase, caplog: pytest.LogCaptureFixture
) -> None:
    data = write(tmp_path / "data.jsonl", TEXT)
    not_a_directory = tmp_path / "out"
    not_a_directory.write_text("")
    with caplog.at_level(logging.WARNING, logger="finetune_trainer.data"):
        bundle = build(data, tiny_tokenizer, not_a_directory, format="text")
    assert "could not cache the tokenised data" in caplog.text
    assert len(bundle.train) == len(TEXT)
