"""Each format's tokens and labels, checked against a hand-made expectation built with the tiny tokenizer."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from finetune_operator.api.models import DatasetSpec
from finetune_trainer.data import FORMATS, DataBundle, DataError, build_datasets
from finetune_trainer.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, IGNORE_INDEX

from .tokenizer import build_tiny_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Spain?"},
    {"role": "assistant", "content": "Madrid."},
]


def build(
    tmp_path: Path, records: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, **spec: Any
) -> DataBundle:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return build_datasets(DatasetSpec(uri=str(path), **spec), tokenizer)


def ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    result: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return result


def trained_spans(tokenizer: PreTrainedTokenizerBase, row: dict[str, Any]) -> list[str]:
    """Decode each maximal run of trained positions (labels != -100) back to text."""
    spans: list[list[int]] = []
    previous = False
    for token, label in zip(row["input_ids"], row["labels"], strict=True):
        trained = label != IGNORE_INDEX
        if trained:
            assert label == token  # a trained label is the token itself (the model shifts)
            if not previous:
                spans.append([])
            spans[-1].append(token)
        previous = trained
    return [str(tokenizer.decode(span)) for span in spans]


def test_registry_matches_the_api_formats() -> None:
    api_formats = typing.get_args(DatasetSpec.model_fields["format"].annotation)
    assert sorted(FORMATS) == sorted(api_formats)


@pytest.mark.parametrize("given", ["Paris, France", ""])
def test_alpaca_without_a_chat_template_uses_the_stanford_prompt(
    tmp_path: Path, base_tokenizer: PreTrainedTokenizerBase, given: str
) -> None:
    record = {"instruction": "Name a city.", "input": given, "output": "Paris is a city."}
    bundle = build(tmp_path, [record], base_tokenizer, format="alpaca")

    template = ALPACA_PROMPT if given else ALPACA_PROMPT_NO_INPUT
    prompt = template.format(instruction="Name a city.", input=given)
    assert ("### Input:" in prompt) == bool(given)
    prompt_ids = base_tokenizer(prompt)["input_ids"]
    response_ids = ids(base_tokenizer, "Paris is a city.")
    eos = base_tokenizer.eos_token_id
    row = bundle.train[0]
    assert row["input_ids"] == prompt_ids + response_ids + [eos]
    assert row["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [eos]
    assert "attention_mask" not in row  # the collator makes it


def test_alpaca_input_may_be_absent(tmp_path: Path, base_tokenizer: PreTrainedTokenizerBase) -> None:
    bundle = build(tmp_path, [{"instruction": "Say hi.", "output": "Hi."}], base_tokenizer, format="alpaca")
    prompt = ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi.")
    assert bundle.train[0]["input_ids"][: len(ids(base_tokenizer, prompt))] == ids(base_tokenizer, prompt)


@pytest.mark.parametrize(
    ("given", "question"), [("Paris, France", "Name a city.\nParis, France"), ("", "Name a city.")]
)
def test_alpaca_goes_through_the_chat_template_when_the_tokenizer_has_one(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase, given: str, question: str
) -> None:
    """As an instruct model is prompted: one user turn (instruction, then input) and the trained reply."""
    record = {"instruction": "Name a city.", "input": given, "output": "Paris is a city."}
    row = build(tmp_path, [record], tiny_tokenizer, format="alpaca").train[0]
    conversation = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": "Paris is a city."},
    ]
    rendered = str(tiny_tokenizer.apply_chat_template(conversation, tokenize=False))
    assert row["input_ids"] == ids(tiny_tokenizer, rendered)
    assert "### Instruction" not in rendered
    assert trained_spans(tiny_tokenizer, row) == ["Paris is a city.<|im_end|>"]
    assert row == build(tmp_path, [{"messages": conversation}], tiny_tokenizer, format="chat").train[0]


def test_alpaca_keeps_the_tokenizers_bos(tmp_path: Path) -> None:
    """A Llama-style tokenizer that adds bos to every text: the prompt starts with it (masked)."""
    tokenizer = build_tiny_tokenizer()
    from tokenizers.processors import TemplateProcessing

    backend = tokenizer.backend_tokenizer
    backend.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    llama_like = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")  # type: ignore[no-untyped-call]
    bundle = build(tmp_path, [{"instruction": "Say hi.", "output": "Hi."}], llama_like, format="alpaca")
    row = bundle.train[0]
    assert row["input_ids"][0] == llama_like.bos_token_id
    assert row["input_ids"].count(llama_like.bos_token_id) == 1
    assert row["labels"][0] == IGNORE_INDEX
    assert trained_spans(llama_like, row) == ["Hi.</s>"]


def test_chat_trains_exactly_the_assistant_turns(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    bundle = build(tmp_path, [{"messages": CONVERSATION}], tiny_tokenizer, format="chat")
    row = bundle.train[0]
    rendered = str(tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=False))
    assert row["input_ids"] == ids(tiny_tokenizer, rendered)
    assert trained_spans(tiny_tokenizer, row) == [
        "The capital of France is Paris.<|im_end|>",
        "Madrid.<|im_end|>",
    ]
    masked = tiny_tokenizer.decode(
        [t for t, y in zip(row["input_ids"], row["labels"], strict=True) if y == IGNORE_INDEX]
    )
    for turn in CONVERSATION:
        assert (turn["content"] in masked) == (turn["role"] != "assistant")
    assert "<|im_start|>assistant\n" in masked


def test_sharegpt_is_the_same_conversation_as_chat(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    speakers = {"system": "system", "user": "human", "assistant": "gpt"}
    conversations = [{"from": speakers[t["role"]], "value": t["content"]} for t in CONVERSATION]
    sharegpt = build(tmp_path, [{"conversations": conversations}], tiny_tokenizer, format="sharegpt").train[0]
    chat = build(tmp_path, [{"messages": CONVERSATION}], tiny_tokenizer, format="chat").train[0]
    assert sharegpt == chat
    assert trained_spans(tiny_tokenizer, sharegpt)[-1] == "Madrid.<|im_end|>"


def test_text_trains_every_token_and_appends_eos(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    bundle = build(tmp_path, [{"text": "The cat sleeps in the warm sun."}], tiny_tokenizer, format="text")
    row = bundle.train[0]
    assert row["input_ids"] == [
        *ids(tiny_tokenizer, "The cat sleeps in the warm sun."),
        tiny_tokenizer.eos_token_id,
    ]
    assert row["labels"] == row["input_ids"]
    assert bundle.num_tokens == len(row["input_ids"])


def test_classification_maps_names_in_sorted_order(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    records = [
        {"text": "good", "label": "pos"},
        {"text": "bad", "label": "neg"},
        {"text": "meh", "label": "neutral"},
    ]
    bundle = build(tmp_path, records, tiny_tokenizer, format="classification", num_labels=3)
    assert bundle.label_names == ("neg", "neutral", "pos")
    assert bundle.train["labels"] == [2, 0, 1]
    assert bundle.train[1]["input_ids"] == tiny_tokenizer("bad")["input_ids"]


def test_classification_int_and_decimal_string_labels(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    records: list[dict[str, Any]] = [
        {"text": "a", "label": 1},
        {"text": "b", "label": "0"},
        {"text": "c", "label": 2},
    ]
    bundle = build(tmp_path, records, tiny_tokenizer, format="classification", num_labels=3)
    assert bundle.train["labels"] == [1, 0, 2]
    assert bundle.label_names == ()


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([0, 2], "data.jsonl record 1: field 'label': 2 is not a class in [0, 2)"),
        ([0, -1], "data.jsonl record 1: field 'label'"),
        (["a", "b", "c"], "3 distinct label names but numLabels is 2"),
        ([0, "b"], "labels mix class indices"),
        ([0, 1.5], "data.jsonl record 1: field 'label': expected an int or a string, got float"),
    ],
)
def test_classification_label_validation(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase, labels: list[Any], message: str
) -> None:
    records = [{"text": "x", "label": label} for label in labels]
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        build(tmp_path, records, tiny_tokenizer, format="classification", num_labels=2)


def test_classification_truncates_and_refuses_packing(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    long = {"text": "The cat sleeps in the warm sun. " * 20, "label": 1}
    bundle = build(tmp_path, [long], tiny_tokenizer, format="classification", num_labels=2, max_seq_length=16)
    assert len(bundle.train[0]["input_ids"]) == 16
    with pytest.raises(DataError, match="packing"):
        build(tmp_path, [long], tiny_tokenizer, format="classification", num_labels=2, packing=True)


@pytest.mark.parametrize(
    ("fmt", "bad", "message"),
    [
        ("alpaca", {"instruction": "x"}, "record 1: field 'output': missing"),
        (
            "alpaca",
            {"instruction": 3, "output": "y"},
            "record 1: field 'instruction': expected a string, got int",
        ),
        ("text", {"body": "x"}, "record 1: field 'text': missing"),
        ("chat", {"messages": []}, "record 1: field 'messages': expected a non-empty list"),
        (
            "chat",
            {"messages": [{"role": "bot", "content": "x"}]},
            r"record 1: field 'messages\[0\].role': 'bot'",
        ),
        (
            "chat",
            {"messages": [{"role": "user", "content": "x"}]},
            "record 1: field 'messages': no assistant turn",
        ),
        (
            "sharegpt",
            {"conversations": [{"from": "gpt"}]},
            r"record 1: field 'conversations\[0\].value': missing",
        ),
    ],
)
def test_bad_records_name_the_record_and_field(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase, fmt: str, bad: dict[str, Any], message: str
) -> None:
    good_by_format: dict[str, dict[str, Any]] = {
        "alpaca": {"instruction": "x", "output": "y"},
        "text": {"text": "x"},
        "chat": {"messages": CONVERSATION},
        "sharegpt": {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
    }
    good = good_by_format[fmt]
    with pytest.raises(DataError, match=f"^data.jsonl {message}"):
        build(tmp_path, [good, bad], tiny_tokenizer, format=fmt)
