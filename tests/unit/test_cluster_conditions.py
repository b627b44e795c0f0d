"""tools/cluster/cluster.py reads conditions the API server may not have set yet (a CRD just applied to a
busy control plane has `status.conditions: null`), and a node is schedulable only once untainted."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

CLUSTER_DIR = Path(__file__).resolve().parents[2] / "tools" / "cluster"


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(CLUSTER_DIR))  # the script imports `realnode` beside it
    return importlib.import_module("cluster")


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({}, False),
        ({"status": None}, False),
        ({"status": {"conditions": None}}, False),
        ({"status": {"conditions": [{"type": "NamesAccepted", "status": "True"}]}}, False),
        ({"status": {"conditions": [{"type": "Established", "status": "False"}]}}, False),
        ({"status": {"conditions": [{"type": "Established", "status": "True"}]}}, True),
    ],
)
def test_has_condition_reads_a_missing_or_null_status_as_not_yet(
    cluster: ModuleType, obj: dict[str, Any], expected: bool
) -> None:
    assert cluster.has_condition(obj, "Established") is expected


def test_a_ready_node_is_schedulable_only_without_the_not_ready_taint(cluster: ModuleType) -> None:
    ready: dict[str, Any] = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    assert cluster.schedulable(ready)
    tainted = {**ready, "spec": {"taints": [{"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}]}}
    assert not cluster.schedulable(tainted)
    assert not cluster.schedulable({"status": {"conditions": None}})
