"""The informer's store: newer versions win, deletions are not undone by a late write-through, a relist
replaces everything, and the pod index follows labels; the trimmed pod reads as the whole one."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from operator_fixtures import pod_doc

from finetune_operator.adapters.informer import Store, namespace_matches
from finetune_operator.controller import pod_job_label, without_managed_fields
from finetune_operator.core import names
from finetune_operator.core.status import read_worker, worker_fields


def obj(name: str, version: int, namespace: str = "ns", **labels: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "resourceVersion": str(version),
            "labels": labels,
        }
    }


def pods() -> Store:
    return Store(index=pod_job_label)


def test_a_newer_version_replaces_an_older_one_and_not_the_reverse() -> None:
    store = Store()
    assert store.upsert(obj("a", 5))
    assert not store.upsert(obj("a", 4))  # a watch event older than our own write's result
    assert store.get("ns", "a") == obj("a", 5)
    assert store.upsert(obj("a", 6))
    assert store.get("ns", "a") == obj("a", 6)


def test_a_write_through_after_the_deletion_event_does_not_bring_the_object_back() -> None:
    store = Store()
    store.upsert(obj("a", 5))
    store.remove(obj("a", 9))  # the watch's DELETED event carries the last version
    assert not store.upsert(obj("a", 7))  # the create's response, returned after the deletion was seen
    assert store.get("ns", "a") is None
    assert store.upsert(obj("a", 12))  # a new object of the same name, created later
    assert store.get("ns", "a") == obj("a", 12)


def test_the_index_follows_label_changes_and_deletions() -> None:
    store = pods()
    label = names.LABEL_JOB_NAME
    store.upsert(obj("w0", 1, **{label: "job"}))
    store.upsert(obj("w1", 2, **{label: "job"}))
    store.upsert(obj("w0", 3, **{label: "other"}))
    assert [p["metadata"]["name"] for p in store.indexed("ns", "job")] == ["w1"]
    assert [p["metadata"]["name"] for p in store.indexed("ns", "other")] == ["w0"]
    store.remove(obj("w1", 4, **{label: "job"}))
    assert store.indexed("ns", "job") == [] and ("ns", "job") not in store.by_index
    assert store.indexed("elsewhere", "other") == []


def test_a_relist_replaces_the_store_and_reports_what_changed() -> None:
    store = pods()
    label = names.LABEL_JOB_NAME
    store.upsert(obj("same", 1, **{label: "j"}))
    store.upsert(obj("gone", 2, **{label: "j"}))
    store.upsert(obj("changed", 3, **{label: "j"}))
    store.remove(obj("deleted", 4))
    changed = store.replace(
        [obj("same", 1, **{label: "j"}), obj("changed", 5, **{label: "j"}), obj("new", 6)]
    )
    assert changed == {("ns", "gone"), ("ns", "changed"), ("ns", "new")}
    assert sorted(p["metadata"]["name"] for p in store.indexed("ns", "j")) == ["changed", "same"]
    assert store.tombstones == {}  # the list is the truth now


def test_tombstones_are_pruned_so_a_soak_of_deletions_holds_no_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = Store()
    clock = iter(range(0, 10_000, 10))
    monkeypatch.setattr("finetune_operator.adapters.informer.time.monotonic", lambda: float(next(clock)))
    for i in range(500):
        store.remove(obj(f"p{i}", i))
    assert len(store.tombstones) <= 64 + 13  # 120 s of them at 10 s apart, plus the last batch


@pytest.mark.parametrize(
    "state",
    [
        {"phase": "Failed", "exit_code": 137, "reason": "OOMKilled", "finished_at": "2025-01-01T00:00:00Z"},
        {"phase": "Succeeded", "exit_code": 0},
        {"phase": "Pending", "node": None, "unschedulable": "0/3 nodes are available"},
        {"phase": "Pending", "node": None, "gated": True},
        {"phase": "Pending", "waiting": "ImagePullBackOff", "message": "no such image"},
        {"phase": "Running", "deleting": True, "ready": False, "disruption": "PreemptionByScheduler"},
        {"phase": "Running", "progress": '{"step": 3}', "template_hash": "abc", "attempt": 2},
    ],
)
def test_the_stores_trim_what_nobody_reads(state: dict[str, Any]) -> None:
    pod = pod_doc(0, **state)
    pod["metadata"]["managedFields"] = [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}]
    pod["spec"]["containers"] = [{"name": "trainer", "image": "img", "env": [{"name": "X", "value": "1"}]}]
    addresses = {
        "hostIP": "10.0.0.1",
        "podIP": "10.1.0.7",
        "podIPs": [{"ip": "10.1.0.7"}],
        "qosClass": "Guaranteed",
    }
    pod["status"].update(addresses)
    for container in pod["status"].get("containerStatuses") or []:
        container.update(image="img", imageID="sha256:1", containerID="containerd://2", ready=True)
    trimmed = worker_fields(pod)
    assert read_worker(trimmed) == read_worker(pod)
    assert "managedFields" not in trimmed["metadata"] and "containers" not in trimmed["spec"]
    assert not addresses.keys() & trimmed["status"].keys()
    kept = [set(c) for c in trimmed["status"].get("containerStatuses") or []]
    assert all(c <= {"name", "state", "lastState"} for c in kept)
    job = {"metadata": {"name": "j", "managedFields": [{"manager": "kubectl"}]}, "spec": {}}
    before = copy.deepcopy(job)
    assert without_managed_fields(job) == {"metadata": {"name": "j"}, "spec": {}}
    assert job == before  # the watch's document is not changed under the caller


def test_stored_documents_share_their_keys_and_short_strings() -> None:
    """Each document json decodes has its own copy of every key; the store keeps one of each, and the
    documents still read the same."""
    store = pods()
    text = json.dumps(pod_doc(0, progress='{"step": 3}'))
    first, second = json.loads(text), json.loads(text)
    second["metadata"]["name"] = "tiny-worker-1"
    assert next(iter(first)) is not next(iter(second))
    store.upsert(first)
    store.upsert(second)
    held = [store.get("team-a", name) for name in ("tiny-worker-0", "tiny-worker-1")]
    assert held[0] == json.loads(text)
    assert held[0] is not None and held[1] is not None
    keys = [list(doc["metadata"]) for doc in held]
    assert all(a is b for a, b in zip(*keys, strict=True))
    phases = [doc["status"]["phase"] for doc in held]
    assert phases[0] is phases[1] == "Running"


@pytest.mark.parametrize(
    ("namespace", "patterns", "served"),
    [
        ("team-a", (), True),
        ("team-a", ("team-*",), True),
        ("other", ("team-*", "ml"), False),
        ("ml", ("ml",), True),
    ],
)
def test_namespace_patterns(namespace: str, patterns: tuple[str, ...], served: bool) -> None:
    assert namespace_matches(namespace, patterns) is served
