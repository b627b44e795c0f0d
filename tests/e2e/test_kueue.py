"""Jobs with `runPolicy.queueName` under the real Kueue (built from its Go module, tests/e2e/kueue.py) on
the local cluster's fake GPU nodes: gated and Queued while the quota is taken, admitted when it frees,
queue time not charged to activeDeadlineSeconds, and preemption by a higher-priority workload restarting
the gang as a disruption."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes.client import CoreV1Api, CustomObjectsApi, SchedulingV1Api, V1ObjectMeta, V1PriorityClass
from kubernetes.client.exceptions import ApiException

from finetune_operator.core.status import KUEUE_GATE

from .conftest import Cluster
from .harness import (
    Operator,
    all_running,
    condition,
    create,
    eventually,
    finish_all,
    get,
    phase_is,
    set_run_policy,
    two_nodes,
    wait_job,
    wait_pods,
    worker_pods,
)
from .kueue import KUEUE_GROUP, KUEUE_VERSION, Kueue

pytestmark = pytest.mark.cluster

#: The reason Kueue's TerminationTarget condition gives a pod of a workload it preempted.
PREEMPTED = "WorkloadEvictedDueToPreempted"
#: The ClusterQueue's GPUs: one two-node gang of 8-GPU workers (16) at a time.
GPU_QUOTA = 16


@pytest.fixture(scope="module")
def kueue(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kueue]:
    with Kueue(cluster, tmp_path_factory.mktemp("kueue")) as running:
        yield running
        print(f"--- kueue log ({running.log}) ---\n{running.tail(60)}")


def kueue_object(
    api: CustomObjectsApi, plural: str, body: dict[str, Any], namespace: str | None = None
) -> None:
    body = {"apiVersion": f"{KUEUE_GROUP}/{KUEUE_VERSION}", **body}
    if namespace is None:
        api.create_cluster_custom_object(KUEUE_GROUP, KUEUE_VERSION, plural, body)
    else:
        api.create_namespaced_custom_object(KUEUE_GROUP, KUEUE_VERSION, namespace, plural, body)


@pytest.fixture
def queue(kueue: Kueue, api: CustomObjectsApi, operator: Operator) -> Iterator[str]:
    """A LocalQueue in the test's namespace, over a ClusterQueue of its own with GPU_QUOTA GPUs that
    preempts lower-priority workloads; its name."""
    ns, name = operator.namespace, f"e2e-{uuid.uuid4().hex[:8]}"
    big = "100Ti"
    kueue_object(api, "resourceflavors", {"kind": "ResourceFlavor", "metadata": {"name": name}})
    kueue_object(
        api,
        "clusterqueues",
        {
            "kind": "ClusterQueue",
            "metadata": {"name": name},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                "preemption": {"withinClusterQueue": "LowerPriority"},
                "resourceGroups": [
                    {
                        "coveredResources": ["nvidia.com/gpu", "cpu", "memory", "ephemeral-storage"],
                        "flavors": [
                            {
                                "name": name,
                                "resources": [
                                    {"name": "nvidia.com/gpu", "nominalQuota": GPU_QUOTA},
                                    {"name": "cpu", "nominalQuota": 10_000},
                                    {"name": "memory", "nominalQuota": big},
                                    {"name": "ephemeral-storage", "nominalQuota": big},
                                ],
                            }
                        ],
                    }
                ],
            },
        },
    )
    kueue_object(
        api,
        "localqueues",
        {"kind": "LocalQueue", "metadata": {"name": "team"}, "spec": {"clusterQueue": name}},
        ns,
    )
    yield "team"
    for plural in ("clusterqueues", "resourceflavors"):
        with contextlib.suppress(ApiException):
            api.delete_cluster_custom_object(KUEUE_GROUP, KUEUE_VERSION, plural, name)


def gated(pods: list[Any]) -> bool:
    return bool(pods) and all(
        KUEUE_GATE in [g.name for g in p.spec.scheduling_gates or []]
        for p in pods
        if not p.metadata.deletion_timestamp
    )


def test_a_job_waits_queued_while_the_quota_is_taken_and_runs_when_it_frees(
    api: CustomObjectsApi, core: CoreV1Api, operator: Operator, queue: str, kueue: Kueue
) -> None:
    """Two gangs of 16 GPUs in a queue of 16: the second is gated by Kueue and Queued, for longer than its
    activeDeadlineSeconds without failing (queue time is not charged), then admitted when the first
    finishes, and succeeds."""
    ns, deadline = operator.namespace, 15
    create(api, ns, two_nodes("first", queueName=queue))
    wait_pods(core, ns, "first", all_running(2), "the first gang admitted and running", timeout=90)
    wait_job(api, operator, "first", phase_is("Running"), "first Running")

    create(api, ns, two_nodes("second", queueName=queue, activeDeadlineSeconds=deadline))
    wait_pods(core, ns, "second", lambda pods: len(pods) == 2 and gated(pods), "a gated second gang")
    status = wait_job(api, operator, "second", phase_is("Queued"), "second Queued")
    assert condition(status, "Scheduled")["reason"] == "Queued"
    assert "LocalQueue team" in status["message"] and "startTime" not in status, status
    time.sleep(deadline + 5)  # queued for longer than the deadline
    status = get(api, ns, "second")["status"]
    assert status["phase"] == "Queued", f"{status}\n{operator.tail()}\n{kueue.tail()}"

    finish_all(core, ns, "first", 0)
    wait_job(api, operator, "first", phase_is("Succeeded"), "first Succeeded")
    wait_pods(core, ns, "second", all_running(2), "the second gang admitted once the quota freed", timeout=90)
    status = wait_job(api, operator, "second", phase_is("Running"), "second Running")
    assert status.get("startTime"), status  # the deadline clock starts at admission
    finish_all(core, ns, "second", 0)
    status = wait_job(api, operator, "second", phase_is("Succeeded"), "second Succeeded")
    assert status.get("restarts", 0) == 0 and status.get("disruptions", 0) == 0, status
    labels = [p.metadata.labels for p in worker_pods(core, ns, "first") + worker_pods(core, ns, "second")]
    assert len({label["kueue.x-k8s.io/pod-group-name"] for label in labels}) == 2  # one group per gang


def test_a_higher_priority_job_preempts_through_kueue_and_the_preempted_one_resumes_as_a_disruption(
    api: CustomObjectsApi, core: CoreV1Api, operator: Operator, queue: str, kueue: Kueue, cluster: Cluster
) -> None:
    """A running gang of low priority with backoffLimit 0 is preempted by Kueue for a high-priority one
    (TerminationTarget, reason WorkloadEvictedDueToPreempted, pods deleted; KWOK stops them as a kubelet
    would): a disruption, not a failure. It queues
    again, runs when the high-priority job is done, and succeeds."""
    ns = operator.namespace
    scheduling = SchedulingV1Api(cluster.api_client)
    low, high = f"{ns}-low"[:63], f"{ns}-high"[:63]
    for name, value in ((low, 100), (high, 10_000)):
        scheduling.create_priority_class(V1PriorityClass(metadata=V1ObjectMeta(name=name), value=value))
    try:
        patient = two_nodes("low", queueName=queue, backoffLimit=0)
        patient["spec"]["priorityClassName"] = low
        create(api, ns, patient)
        wait_pods(core, ns, "low", all_running(2), "the low-priority gang running", timeout=90)
        wait_job(api, operator, "low", phase_is("Running"), "low Running")

        urgent = two_nodes("high", queueName=queue)
        urgent["spec"]["priorityClassName"] = high
        create(api, ns, urgent)
        wait_pods(
            core, ns, "high", all_running(2), "the high-priority gang admitted by preemption", timeout=90
        )
        status = wait_job(
            api,
            operator,
            "low",
            lambda s: s.get("phase") == "Queued" and s.get("disruptions", 0) >= 1,
            "low re-queued",
        )
        assert status.get("restarts", 0) == 0, status

        def reasons() -> set[str]:
            events = core.list_namespaced_event(ns, field_selector="involvedObject.name=low").items
            return {e.reason for e in events}

        # Kueue's TerminationTarget reason, which the operator gives as the disruption's
        eventually(lambda: PREEMPTED in reasons(), f"a {PREEMPTED} event", lambda: str(reasons()))

        finish_all(core, ns, "high", 0)
        wait_job(api, operator, "high", phase_is("Succeeded"), "high Succeeded")
        attempt = status["disruptions"]
        wait_pods(core, ns, "low", all_running(2, attempt=attempt), "low admitted again", timeout=90)
        finish_all(core, ns, "low", 0)
        status = wait_job(api, operator, "low", phase_is("Succeeded"), "low Succeeded after its preemption")
        assert status.get("restarts", 0) == 0 and status["disruptions"] >= 1, status
    finally:
        for name in (low, high):
            with contextlib.suppress(ApiException):
                scheduling.delete_priority_class(name)


def test_suspend_and_resume_queue_the_gang_again_as_a_fresh_pod_group(
    api: CustomObjectsApi, core: CoreV1Api, operator: Operator, queue: str, kueue: Kueue
) -> None:
    """Suspending a running queued job removes its gang (Kueue releases the quota); resuming queues a new
    gang under a pod group of its own, which Kueue admits, and the job succeeds."""
    ns = operator.namespace
    create(api, ns, two_nodes("paused", queueName=queue))
    first = wait_pods(core, ns, "paused", all_running(2), "the gang running", timeout=90)
    groups = {p.metadata.labels["kueue.x-k8s.io/pod-group-name"] for p in first}
    set_run_policy(api, ns, "paused", suspend=True)
    wait_job(api, operator, "paused", phase_is("Suspended"), "Suspended")
    wait_pods(core, ns, "paused", lambda pods: not pods, "the gang gone")
    set_run_policy(api, ns, "paused", suspend=False)
    second = wait_pods(core, ns, "paused", all_running(2, attempt=1), "the resumed gang admitted", timeout=90)
    assert {p.metadata.labels["kueue.x-k8s.io/pod-group-name"] for p in second}.isdisjoint(groups)
    finish_all(core, ns, "paused", 0)
    wait_job(api, operator, "paused", phase_is("Succeeded"), "Succeeded after suspend and resume")
