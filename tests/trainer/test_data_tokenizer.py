"""The tiny test tokenizer itself: offline load, special tokens, chat template, exact round trip."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .tokenizer import CHAT_TEMPLATE, IM_END, IM_START, VOCAB_SIZE


def test_saved_tokenizer_loads_offline_with_special_tokens(tiny_tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir, local_files_only=True)
    assert len(tokenizer) == VOCAB_SIZE
    ids = {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id}
    assert None not in ids and len(ids) == 4
    assert tokenizer.chat_template == CHAT_TEMPLATE
    start, end = (tokenizer.convert_tokens_to_ids(token) for token in (IM_START, IM_END))
    assert tokenizer(f"{IM_START}user\nhi{IM_END}")["input_ids"][0] == start
    assert tokenizer(f"{IM_START}user\nhi{IM_END}")["input_ids"][-1] == end


def test_chat_template_renders_chatml(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nHi.<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
    prompt = tiny_tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nHi.<|im_end|>\n<|im_start|>assistant\n"


def test_byte_level_round_trip_never_unknown(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    text = "Zürich → 42 ✓ qwxz"
    ids = tiny_tokenizer(text)["input_ids"]
    assert tiny_tokenizer.unk_token_id not in ids
    assert tiny_tokenizer.decode(ids) == text
    # Trained merges: a corpus sentence takes far fewer tokens than bytes.
    assert len(tiny_tokenizer("The cat sleeps in the warm sun.")["input_ids"]) < 20
