"""Generate the FineTuneJob CustomResourceDefinition from the pydantic models.

The models are the one source of truth; this module turns their JSON Schema into the structural OpenAPI
subset the API server accepts (no $ref, no null types, int-or-string marked, CEL rules attached).
Run `python -m finetune_operator.api.crd --write` (or `make crds`); a test fails when `crds/` is stale.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from finetune_operator.api.models import (
    CATEGORIES,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    VERSION,
    FineTuneJobSpec,
    FineTuneJobStatus,
)

CRD_FILE = f"{PLURAL}.{GROUP}.yaml"
#: Where the generated CRD is written: the plain manifest and the Helm chart's copy.
CRD_TARGETS = (Path("crds") / CRD_FILE, Path("charts/finetune-operator/crds") / CRD_FILE)

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Method", "type": "string", "jsonPath": ".spec.method.type"},
    {"name": "GPUs", "type": "integer", "jsonPath": ".status.plan.gpus"},
    {"name": "Nodes", "type": "integer", "jsonPath": ".status.plan.nodes"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.display"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
    {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta"},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "GPU", "type": "string", "jsonPath": ".status.plan.gpuType", "priority": 1},
    {"name": "ZeRO", "type": "integer", "jsonPath": ".status.plan.zeroStage", "priority": 1},
    {"name": "Memory/GPU", "type": "string", "jsonPath": ".status.plan.memoryPerGpu", "priority": 1},
    {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
]

_DROPPED_KEYS = {"title", "$defs"}


def _structural(node: Any, defs: Mapping[str, Any]) -> Any:
    """Rewrite one JSON Schema node (recursively) into the API server's structural schema dialect."""
    if isinstance(node, list):
        return [_structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs)
    if "anyOf" in node:
        return _structural(_collapse_any_of(node, defs), defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS or (key == "default" and value is None):
            continue
        if key == "additionalProperties" and isinstance(value, bool):
            # False: the API server prunes and (with strict field validation) rejects unknown fields;
            # True (a free-form object) is said with x-kubernetes-preserve-unknown-fields instead.
            continue
        if key == "const":
            out["enum"] = [value]
            out.setdefault("type", "string")
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out[key.replace("exclusive", "").lower()] = value
            out[key] = True
        elif key == "properties":
            out[key] = {name: _structural(prop, defs) for name, prop in value.items()}
        else:
            out[key] = _structural(value, defs)
    return out


def _collapse_any_of(node: dict[str, Any], defs: Mapping[str, Any]) -> dict[str, Any]:
    """`X | None` becomes X; `int | 'auto'` becomes int-or-string; unions of string enums become one enum."""
    rest = {k: v for k, v in node.items() if k != "anyOf"}
    options = [_structural(o, defs) for o in node["anyOf"] if o.get("type") != "null"]
    if rest.pop("x-kubernetes-int-or-string", False):
        return {**rest, "x-kubernetes-int-or-string": True}
    if len(options) == 1:
        return {**options[0], **rest}
    if all("enum" in o for o in options):
        return {**rest, "type": "string", "enum": [v for o in options for v in o["enum"]]}
    raise ValueError(f"cannot express union in a structural schema: {node}")


def _schema_of(model: type[FineTuneJobSpec] | type[FineTuneJobStatus]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    result: dict[str, Any] = _structural(raw, raw.get("$defs", {}))
    return result


def _mark_conditions(status: dict[str, Any]) -> None:
    """Conditions are a map keyed by type, so server-side apply merges them per type."""
    conditions = status["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    conditions["items"]["required"] = sorted(
        {"type", "status"} | set(conditions["items"].get("required", []))
    )


def build_crd() -> dict[str, Any]:
    """The whole CustomResourceDefinition object as a dict."""
    spec = _schema_of(FineTuneJobSpec)
    status = _schema_of(FineTuneJobStatus)
    _mark_conditions(status)
    root = {
        "type": "object",
        "description": "A fine-tuning job: the operator plans GPUs and ZeRO, runs the workers and reports progress.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "API version: finetune.dev/v1alpha1."},
            "kind": {"type": "string", "description": "FineTuneJob."},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": list(SHORT_NAMES),
                "categories": list(CATEGORIES),
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def render_crd() -> str:
    header = "# Generated by `make crds` from finetune_operator.api.models. Do not edit.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the FineTuneJob CRD from the API models.")
    parser.add_argument("--write", action="store_true", help="write crds/ and the chart's copy")
    parser.add_argument("--check", action="store_true", help="exit 1 when a committed copy is stale")
    parser.add_argument("--root", type=Path, default=Path("."), help="repository root")
    args = parser.parse_args(argv)
    text = render_crd()
    if not (args.write or args.check):
        sys.stdout.write(text)
        return 0
    stale = []
    for target in CRD_TARGETS:
        path = args.root / target
        if args.write:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        elif not path.exists() or path.read_text() != text:
            stale.append(str(target))
    if stale:
        print(f"stale: {', '.join(stale)}; run `make crds`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
