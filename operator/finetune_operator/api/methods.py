"""The method table: what each tuning method is, written once.

Validation (the pydantic rules and their CEL twins in the CRD), the planner (which ZeRO stages to try,
whether to suggest gradient checkpointing, what cheaper method to suggest) and both method registries
(the estimator's `core/methods/` and the trainer image's `methods/`) are derived from this
table, so adding a method is a row here plus one module in each registry's folder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeVar

from pydantic.alias_generators import to_camel

from finetune_operator.api.base import Rule
from finetune_operator.api.enums import Method


@dataclass(frozen=True)
class MethodTraits:
    """What the rest of the system needs to know about one method.

    - `family`: the module both registries implement it in (`core/methods/<family>.py`,
      the trainer image's `methods/<family>.py`); variants of one family are options, as in PEFT.
    - `settings`: the `method.<block>`s it reads; any other block in its spec is refused.
    - `peft`: it trains a PEFT adapter (saved as an adapter, reloadable with PeftModel).
    - `quantized`: the frozen base loads in 4-bit (bitsandbytes), `dora`: LoRA with DoRA's magnitude.
    - `zero3`: DeepSpeed ZeRO-3 can partition it (virtual-token parameters hang the ranks under ZeRO-3).
    - `gradient_checkpointing`: it trains with checkpointing on (the HF Trainer enables it after PEFT
      wrapping, which drops prefix tuning's `past_key_values`: the shapes stop matching).
    - `packing`: several examples can share a row (`dataset.packing`); virtual tokens are prepended to
      the whole row and PEFT drops the position ids that keep packed examples apart.
    - `mergeable`: its trained weights merge into the base model on save (`output.saveMerged`).
    - `cheaper`: the method the planner suggests when this one does not fit, if any.
    """

    family: str
    settings: tuple[str, ...] = ()
    peft: bool = False
    quantized: bool = False
    dora: bool = False
    zero3: bool = True
    gradient_checkpointing: bool = True
    packing: bool = True
    mergeable: bool = False
    cheaper: Method | None = None


METHODS: Mapping[Method, MethodTraits] = MappingProxyType(
    {
        Method.FULL: MethodTraits(family="full", cheaper=Method.QLORA),
        Method.FREEZE: MethodTraits(family="freeze", settings=("freeze",), cheaper=Method.QLORA),
        Method.LORA: MethodTraits(
            family="lora", settings=("lora",), peft=True, mergeable=True, cheaper=Method.QLORA
        ),
        Method.QLORA: MethodTraits(
            family="lora", settings=("lora", "qlora"), peft=True, quantized=True, mergeable=True
        ),
        Method.DORA: MethodTraits(
            family="lora", settings=("lora",), peft=True, dora=True, mergeable=True, cheaper=Method.QLORA
        ),
        Method.PREFIX: MethodTraits(
            family="prefix",
            settings=("prefix",),
            peft=True,
            zero3=False,
            gradient_checkpointing=False,
            packing=False,
        ),
        Method.PROMPT: MethodTraits(
            family="prompt", settings=("prompt",), peft=True, zero3=False, packing=False
        ),
    }
)

T = TypeVar("T")


def build_registry(families: Mapping[str, Callable[[MethodTraits], T]]) -> Mapping[Method, T]:
    """A registry for every method of the table: its family's implementation, built with its traits.

    Both the estimator's and the trainer's registries are made here, so neither can miss a method; a
    family without an implementation is named at import time.
    """
    missing = sorted({t.family for t in METHODS.values()} - set(families))
    if missing:
        raise LookupError(f"method families without an implementation: {', '.join(missing)}")
    return MappingProxyType({method: families[t.family](t) for method, t in METHODS.items()})


#: Methods whose virtual-token parameters DeepSpeed cannot partition under ZeRO-3 (the ranks hang);
#: their trainable state is kilobytes, so ZeRO-2 loses nothing.
NO_ZERO3_METHODS = frozenset(m for m, t in METHODS.items() if not t.zero3)
#: Methods that cannot train with gradient checkpointing.
NO_CHECKPOINTING_METHODS = frozenset(m for m, t in METHODS.items() if not t.gradient_checkpointing)
#: Methods that cannot train on packed rows.
NO_PACKING_METHODS = frozenset(m for m, t in METHODS.items() if not t.packing)
#: Methods whose weights merge into the base on save.
MERGEABLE_METHODS = frozenset(m for m, t in METHODS.items() if t.mergeable)
#: Every settings block some method reads, in the table's order (the fields of `MethodSpec`).
SETTINGS_BLOCKS: tuple[str, ...] = tuple(dict.fromkeys(b for t in METHODS.values() for b in t.settings))


def _spoken(methods: frozenset[Method] | tuple[Method, ...]) -> str:
    """`lora, qlora or dora`, in the table's order."""
    ordered = [m.value for m in METHODS if m in methods]
    return " or ".join(filter(None, (", ".join(ordered[:-1]), *ordered[-1:])))


def _cel_list(methods: frozenset[Method] | tuple[Method, ...]) -> str:
    return "[" + ", ".join(f"'{m.value}'" for m in METHODS if m in methods) + "]"


def readers(block: str) -> tuple[Method, ...]:
    """The methods that read `method.<block>`."""
    return tuple(m for m, t in METHODS.items() if block in t.settings)


def _settings_rule(block: str) -> Rule:
    allowed = readers(block)
    return Rule(
        cel=f"!has(self.{block}) || self.type in {_cel_list(allowed)}",
        message=f"method.{block} is only for type {_spoken(allowed)}",
        check=lambda s: getattr(s, block) is None or s.type in allowed,
    )


#: `MethodSpec`'s rules: each method reads only its own settings blocks.
SETTINGS_RULES: tuple[Rule, ...] = tuple(_settings_rule(block) for block in SETTINGS_BLOCKS)


def _switch_rule(methods: frozenset[Method], block: str, attr: str, refusal: str) -> Rule:
    """`methods` refuse `<block>.<field>: true`, a switch the other methods may turn on."""
    field = to_camel(attr)  # the API's alias generator: the name the user writes
    return Rule(
        cel=f"!(self.method.type in {_cel_list(methods)}) || !has(self.{block}) || "
        f"!has(self.{block}.{field}) || !self.{block}.{field}",
        message=f"{_spoken(methods)} tuning does not {refusal}",
        check=lambda s: s.method.type not in methods or not getattr(getattr(s, block), attr),
    )


#: `FineTuneJobSpec`'s rules on method × distributed, × training and × dataset, from the same table.
ZERO3_RULE = Rule(
    cel=f"!(self.method.type in {_cel_list(NO_ZERO3_METHODS)}) || !has(self.distributed) || "
    "!has(self.distributed.zeroStage) || type(self.distributed.zeroStage) == string || "
    "int(self.distributed.zeroStage) < 3",
    message=f"{_spoken(NO_ZERO3_METHODS).replace(' or ', ' and ')} tuning do not run under "
    "distributed.zeroStage 3; use 0-2 or auto",
    check=lambda s: s.method.type not in NO_ZERO3_METHODS or s.distributed.zero_stage != 3,
)
CHECKPOINTING_RULE = _switch_rule(
    NO_CHECKPOINTING_METHODS,
    "training",
    "gradient_checkpointing",
    "run with training.gradientCheckpointing (recomputation drops its virtual keys and values)",
)
PACKING_RULE = _switch_rule(
    NO_PACKING_METHODS,
    "dataset",
    "packing",
    "train on dataset.packing rows (the virtual tokens would span every packed example)",
)

MERGE_RULE = Rule(
    cel="!has(self.output.saveMerged) || !self.output.saveMerged || "
    f"self.method.type in {_cel_list(MERGEABLE_METHODS)}",
    message=f"output.saveMerged only applies to {_spoken(MERGEABLE_METHODS)}",
    check=lambda s: not s.output.save_merged or s.method.type in MERGEABLE_METHODS,
)

#: The rules `FineTuneJobSpec` carries for the table (a rule about no method is left out).
SPEC_RULES: tuple[Rule, ...] = tuple(
    rule
    for methods, rule in (
        (NO_ZERO3_METHODS, ZERO3_RULE),
        (NO_CHECKPOINTING_METHODS, CHECKPOINTING_RULE),
        (NO_PACKING_METHODS, PACKING_RULE),
        (MERGEABLE_METHODS, MERGE_RULE),
    )
    if methods
)
