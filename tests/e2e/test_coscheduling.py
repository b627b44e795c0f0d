"""Coscheduled gangs under the real scheduler-plugins kube-scheduler (built from its Go module,
tests/e2e/coscheduling.py) on the local cluster's fake GPU nodes (4 x 8 GPUs): with two nodes taken, a
three-node gang on the default scheduler binds the two workers that fit and leaves them holding GPUs,
while the same gang coscheduled binds none until all three fit, then runs and succeeds."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes.client import CoreV1Api, CustomObjectsApi

from finetune_operator.scheduling.coscheduling import GROUP, PLURAL, POD_GROUP_LABEL, VERSION
from finetune_operator.scheduling.options import SCHEDULER_NAME

from .conftest import Cluster
from .coscheduling import PERMIT_WAITING_SECONDS, Coscheduler
from .harness import (
    Operator,
    all_running,
    condition,
    create,
    delete,
    example,
    finish_all,
    phase_is,
    two_nodes,
    wait_job,
    wait_pods,
    worker_pods,
)
from .kwok import wait_for_pod_gone

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def coscheduler(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coscheduler]:
    with Coscheduler(cluster, tmp_path_factory.mktemp("coscheduling")) as running:
        yield running
        print(f"--- scheduler-plugins log ({running.log}) ---\n{running.tail(60)}")


@pytest.fixture
def operator_env() -> dict[str, str]:
    """Every job here is coscheduled unless it opts out: the operator's default, not the job's field."""
    return {"FINETUNE_SCHEDULING_GANG_SCHEDULING": "coscheduling"}


def three_nodes(name: str, **run_policy: Any) -> dict[str, Any]:
    """24 GPUs: three workers of 8, one more node than is free beside a two-node job."""
    return example(name, resources={"gpus": 24, "gpusPerNode": 8}, runPolicy=run_policy)


def bound(pods: list[Any]) -> list[str]:
    return [p.metadata.name for p in pods if p.spec.node_name]


def test_a_coscheduled_gang_binds_no_worker_until_the_whole_gang_fits(
    api: CustomObjectsApi, core: CoreV1Api, operator: Operator, coscheduler: Coscheduler
) -> None:
    ns = operator.namespace
    create(api, ns, two_nodes("holder", gangScheduling="none"))
    holders = wait_pods(core, ns, "holder", all_running(2), "the holder's two workers running")
    assert all(p.spec.scheduler_name == "default-scheduler" for p in holders)  # it opted out

    # The contrast: the default scheduler binds the two workers that fit; they would hold 16 GPUs idle.
    create(api, ns, three_nodes("partial", gangScheduling="none"))
    partial = wait_pods(core, ns, "partial", lambda pods: len(bound(pods)) == 2, "two of three bound")
    assert len(partial) == 3
    delete(api, ns, "partial")
    for pod in partial:
        wait_for_pod_gone(core, ns, pod.metadata.name)

    create(api, ns, three_nodes("gang"))
    pods = wait_pods(core, ns, "gang", lambda pods: len(pods) == 3, "three workers created")
    group = pods[0].metadata.labels[POD_GROUP_LABEL]
    assert all(p.metadata.labels[POD_GROUP_LABEL] == group for p in pods)
    assert all(p.spec.scheduler_name == SCHEDULER_NAME for p in pods)
    pod_group = api.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, group)
    assert pod_group["spec"]["minMember"] == 3
    assert pod_group["metadata"]["ownerReferences"][0]["name"] == "gang"

    # Two workers fit and wait in Permit; the third does not, so none binds: not once over longer than
    # the permit wait, which is when an unfinished group is released and tried again.
    watch_until = time.monotonic() + PERMIT_WAITING_SECONDS * 2
    while time.monotonic() < watch_until:
        pods = worker_pods(core, ns, "gang")
        assert not bound(pods), f"a coscheduled worker bound with the gang short a node: {bound(pods)}"
        time.sleep(0.5)
    status = wait_job(api, operator, "gang", phase_is("Scheduling"), "gang Scheduling")
    scheduled = condition(status, "Scheduled")
    # The scheduler's word (after a retry every worker may only say Coscheduling rejected it, so which
    # words is not fixed; tests/unit/test_lifecycle.py checks that a worker's own reason is preferred).
    assert scheduled["reason"] == "Unschedulable" and "nodes are available" in scheduled["message"], status

    finish_all(core, ns, "holder", 0)
    wait_job(api, operator, "holder", phase_is("Succeeded"), "holder Succeeded")
    placed = wait_pods(core, ns, "gang", all_running(3), "the whole gang placed once it fits", timeout=120)
    assert len({p.spec.node_name for p in placed}) == 3
    wait_job(api, operator, "gang", phase_is("Running"), "gang Running")
    finish_all(core, ns, "gang", 0)
    status = wait_job(api, operator, "gang", phase_is("Succeeded"), "gang Succeeded")
    assert status.get("restarts", 0) == 0, status
