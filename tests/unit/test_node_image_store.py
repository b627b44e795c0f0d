"""A real node's containerd root outlives clusters (tools/cluster/realnode.py), so the trainer image, 7 GB,
is loaded once. Only a rebuilt trainer starts the store afresh; a rebuilt operator, which comes with every
operator change, is replaced in place and leaves the trainer where it is."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

CLUSTER_DIR = Path(__file__).resolve().parents[2] / "tools" / "cluster"


@pytest.fixture
def realnode(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(CLUSTER_DIR))
    return importlib.import_module("realnode")


def node_with(realnode: ModuleType, tmp_path: Path, loaded: dict[str, str]) -> Any:
    """A node whose store holds some content and records `loaded` (image -> ID) as loaded before."""
    net = realnode.Network.for_cluster("unit")
    node = realnode.Node(net, 1, 2, tmp_path / "root", tmp_path / "images")
    (node.images / "io.containerd.content.v1.content").mkdir(parents=True)
    for image, image_id in loaded.items():
        realnode.loaded_marker(node, image).parent.mkdir(parents=True, exist_ok=True)
        realnode.loaded_marker(node, image).write_text(image_id)
    return node


LOADED = {"trainer": "t1", "operator": "o1", "pause": "p1"}


@pytest.mark.parametrize(
    ("built", "starts_afresh"),
    [
        ({"trainer": "t1", "operator": "o1", "pause": "p1"}, False),
        ({"trainer": "t1", "operator": "o2", "pause": "p1"}, False),
        ({"trainer": "t1", "operator": "o1", "pause": "p2"}, False),
        ({"operator": "o2"}, False),
        ({"trainer": "t2", "operator": "o1", "pause": "p1"}, True),
        ({"trainer": "t2", "operator": "o2", "pause": "p1"}, True),
    ],
)
def test_only_a_rebuilt_trainer_starts_a_nodes_image_store_afresh(
    realnode: ModuleType, tmp_path: Path, built: dict[str, str], starts_afresh: bool
) -> None:
    (operator,) = set(realnode.PROJECT_IMAGES) - {realnode.TRAINER_IMAGE}
    names = {"trainer": realnode.TRAINER_IMAGE, "operator": operator, "pause": realnode.PAUSE_IMAGE}
    node = node_with(realnode, tmp_path, {names[k]: v for k, v in LOADED.items()})
    said: list[str] = []
    realnode.drop_stale_images(node, {names[k]: v for k, v in built.items()}, said.append)
    assert node.images.exists() is not starts_afresh
    assert bool(said) is starts_afresh
    if starts_afresh:
        assert said == [f"real-1: {realnode.TRAINER_IMAGE} changed; starting its image store afresh"]


def test_a_node_that_never_loaded_the_trainer_keeps_its_store(realnode: ModuleType, tmp_path: Path) -> None:
    node = node_with(realnode, tmp_path, {})
    realnode.drop_stale_images(node, {realnode.TRAINER_IMAGE: "t1"}, print)
    assert node.images.exists()
