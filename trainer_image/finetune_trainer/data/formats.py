"""Record formats: one small function per format turns a record into tokens, registered by name.

Every function returns an `Example`: `input_ids` and per-token `labels` (-100 where no loss is taken) for
the language-modelling formats, or `input_ids` and one class index for classification. Missing or mistyped
fields raise `FieldError`; the caller adds the file and record index.

Special tokens: the language-modelling formats start with whatever the tokenizer puts in front of a text
on its own (bos for Llama, nothing for GPT-2/Qwen) and end the trained part with eos; the chat formats,
and alpaca when the tokenizer has a chat template, take all special tokens from the template instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
#: ShareGPT speaker names → chat-template roles.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
CHAT_ROLES = ("user", "assistant", "system")


class FieldError(ValueError):
    """A record lacks a field or has the wrong type there; `field` names it (dotted for nested fields)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"field {field!r}: {problem}")
        self.field = field


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    #: Per-token targets for causal LM (IGNORE_INDEX = no loss); None for classification.
    labels: list[int] | None = None
    #: Class index for classification; None otherwise.
    label: int | None = None
    #: A packed block: the lengths of the whole examples in it, in order (see `packing.pack`); else ().
    segments: tuple[int, ...] = ()


@dataclass(frozen=True)
class EncodeContext:
    tokenizer: PreTrainedTokenizerBase
    max_seq_length: int
    #: classification only: labels must lie in [0, num_labels).
    num_labels: int = 0
    #: classification only: raw label value (int, or str name) → class index; see `build_label_index`.
    label_index: Mapping[int | str, int] = field(default_factory=dict)


EncodeFn = Callable[[Mapping[str, Any], EncodeContext], Example]


@dataclass(frozen=True)
class Format:
    """A registered format: how to encode a record and what the pipeline may do with the result."""

    encode: EncodeFn
    task: Literal["causal-lm", "classification"]
    #: Only some tokens carry loss, so truncation can leave none; such examples are dropped and counted.
    masks_prompt: bool
    #: Fields a record needs, for the documentation and error messages.
    fields: tuple[str, ...]


# --- helpers ------------------------------------------------------------------------------------------


def _text(record: Mapping[str, Any], name: str, *, optional: bool = False) -> str:
    value = record.get(name)
    if value is None and optional:
        return ""
    if value is None:
        raise FieldError(name, "missing")
    if not isinstance(value, str):
        raise FieldError(name, f"expected a string, got {type(value).__name__}")
    return value


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def _leading_special_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens the tokenizer puts in front of any text (e.g. Llama's bos); [] for GPT-2/Qwen style."""
    with_special: list[int] = tokenizer("a")["input_ids"]
    plain = _encode(tokenizer, "a")
    start = with_special.index(plain[0]) if plain and plain[0] in with_special else 0
    return with_special[:start]


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def _eos(tokenizer: PreTrainedTokenizerBase) -> int:
    eos = tokenizer.eos_token_id
    if not isinstance(eos, int):
        raise FieldError("tokenizer.eos_token", "the tokenizer has no eos token to end a target with")
    return eos


# --- formats ------------------------------------------------------------------------------------------


def encode_alpaca(record: Mapping[str, Any], ctx: EncodeContext) -> Example:
    """instruction, input (optional), output: loss on the output and its end token only.

    With a chat template (an instruct or chat model's tokenizer has one), the record becomes one user turn
    (instruction, then input on the next line, as LLaMA-Factory joins them) and one assistant turn,
    rendered and masked like the chat formats: the model learns in the format it will be prompted in.
    Without one (base models), the Stanford Alpaca prompt and eos.
    """
    instruction = _text(record, "instruction")
    given = _text(record, "input", optional=True)
    output = _text(record, "output")
    if has_chat_template(ctx.tokenizer):
        question = f"{instruction}\n{given}" if given.strip() else instruction
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": output}]
        return encode_messages(messages, ctx, "instruction")
    template = ALPACA_PROMPT if given.strip() else ALPACA_PROMPT_NO_INPUT
    prompt = _leading_special_ids(ctx.tokenizer) + _encode(
        ctx.tokenizer, template.format(instruction=instruction, input=given)
    )
    target = [*_encode(ctx.tokenizer, output), _eos(ctx.tokenizer)]
    return Example(input_ids=prompt + target, labels=[IGNORE_INDEX] * len(prompt) + target)


def encode_text(record: Mapping[str, Any], ctx: EncodeContext) -> Example:
    """text: plain causal language modelling, every token trained, eos appended."""
    ids = [*_leading_special_ids(ctx.tokenizer), *_encode(ctx.tokenizer, _text(record, "text"))]
    ids.append(_eos(ctx.tokenizer))
    return Example(input_ids=ids, labels=list(ids))


def _messages(
    record: Mapping[str, Any], key: str, role_key: str, text_key: str, roles: Mapping[str, str]
) -> list[dict[str, str]]:
    turns = record.get(key)
    if turns is None:
        raise FieldError(key, "missing")
    if not isinstance(turns, list) or not turns:
        raise FieldError(key, "expected a non-empty list of turns")
    messages = []
    for number, turn in enumerate(turns):
        where = f"{key}[{number}]"
        if not isinstance(turn, Mapping):
            raise FieldError(where, "expected an object")
        speaker = turn.get(role_key)
        if not isinstance(speaker, str) or speaker not in roles:
            raise FieldError(f"{where}.{role_key}", f"{speaker!r} is not one of {', '.join(roles)}")
        try:
            content = _text(turn, text_key)
        except FieldError as err:
            raise FieldError(f"{where}.{err.field}", str(err).partition(": ")[2]) from err
        messages.append({"role": roles[speaker], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise FieldError(key, "no assistant turn to train on")
    return messages


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]], *, generation: bool, key: str
) -> str:
    try:
        text = tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=generation
        )
    except TemplateError as err:
        raise FieldError(key, f"chat template refused the conversation: {err}") from err
    if not isinstance(text, str):
        raise TypeError("apply_chat_template(tokenize=False) did not return a string")
    return text


_TRAILING_SPACE = re.compile(r"\s*\Z")


def encode_messages(messages: Sequence[Mapping[str, str]], ctx: EncodeContext, key: str) -> Example:
    """Render through the chat template; loss only on each assistant turn's content and end-of-turn token.

    The assistant spans come from rendering incrementally: turn i's trained text starts where the
    conversation before it plus the generation prompt (`<|im_start|>assistant\\n`) ends, and stops where
    the conversation through turn i ends, minus trailing whitespace (ChatML's newline after `<|im_end|>`).
    Tokens are trained when they start inside a span (offsets of one tokenization of the full text).
    A template whose earlier renderings are not prefixes of later ones cannot be masked this way.
    """
    tokenizer = ctx.tokenizer
    if not tokenizer.is_fast:
        raise FieldError(key, "masking chat turns needs a fast tokenizer (offset mapping)")
    if not has_chat_template(tokenizer):
        raise FieldError(key, "the tokenizer has no chat template")
    full = _render(tokenizer, messages, generation=False, key=key)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], generation=True, key=key)
        through = _render(tokenizer, messages[: index + 1], generation=False, key=key)
        if not (full.startswith(through) and through.startswith(before)):
            raise FieldError(key, "the chat template does not render turns as prefixes; cannot mask turns")
        end = len(through) - len(_TRAILING_SPACE.search(through).group())  # type: ignore[union-attr]
        spans.append((len(before), end))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = encoded["input_ids"]
    labels = [
        token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
        for token, (begin, _) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    return Example(input_ids=ids, labels=labels)


def encode_chat(record: Mapping[str, Any], ctx: EncodeContext) -> Example:
    """messages: [{role: user|assistant|system, content}] through the chat template."""
    return encode_messages(
        _messages(record, "messages", "role", "content", {r: r for r in CHAT_ROLES}), ctx, "messages"
    )


def encode_sharegpt(record: Mapping[str, Any], ctx: EncodeContext) -> Example:
    """conversations: [{from: human|gpt|system, value}] through the chat template."""
    return encode_messages(
        _messages(record, "conversations", "from", "value", SHAREGPT_ROLES), ctx, "conversations"
    )


def encode_classification(record: Mapping[str, Any], ctx: EncodeContext) -> Example:
    """text, label: the tokenizer's own special tokens ([CLS] … [SEP]), truncated to max_seq_length."""
    text = _text(record, "text")
    index = ctx.label_index.get(label_key(record))
    if index is None or not 0 <= index < ctx.num_labels:
        raise FieldError("label", f"{record['label']!r} is not a class in [0, {ctx.num_labels}) (numLabels)")
    ids: list[int] = ctx.tokenizer(text, truncation=True, max_length=ctx.max_seq_length)["input_ids"]
    return Example(input_ids=ids, label=index)


def label_key(record: Mapping[str, Any]) -> int | str:
    """A record's raw label: an int, a decimal string ("3", as CSV gives it) as that int, or a name."""
    value = record.get("label")
    if value is None:
        raise FieldError("label", "missing")
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise FieldError("label", f"expected an int or a string, got {type(value).__name__}")
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value


def build_label_index(labels: Sequence[int | str], num_labels: int) -> dict[int | str, int]:
    """Map raw labels (see `label_key`) to class indices.

    Integer labels are the class index itself; `encode_classification` checks each lies in
    [0, num_labels). String labels are class names: the sorted list of distinct names gives the indices
    (["neg", "pos"] → neg=0, pos=1), so every worker and every run agrees. Mixing integers and names, or
    more names than num_labels, raises ValueError; the caller turns it into a DataError.
    """
    names = sorted({label for label in labels if isinstance(label, str)})
    numbers = sorted({label for label in labels if isinstance(label, int)})
    if names and numbers:
        raise ValueError(f"labels mix class indices (e.g. {numbers[0]}) and class names (e.g. {names[0]!r})")
    if len(names) > num_labels:
        raise ValueError(
            f"{len(names)} distinct label names but numLabels is {num_labels}: {', '.join(names)}"
        )
    if names:
        return {name: index for index, name in enumerate(names)}
    return {number: number for number in numbers}


#: The registry: dataset.format → Format. Its keys are exactly DatasetSpec.format's values (tested).
FORMATS: dict[str, Format] = {
    "alpaca": Format(
        encode_alpaca, "causal-lm", masks_prompt=True, fields=("instruction", "input", "output")
    ),
    "sharegpt": Format(encode_sharegpt, "causal-lm", masks_prompt=True, fields=("conversations",)),
    "chat": Format(encode_chat, "causal-lm", masks_prompt=True, fields=("messages",)),
    "text": Format(encode_text, "causal-lm", masks_prompt=False, fields=("text",)),
    "classification": Format(
        encode_classification, "classification", masks_prompt=False, fields=("text", "label")
    ),
}
