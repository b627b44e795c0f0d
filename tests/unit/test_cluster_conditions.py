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


def test_a_wait_that_times_out_names_what_its_last_poll_still_waited_on(cluster: ModuleType) -> None:
    waiting: list[str] = []

    def established() -> bool:
        waiting[:] = ["a.example.com", "b.example.com"]
        return False

    realnode = importlib.import_module("realnode")
    with pytest.raises(realnode.NodeError, match=r"CRDs a\.example\.com, b\.example\.com not ready after 0s"):
        realnode.wait_for(lambda: f"CRDs {', '.join(waiting)}", established, 0, interval=0)


@pytest.mark.parametrize(
    ("raised", "reported"),
    [("NodeError", "ClusterError"), ("TimeoutExpired", "ClusterError"), ("TypeError", "TypeError")],
)
def test_up_takes_down_a_cluster_whatever_stops_it_from_populating(
    cluster: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, raised: str, reported: str
) -> None:
    """A known failure is one ClusterError, a bug is itself; either way nothing half-made keeps running."""
    realnode = importlib.import_module("realnode")
    errors = {
        "NodeError": realnode.NodeError("kubelet of node-0 not ready"),
        "TimeoutExpired": cluster.subprocess.TimeoutExpired(["kubectl"], 120),
        "TypeError": TypeError("a bug"),
    }
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for binary in [*cluster.BINARIES.values(), "kwokctl", "kubectl"]:
        (bin_dir / binary).touch()
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text("pools: []\n")
    downed: list[str] = []
    monkeypatch.setattr(cluster, "BIN", bin_dir)
    monkeypatch.setattr(cluster, "cluster_dir", lambda name: tmp_path / "clusters" / name)
    monkeypatch.setattr(cluster, "render_nodes", lambda spec: [])
    monkeypatch.setattr(cluster, "kwokctl_config", lambda name, net: tmp_path / "kwokctl.yaml")
    monkeypatch.setattr(cluster, "run", lambda args, **kw: "")
    monkeypatch.setattr(cluster, "down", lambda name, kubeconfig: downed.append(name))

    def populate(*args: Any) -> None:
        raise errors[raised]

    monkeypatch.setattr(cluster, "populate", populate)
    with pytest.raises(BaseException) as caught:
        cluster.up("c1", tmp_path / "kubeconfig", nodes, tmp_path / "crds")
    assert type(caught.value).__name__ == reported
    assert downed == ["c1"]
