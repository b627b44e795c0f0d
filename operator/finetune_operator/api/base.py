"""Shared pydantic plumbing for the API models: camelCase names, CEL rules kept beside their Python twin.

A CEL rule runs in the API server at `kubectl apply`; the same rule in Python runs in `ftctl` and in the
operator, so a job that `ftctl plan` accepts is one the cluster accepts. Declaring both in one `Rule`
keeps the pair together; `tests/contract` checks that the server says the same as Python.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, GetJsonSchemaHandler, ValidationError, model_validator
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema


@dataclass(frozen=True)
class Rule:
    """One cross-field rule: `cel` for the API server, `check` for Python, one `message` for both."""

    cel: str
    message: str
    check: Callable[[Any], bool]


@dataclass(frozen=True)
class TransitionRule:
    """A rule on an update: `cel` may read `oldSelf` (the API server checks it only when the object
    changes); `check(old, new)` is the Python twin, for callers that hold both versions."""

    cel: str
    message: str
    check: Callable[[Any, Any], bool]


class ApiModel(BaseModel):
    """Base of every API object: camelCase on the wire, unknown fields refused, rules enforced."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=False,
        validate_default=True,
    )

    rules: ClassVar[tuple[Rule, ...]] = ()
    transition_rules: ClassVar[tuple[TransitionRule, ...]] = ()

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema = handler.resolve_ref_schema(handler(core_schema))
        rules: list[Rule | TransitionRule] = [*cls.rules, *cls.transition_rules]
        if rules:
            schema["x-kubernetes-validations"] = [{"rule": r.cel, "message": r.message} for r in rules]
        return schema

    @model_validator(mode="after")
    def _check_rules(self) -> ApiModel:
        for rule in type(self).rules:
            if not rule.check(self):
                raise ValueError(rule.message)
        return self


def describe_validation_error(error: ValidationError, root: str = "") -> str:
    """One line per problem, each naming the camelCase field path, for CLI output and status messages."""
    return "; ".join(describe_error_item(item, root) for item in error.errors())


def describe_error_item(item: Mapping[str, Any], root: str = "") -> str:
    """One problem of a ValidationError as `field.path: message`."""
    path = ".".join(str(part) for part in item["loc"] if part not in ("function-after",))
    path = f"{root}.{path}" if root and path else (root or path)
    message = str(item["msg"]).removeprefix("Value error, ")
    if item["type"] == "extra_forbidden":
        message = "unknown field"
    return f"{path}: {message}" if path else message
