"""The committed Grafana dashboards' queries, with Grafana's variables substituted as Grafana would."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

DASHBOARDS = sorted(
    (Path(__file__).resolve().parents[2] / "charts" / "finetune-operator" / "dashboards").glob("*.json")
)


def panels(variables: Mapping[str, str]) -> list[tuple[str, str, list[str]]]:
    """(dashboard uid, panel title, its queries) for every panel; `variables` maps `$name` to a value."""
    found = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            queries = []
            for target in panel["targets"]:
                expr = target["expr"]
                for name, value in variables.items():
                    expr = expr.replace(name, value)
                queries.append(expr)
            found.append((path.stem, panel["title"], queries))
    return found
