"""A tiny byte-level BPE tokenizer built offline, for every trainer test.

`build_tiny_tokenizer()` trains on a few hundred English sentences made from the word lists below, so it
needs no download and takes well under a second. Byte-level means every string round-trips through
encode/decode exactly and nothing is ever `<unk>`. It has pad/bos/eos/unk (plus cls/sep/mask for the
BERT-style models) and a ChatML chat template with `<|im_start|>`/`<|im_end|>`, so `apply_chat_template`
works like it does for Qwen-style instruct models. Nothing adds bos/eos on its own (like GPT-2/Qwen).
"""

from __future__ import annotations

import itertools
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 512
MODEL_MAX_LENGTH = 2048

PAD, UNK, BOS, EOS, MASK = "<pad>", "<unk>", "<s>", "</s>", "<mask>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, MASK, IM_START, IM_END]

# ChatML, as Qwen and many instruct models use it: each turn is <|im_start|>ROLE\nCONTENT<|im_end|>\n.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_SUBJECTS = [
    "The cat",
    "A small dog",
    "My neighbour",
    "The old teacher",
    "Every student",
    "The river",
    "A tired engineer",
    "The model",
    "Our team",
    "The weather",
    "This recipe",
    "The little bird",
    "The operator",
    "A careful reader",
    "The train",
    "Her brother",
    "The garden",
    "The computer",
    "A young farmer",
    "The city",
]
_PREDICATES = [
    "sleeps in the warm sun.",
    "runs across the green field.",
    "reads a long book every evening.",
    "answers every question with care.",
    "flows slowly to the sea.",
    "writes clear and simple code.",
    "learns something new each day.",
    "was cold and rainy this morning.",
    "needs more time to finish.",
    "sings a happy song at dawn.",
    "arrived late because of the storm.",
    "likes apples, bread and tea.",
    "is the capital of a large country.",
    "explains how the answer was found.",
    "counts one, two, three, four and five.",
]
_EXTRA = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.",
    "Below is an instruction that describes a task, paired with an input that provides further context.",
    "### Instruction:\n### Input:\n### Response:\n",
    "system user assistant human gpt",
    "You are a helpful assistant.",
    "What is the capital of France? The capital of France is Paris.",
    "Translate the sentence into French. Summarize the text below in one line.",
    "positive negative neutral label text output input instruction",
)


def corpus() -> list[str]:
    """The built-in training sentences: every subject with every predicate, plus the prompt words."""
    return [f"{s} {p}" for s, p in itertools.product(_SUBJECTS, _PREDICATES)] + list(_EXTRA)


def build_tiny_tokenizer(path: Path | None = None) -> PreTrainedTokenizerFast:
    """Train the tiny tokenizer; with `path`, also `save_pretrained` it there for `AutoTokenizer`."""
    raw = Tokenizer(models.BPE(unk_token=UNK))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=raw,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        cls_token=BOS,
        sep_token=EOS,
        mask_token=MASK,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=MODEL_MAX_LENGTH,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if path is not None:
        tokenizer.save_pretrained(str(path))
    return tokenizer
