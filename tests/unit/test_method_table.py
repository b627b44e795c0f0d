"""The method table is the one place a method is described; everything derived from it agrees."""

from __future__ import annotations

import pytest

from finetune_operator.api.enums import Method
from finetune_operator.api.methods import METHODS, SETTINGS_BLOCKS, MethodTraits, build_registry
from finetune_operator.api.models import MethodSpec
from finetune_operator.core.methods import FAMILIES, REGISTRY


def test_every_method_has_a_row_and_an_estimator_model_of_its_family() -> None:
    assert set(METHODS) == set(Method)
    assert set(REGISTRY) == set(Method)
    for method, traits in METHODS.items():
        assert type(REGISTRY[method]) is FAMILIES[traits.family]
        assert REGISTRY[method].traits == traits  # type: ignore[attr-defined]


def test_settings_blocks_are_exactly_the_method_specs_blocks() -> None:
    blocks = set(MethodSpec.model_fields) - {"type"}
    assert set(SETTINGS_BLOCKS) == blocks
    assert len(MethodSpec.rules) == len(blocks)  # one "only for type …" rule per block


def test_a_family_without_an_implementation_is_named_at_import() -> None:
    def identity(traits: MethodTraits) -> MethodTraits:
        return traits

    families = dict.fromkeys(("full", "freeze", "lora", "prefix"), identity)
    with pytest.raises(LookupError, match="prompt"):
        build_registry(families)


def test_variants_are_options_of_one_family() -> None:
    lora = {m for m, t in METHODS.items() if t.family == "lora"}
    assert lora == {Method.LORA, Method.QLORA, Method.DORA}
    assert [m for m in lora if METHODS[m].quantized] == [Method.QLORA]
    assert [m for m in lora if METHODS[m].dora] == [Method.DORA]
