"""The architecture catalogue and HF config parsing: parameter counts must equal the published ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_operator.core.architecture import (
    ModelArchitecture,
    UnknownModelError,
    architecture_from_hf_config,
    catalogue_architecture,
    catalogue_names,
    load_hf_config,
)

# Parameter counts as `sum(p.numel() for p in model.parameters())` reports them (tied weights once).
PUBLISHED_PARAMS = {
    "meta-llama/Llama-2-7b-hf": 6_738_415_616,
    "meta-llama/Llama-3.1-8B": 8_030_261_248,
    "meta-llama/Llama-3.2-3B": 3_212_749_824,
    "meta-llama/Llama-3.2-1B": 1_235_814_400,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "Qwen/Qwen2.5-0.5B": 494_032_768,
    "google/gemma-2-2b": 2_614_341_888,
    "google-bert/bert-base-uncased": 109_482_240,
}

LLAMA_32_3B_CONFIG = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 28,
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "tie_word_embeddings": True,
    "max_position_embeddings": 131072,
}


@pytest.mark.parametrize(("name", "params"), sorted(PUBLISHED_PARAMS.items()))
def test_catalogue_parameter_counts_match_published(name: str, params: int) -> None:
    assert catalogue_architecture(name).total_params() == params


def test_every_catalogue_entry_loads_and_has_consistent_shapes() -> None:
    names = catalogue_names()
    assert len(names) >= 45
    for name in names:
        arch = catalogue_architecture(name)
        assert arch.q_dim % arch.kv_dim == 0
        assert arch.total_params() > arch.num_layers * arch.layer_params()


def test_lookup_is_case_insensitive_and_resolves_aliases_and_bare_names() -> None:
    base = catalogue_architecture("meta-llama/Llama-3.2-3B")
    assert catalogue_architecture("META-LLAMA/llama-3.2-3b") is base
    assert catalogue_architecture("meta-llama/Llama-3.2-3B-Instruct") is base
    assert catalogue_architecture("Llama-3.2-3B") is base
    assert catalogue_architecture("bert-base-uncased") is catalogue_architecture(
        "google-bert/bert-base-uncased"
    )


def test_unknown_model_names_close_matches() -> None:
    with pytest.raises(UnknownModelError, match="Llama-2-7b-hf") as info:
        catalogue_architecture("meta-llama/Llama-2-7b-hff")
    assert isinstance(info.value, ValueError)


def test_hf_config_matches_catalogue() -> None:
    assert architecture_from_hf_config(LLAMA_32_3B_CONFIG) == catalogue_architecture(
        "meta-llama/Llama-3.2-3B"
    )


def test_gemma2_head_dim_and_qwen2_bias_come_from_model_type() -> None:
    gemma = architecture_from_hf_config(
        {
            "model_type": "gemma2",
            "vocab_size": 256000,
            "hidden_size": 2304,
            "intermediate_size": 9216,
            "num_hidden_layers": 26,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "max_position_embeddings": 8192,
        }
    )
    assert gemma == catalogue_architecture("google/gemma-2-2b")
    assert gemma.q_dim == 2048 != gemma.hidden_size
    qwen = architecture_from_hf_config(
        {
            "model_type": "qwen2",
            "vocab_size": 151936,
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "tie_word_embeddings": True,
            "max_position_embeddings": 32768,
        }
    )
    assert qwen == catalogue_architecture("Qwen/Qwen2.5-0.5B")


def test_bert_config_is_an_encoder_with_a_plain_mlp() -> None:
    bert = architecture_from_hf_config(
        {
            "model_type": "bert",
            "vocab_size": 30522,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "max_position_embeddings": 512,
            "type_vocab_size": 2,
        }
    )
    assert bert == catalogue_architecture("google-bert/bert-base-uncased")
    assert (bert.kind, bert.mlp) == ("encoder", "plain")


def test_load_hf_config_from_file_and_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_32_3B_CONFIG))
    assert load_hf_config(tmp_path) == load_hf_config(tmp_path / "config.json")
    assert load_hf_config(tmp_path).num_kv_heads == 8


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "gpt2"}, "unsupported model_type"),
        ({"num_hidden_layers": None}, "num_hidden_layers"),
    ],
)
def test_bad_configs_are_refused(change: dict[str, object], message: str) -> None:
    config = {k: v for k, v in {**LLAMA_32_3B_CONFIG, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        architecture_from_hf_config(config)


def test_heads_must_divide_evenly() -> None:
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelArchitecture(32000, 4096, 11008, 32, 32, 5, False)


def test_unknown_model_without_close_matches_points_at_the_catalogue() -> None:
    with pytest.raises(UnknownModelError) as info:
        catalogue_architecture("acme/zzzz")
    assert str(info.value) == "unknown model 'acme/zzzz'; `ftctl models` lists the catalogue"
