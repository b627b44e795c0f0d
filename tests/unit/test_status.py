"""Reading pods: every pod state the lifecycle cares about, from whole pod documents."""

from __future__ import annotations

from typing import Any

import pytest
from operator_fixtures import NOW, UID, pod_doc

from finetune_operator.api.exit_codes import PERMANENT_EXIT_CODES, ExitCode
from finetune_operator.api.models import Condition, ProgressStatus, WorkersStatus
from finetune_operator.api.trainer import ProgressReport
from finetune_operator.core.status import (
    ConditionType,
    NodeView,
    Worker,
    WorkerState,
    nodes_to_check,
    observe,
    progress_status,
    read_node,
    read_progress,
    read_worker,
    set_condition,
)

COMMON = {
    "index": 0,
    "attempt": 0,
    "owner_uid": UID,
    "template_hash": None,
    "generation": 1,
    "deleting": False,
    "node": "gpu-node-0",
}
#: A pod no node has taken yet.
UNPLACED = {**COMMON, "node": None}


def test_the_failure_that_explains_a_gang_is_the_permanent_one_then_the_earliest() -> None:
    """A rank that dies takes its peers down a moment later (a closed gloo/NCCL connection, exit 75); the
    lowest rank is often one of those, so its exit code would hide the cause."""

    def failed(index: int, code: int, at: str) -> Any:
        return read_worker(pod_doc(index, phase="Failed", exit_code=code, finished_at=at))

    peer_lost = failed(0, ExitCode.RETRYABLE, "2025-01-02T03:04:07Z")
    crashed = failed(2, 1, "2025-01-02T03:04:05Z")
    config = failed(3, ExitCode.CONFIG_ERROR, "2025-01-02T03:04:09Z")
    choose = observe([peer_lost, crashed], expected=4).failure
    assert choose(PERMANENT_EXIT_CODES) == crashed  # the earliest
    choose = observe([peer_lost, crashed, config], expected=4).failure
    assert choose(PERMANENT_EXIT_CODES) == config  # permanent before earlier
    # without finish times (a pod status lost its container state), the lowest rank
    untimed = [read_worker(pod_doc(i, phase="Failed", exit_code=1)) for i in (2, 1)]
    chosen = observe(untimed, expected=4).failure(PERMANENT_EXIT_CODES)
    assert chosen is not None and chosen.index == 1


@pytest.mark.parametrize(
    ("pod", "expected"),
    [
        (pod_doc(0, phase="Running"), Worker(name="tiny-worker-0", state=WorkerState.RUNNING, **COMMON)),
        (
            pod_doc(0, phase="Pending", node=None),
            Worker(name="tiny-worker-0", state=WorkerState.UNSCHEDULED, **UNPLACED),
        ),
        (
            pod_doc(
                0, phase="Pending", unschedulable="0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
            ),
            Worker(
                name="tiny-worker-0",
                state=WorkerState.UNSCHEDULED,
                reason="Unschedulable",
                message="0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
                **UNPLACED,
            ),
        ),
        (
            pod_doc(0, phase="Pending", gated=True),
            Worker(
                name="tiny-worker-0",
                state=WorkerState.UNSCHEDULED,
                reason="SchedulingGated",
                message="waiting for Kueue admission",
                queued=True,
                **UNPLACED,
            ),
        ),
        (
            pod_doc(0, phase="Pending", waiting="ImagePullBackOff"),
            Worker(
                name="tiny-worker-0",
                state=WorkerState.STARTING,
                reason="ImagePullBackOff",
                message="ImagePullBackOff for trainer:test",
                **COMMON,
            ),
        ),
        (
            pod_doc(0, phase="Pending", waiting="ContainerCreating"),
            Worker(name="tiny-worker-0", state=WorkerState.STARTING, **COMMON),
        ),
        (
            pod_doc(0, phase="Succeeded", exit_code=0, reason="Completed"),
            Worker(
                name="tiny-worker-0", state=WorkerState.SUCCEEDED, reason="Completed", exit_code=0, **COMMON
            ),
        ),
        (
            pod_doc(0, phase="Failed", exit_code=78, message="bad config"),
            Worker(
                name="tiny-worker-0",
                state=WorkerState.FAILED,
                reason="Error",
                message="bad config",
                exit_code=78,
                **COMMON,
            ),
        ),
        (
            pod_doc(0, phase="Failed", exit_code=137, reason="OOMKilled"),
            Worker(
                name="tiny-worker-0", state=WorkerState.FAILED, reason="OOMKilled", exit_code=137, **COMMON
            ),
        ),
        (
            # evicted: no container status, the pod's own reason
            pod_doc(0, phase="Failed", reason="Evicted"),
            Worker(name="tiny-worker-0", state=WorkerState.FAILED, reason="Evicted", **COMMON),
        ),
        (
            pod_doc(0, phase="Running", deleting=True, attempt=2, template_hash="abc"),
            Worker(
                name="tiny-worker-0",
                state=WorkerState.RUNNING,
                **{**COMMON, "deleting": True, "attempt": 2, "template_hash": "abc"},
            ),
        ),
    ],
    ids=[
        "running",
        "pending-unscheduled",
        "unschedulable",
        "kueue-gated",
        "image-pull",
        "container-creating",
        "succeeded",
        "config-error",
        "oom-killed",
        "evicted",
        "deleting",
    ],
)
def test_read_worker(pod: dict[str, Any], expected: Worker) -> None:
    assert read_worker(pod) == expected


def test_worker_without_operator_labels_has_no_index() -> None:
    pod = pod_doc(0)
    pod["metadata"]["labels"] = {}
    pod["metadata"]["ownerReferences"] = []
    worker = read_worker(pod)
    assert (worker.index, worker.attempt, worker.owner_uid) == (None, None, None)


def test_observe_counts_finds_missing_and_the_first_failure() -> None:
    workers = [
        read_worker(pod_doc(3, phase="Failed", exit_code=1)),
        read_worker(pod_doc(1, phase="Running")),
        read_worker(pod_doc(2, phase="Failed", exit_code=1)),
        read_worker(pod_doc(7, phase="Running")),  # outside the gang: ignored
    ]
    gang = observe(workers, expected=4)
    assert gang.missing == [0]
    failure = gang.failure(PERMANENT_EXIT_CODES)
    assert failure is not None and failure.index == 2
    assert gang.counts() == WorkersStatus(total=4, pending=1, running=1, succeeded=0, failed=2)
    assert not gang.all_running and not gang.all_succeeded


@pytest.mark.parametrize(
    ("phases", "all_running", "all_succeeded"),
    [
        (["Running", "Running"], True, False),
        (["Succeeded", "Running"], True, False),  # rank 0 may finish a moment before the others
        (["Succeeded", "Succeeded"], False, True),
        (["Running", "Pending"], False, False),
        (["Running"], False, False),  # one worker not created yet
    ],
)
def test_gang_running_and_done(phases: list[str], all_running: bool, all_succeeded: bool) -> None:
    gang = observe(
        [
            read_worker(pod_doc(i, phase=p, exit_code=0 if p == "Succeeded" else None))
            for i, p in enumerate(phases)
        ],
        2,
    )
    assert (gang.all_running, gang.all_succeeded) == (all_running, all_succeeded)


def test_set_condition_keeps_the_transition_time_unless_the_status_flips() -> None:
    first = set_condition([], ConditionType.RUNNING, True, "Running", "2 running", NOW, 1)
    assert first == [
        Condition(
            type="Running",
            status="True",
            reason="Running",
            message="2 running",
            last_transition_time="2025-01-02T03:04:05Z",
            observed_generation=1,
        )
    ]
    old = [first[0].model_copy(update={"last_transition_time": "2025-01-01T00:00:00Z"})]
    same = set_condition(old, ConditionType.RUNNING, True, "Running", "still 2", NOW, 2)
    assert same[0].last_transition_time == "2025-01-01T00:00:00Z" and same[0].message == "still 2"
    flipped = set_condition(old, ConditionType.RUNNING, False, "WorkerFailed", "x", NOW, 2)
    assert flipped[0].last_transition_time == "2025-01-02T03:04:05Z"


def test_progress_comes_from_the_trainers_report_and_survives_rank0_going_away() -> None:
    report = ProgressReport(
        step=50,
        total_steps=200,
        epoch=0.5,
        loss=1.25,
        elapsed_seconds=100,
        steps_this_attempt=50,
        updated_at="2025-01-02T03:04:00Z",
    )
    parsed = read_progress(report.to_json())
    assert parsed == report
    status = progress_status(parsed, None)
    assert status == ProgressStatus(
        step=50,
        total_steps=200,
        epoch=0.5,
        percent=25,
        loss=1.25,
        eta="5m00s",
        eta_seconds=300,
        display="25% (50/200)",
        updated_at="2025-01-02T03:04:00Z",
    )
    assert progress_status(None, status) == status
    assert read_progress("{not json") is None and read_progress(None) is None


def test_progress_shows_the_measured_peak_in_gib() -> None:
    status = ProgressReport(step=1, total_steps=2, peak_memory_bytes=int(15.2 * 2**30)).to_status()
    assert (status.peak_memory_bytes, status.peak_memory) == (int(15.2 * 2**30), "15.2 GiB")


def test_only_workers_that_may_have_lost_their_node_have_it_read() -> None:
    workers = [
        read_worker(pod_doc(0, node="a")),  # running and Ready: healthy
        read_worker(pod_doc(1, node="b", ready=False)),  # marked not Ready by the node controller
        read_worker(pod_doc(2, node="c", deleting=True)),  # being deleted
        read_worker(pod_doc(3, node="b", ready=False)),
        read_worker(pod_doc(4, node="d", phase="Failed", exit_code=1, ready=False)),  # finished
        read_worker(pod_doc(5, phase="Pending", unschedulable="no GPU")),  # on no node
    ]
    assert nodes_to_check(workers) == ["b", "c"]


def test_read_node_takes_false_and_unknown_as_not_ready() -> None:
    def doc(status: str | None) -> dict[str, Any]:
        conditions = [{"type": "Ready", "status": status, "lastTransitionTime": "2025-01-02T03:04:05Z"}]
        return {"metadata": {"name": "n"}, "status": {"conditions": conditions if status else []}}

    assert read_node(doc("True")) == NodeView("n", True, "2025-01-02T03:04:05Z")
    assert read_node(doc("Unknown")) == NodeView("n", False, "2025-01-02T03:04:05Z")
    assert read_node(doc("False")).ready is False
    assert read_node(doc(None)) == NodeView("n", False, None)
