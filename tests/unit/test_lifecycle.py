"""The lifecycle decision, scenario by scenario: (status, pods, time) in, whole decision out."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from operator_fixtures import NOW, OPTIONS, job, pod_doc, ref

from finetune_operator.api.enums import Phase
from finetune_operator.api.models import Condition, FineTuneJobStatus, WorkersStatus
from finetune_operator.core.desire import Desired, desire
from finetune_operator.core.lifecycle import Actions, Event, LifecyclePolicy, reconcile
from finetune_operator.core.status import NodeView, rfc3339

POLICY = LifecyclePolicy(restart_backoff_seconds=10, restart_backoff_max_seconds=300)
EARLIER = rfc3339(NOW - timedelta(seconds=100))


def run(
    status: FineTuneJobStatus | None = None,
    pods: list[dict[str, Any]] | None = None,
    *,
    generation: int = 1,
    now_offset: float = 0,
    **spec_updates: Any,
) -> Actions:
    status = status or FineTuneJobStatus()
    the_job = job(**spec_updates)
    desired = desire(the_job, ref(generation), OPTIONS, attempt=status.attempt)
    return reconcile(
        ref(generation),
        the_job.spec.run_policy,
        status,
        desired,
        pods or [],
        NOW + timedelta(seconds=now_offset),
        POLICY,
    )


def current_hash() -> str:
    desired = desire(job(), ref(), OPTIONS, attempt=0)
    assert isinstance(desired, Desired)
    return desired.template_hash


def running_status(**updates: Any) -> FineTuneJobStatus:
    """A job that has been running since EARLIER: planned, created, then seen running (by `run` itself)."""
    created = run()
    running = run(created.status.model_copy(update={"start_time": EARLIER}), [pod_doc(0), pod_doc(1)])
    assert running.status.phase == "Running"
    return running.status.model_copy(update=updates)


def condition(actions: Actions, kind: str) -> tuple[str, str] | None:
    found = next((c for c in actions.status.conditions if c.type == kind), None)
    return (found.status, found.reason) if found else None


def reasons(actions: Actions) -> list[str]:
    return [e.reason for e in actions.events]


def names_of(pods: tuple[dict[str, Any], ...]) -> list[str]:
    return [p["metadata"]["name"] for p in pods]


def test_a_new_job_is_planned_and_its_gang_created() -> None:
    actions = run()
    desired = desire(job(), ref(), OPTIONS, attempt=0)
    assert isinstance(desired, Desired)
    assert actions.ensure == (desired.configmap, desired.service)
    assert actions.create_pods == desired.pods
    assert actions.delete_pods == ()
    assert actions.status.phase == "Scheduling"
    assert actions.status.plan == desired.plan
    assert actions.status.start_time == rfc3339(NOW)
    assert actions.status.observed_generation == 1
    assert actions.status.workers == WorkersStatus(total=2, pending=2)
    assert condition(actions, "Planned") == ("True", "Planned")
    assert condition(actions, "MemoryFits") == ("True", "MemoryFits")
    assert reasons(actions) == ["Pending", "CreatedWorkers", "Scheduling"]
    assert actions.status_changed and actions.requeue_after is None


def test_all_workers_running_is_running() -> None:
    actions = run(running_status(phase=Phase.SCHEDULING), [pod_doc(0), pod_doc(1)])
    assert actions.status.phase == "Running"
    assert condition(actions, "Running") == ("True", "Running")
    assert condition(actions, "Scheduled") == ("True", "Scheduled")
    assert actions.create_pods == () and actions.delete_pods == ()
    assert reasons(actions) == ["Running"]


def test_a_running_gang_seen_again_changes_nothing() -> None:
    """Re-adoption: an operator restarted mid-job finds its pods and neither creates nor writes."""
    first = run(running_status(phase=Phase.SCHEDULING), [pod_doc(0), pod_doc(1)])
    again = run(first.status, [pod_doc(0), pod_doc(1)], now_offset=30)
    # nothing to do but look again when the step would have stalled
    assert again == Actions(status=first.status, status_changed=False, requeue_after=1800 - 30)


def test_only_missing_workers_are_created() -> None:
    actions = run(running_status(phase=Phase.SCHEDULING), [pod_doc(1, phase="Pending")])
    assert names_of(actions.create_pods) == ["tiny-worker-0"]
    assert reasons(actions) == []  # no CreatedWorkers event for a partial top-up


def test_the_trainers_account_is_ensured_before_its_workers_are_created() -> None:
    the_job = job()
    options = replace(OPTIONS, trainer_cluster_role="finetune-trainer")
    desired = desire(the_job, ref(), options, attempt=0)
    actions = reconcile(ref(), the_job.spec.run_policy, FineTuneJobStatus(), desired, [], NOW, POLICY)
    assert [o["kind"] for o in actions.ensure] == ["ServiceAccount", "RoleBinding", "ConfigMap", "Service"]
    assert len(actions.create_pods) == 2


def test_unschedulable_carries_the_schedulers_message() -> None:
    message = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    actions = run(
        running_status(phase=Phase.SCHEDULING),
        [pod_doc(0), pod_doc(1, phase="Pending", unschedulable=message)],
    )
    assert actions.status.phase == "Scheduling"
    scheduled = next(c for c in actions.status.conditions if c.type == "Scheduled")
    assert (scheduled.status, scheduled.reason, scheduled.message) == (
        "False",
        "Unschedulable",
        f"tiny-worker-1: {message}",
    )
    assert actions.events == (Event("Warning", "Unschedulable", f"tiny-worker-1: {message}"),)
    # the same observation again posts no second event
    assert (
        reasons(run(actions.status, [pod_doc(0), pod_doc(1, phase="Pending", unschedulable=message)])) == []
    )


def test_a_coscheduled_gang_shows_the_worker_that_did_not_fit_not_the_siblings_held_back() -> None:
    """Coscheduling rejects the whole group when one worker does not fit; the others' messages only say
    so, the one that did not fit says why."""
    cause = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu. PodGroup g gets rejected"
    pods = [
        pod_doc(
            0, phase="Pending", unschedulable="0/1 nodes are available: 1 optimistic rejection in PostFilter."
        ),
        pod_doc(1, phase="Pending", unschedulable=cause),
    ]
    actions = run(running_status(phase=Phase.SCHEDULING), pods)
    assert condition(actions, "Scheduled") == ("False", "Unschedulable")
    assert actions.events == (Event("Warning", "Unschedulable", f"tiny-worker-1: {cause}"),)


def test_kueue_gated_workers_are_queued_and_queue_time_is_not_charged_to_the_deadline() -> None:
    """A gang Kueue holds is Queued with the deadline clock stopped (a Job's startTime is likewise unset
    while Kueue keeps it suspended); the clock starts when the gang is admitted, and stops again if Kueue
    evicts and re-queues it."""
    spec = {"runPolicy": {"queueName": "team-a", "activeDeadlineSeconds": 600}}
    gated = [pod_doc(0, phase="Pending", gated=True), pod_doc(1, phase="Pending", gated=True)]
    created = run(None, **spec)
    assert len(created.create_pods) == 2 and created.status.start_time is None
    queued = run(created.status, gated, now_offset=1, **spec)
    assert queued.status.phase == "Queued" and queued.status.start_time is None
    assert condition(queued, "Scheduled") == ("False", "Queued")
    message = "waiting for Kueue to admit the gang (LocalQueue team-a)"
    assert queued.events == (Event("Normal", "Queued", message),)
    assert run(queued.status, gated, now_offset=2, **spec).events == ()  # said once
    hours = 2 * 3600.0  # far past the 600 s deadline, all of it in the queue
    admitted = run(queued.status, [pod_doc(0), pod_doc(1)], now_offset=hours, **spec)
    assert admitted.status.phase == "Running"
    assert admitted.status.start_time == rfc3339(NOW + timedelta(seconds=hours))
    assert admitted.requeue_after == 600
    late = run(admitted.status, [pod_doc(0), pod_doc(1)], now_offset=hours + 601, **spec)
    assert late.status.phase == "Failed" and condition(late, "Failed") == ("True", "DeadlineExceeded")
    requeued = run(admitted.status, gated, now_offset=hours + 10, **spec)
    assert requeued.status.phase == "Queued" and requeued.status.start_time is None
    # without a queue, the clock starts when the workers are created
    assert run(None, runPolicy={"activeDeadlineSeconds": 600}).status.start_time == rfc3339(NOW)


def test_image_pull_backoff_is_a_running_condition() -> None:
    actions = run(
        running_status(phase=Phase.SCHEDULING),
        [pod_doc(0, phase="Pending", waiting="ImagePullBackOff"), pod_doc(1)],
    )
    assert condition(actions, "Running") == ("False", "ImagePullBackOff")
    assert reasons(actions) == ["ImagePullBackOff"]


def test_all_workers_succeeded_is_succeeded_with_a_completion_time() -> None:
    pods = [pod_doc(0, phase="Succeeded", exit_code=0), pod_doc(1, phase="Succeeded", exit_code=0)]
    actions = run(running_status(), pods)
    assert actions.status.phase == "Succeeded"
    assert actions.status.completion_time == rfc3339(NOW)
    assert condition(actions, "Succeeded") == ("True", "Completed")
    assert condition(actions, "Running") == ("False", "Completed")
    assert actions.delete_pods == ()  # finished pods stay for their logs
    assert reasons(actions) == ["Succeeded"]


def test_one_failed_worker_restarts_the_whole_gang_after_a_backoff() -> None:
    pods = [pod_doc(0), pod_doc(1, phase="Failed", exit_code=1)]
    actions = run(running_status(), pods)
    assert actions.status.restarts == 1
    assert actions.status.phase == "Restarting"
    assert sorted(actions.delete_pods) == ["tiny-worker-0", "tiny-worker-1"]
    assert actions.create_pods == ()
    assert condition(actions, "Restarting") == ("True", "WorkerFailed")
    assert condition(actions, "Running") == ("False", "WorkerFailed")
    assert reasons(actions) == ["WorkerFailed", "Restarting"]
    assert actions.events[0].message == "worker 1 (tiny-worker-1) failed with exit code 1 (Error)"
    assert actions.requeue_after == 10


def test_restart_waits_for_the_old_gang_then_the_backoff_then_recreates_with_the_next_attempt() -> None:
    failed = run(running_status(), [pod_doc(0), pod_doc(1, phase="Failed", exit_code=1)])
    old = [pod_doc(0, deleting=True), pod_doc(1, phase="Failed", exit_code=1)]
    waiting = run(failed.status, old, now_offset=1)
    assert waiting.delete_pods == ("tiny-worker-1",)  # worker 0 is already terminating
    assert waiting.create_pods == () and waiting.requeue_after == 1.0
    backing_off = run(failed.status, [], now_offset=4)
    assert backing_off.create_pods == () and backing_off.requeue_after == 6
    recreated = run(failed.status, [], now_offset=10)
    assert [p["metadata"]["labels"]["finetune.dev/attempt"] for p in recreated.create_pods] == ["1", "1"]
    assert recreated.status.phase == "Scheduling" and recreated.status.restarts == 1
    running = run(recreated.status, [pod_doc(0, attempt=1), pod_doc(1, attempt=1)], now_offset=12)
    assert running.status.phase == "Running"
    assert condition(running, "Restarting") == ("False", "Running")


def test_second_restart_backs_off_twice_as_long() -> None:
    status = running_status(restarts=1)
    actions = run(status, [pod_doc(0, attempt=1, phase="Failed", exit_code=1), pod_doc(1, attempt=1)])
    assert actions.status.restarts == 2 and actions.requeue_after == 20


def test_the_same_failure_seen_twice_is_counted_once() -> None:
    """A repeated decision (status written, pods not yet deleted) finds pods of an older attempt."""
    first = run(running_status(), [pod_doc(0), pod_doc(1, phase="Failed", exit_code=1)])
    second = run(first.status, [pod_doc(0), pod_doc(1, phase="Failed", exit_code=1)])
    assert second.status.restarts == 1
    assert sorted(second.delete_pods) == ["tiny-worker-0", "tiny-worker-1"]
    assert second.events == ()


@pytest.mark.parametrize(
    ("exit_code", "reason", "restarts", "backoff_limit", "expected_reason"),
    [
        (78, "Error", 0, 3, "ConfigError"),
        (79, "Error", 0, 3, "OutOfMemory"),
        (1, "Error", 3, 3, "BackoffLimitExceeded"),
        (1, "Error", 0, 0, "BackoffLimitExceeded"),
    ],
)
def test_failures_that_end_the_job(
    exit_code: int, reason: str, restarts: int, backoff_limit: int, expected_reason: str
) -> None:
    pods = [
        pod_doc(0, attempt=restarts),
        pod_doc(1, attempt=restarts, phase="Failed", exit_code=exit_code, reason=reason),
    ]
    actions = run(running_status(restarts=restarts), pods, runPolicy={"backoffLimit": backoff_limit})
    assert actions.status.phase == "Failed"
    assert condition(actions, "Failed") == ("True", expected_reason)
    assert actions.status.completion_time == rfc3339(NOW)
    assert actions.status.restarts == restarts
    assert actions.delete_pods == ("tiny-worker-0",)  # the still-running worker frees its GPUs
    assert reasons(actions) == [expected_reason]


TRAINER_LINE = "CONFIG_ERROR: training.reportTo wandb: this image lacks the wandb package"


@pytest.mark.parametrize(
    ("message", "said"),
    [
        (TRAINER_LINE, TRAINER_LINE),  # the trainer's own line (terminationMessagePath)
        # a worker killed before it could write one: the last lines of its log (FallbackToLogsOnError)
        (
            "Traceback (most recent call last):\n  File x\nValueError: bad token 7\n",
            "ValueError: bad token 7",
        ),
    ],
)
def test_the_failed_condition_says_why_in_the_workers_own_words(message: str, said: str) -> None:
    pods = [pod_doc(0), pod_doc(1, phase="Failed", exit_code=78, message=message)]
    failed = next(c for c in run(running_status(), pods).status.conditions if c.type == "Failed")
    assert failed.message == (
        f"worker 1 (tiny-worker-1) failed with exit code 78 (Error): {said}; "
        "not retried: the same configuration fails the same way"
    )


def test_a_kernel_oom_kill_is_retried_with_its_reason() -> None:
    actions = run(
        running_status(), [pod_doc(0), pod_doc(1, phase="Failed", exit_code=137, reason="OOMKilled")]
    )
    assert actions.status.phase == "Restarting"
    assert condition(actions, "Restarting") == ("True", "OOMKilled")


def test_suspend_removes_the_gang_and_keeps_the_state() -> None:
    status = running_status(restarts=1)
    actions = run(status, [pod_doc(0, attempt=1), pod_doc(1, attempt=1)], runPolicy={"suspend": True})
    assert actions.status.phase == "Suspended"
    assert sorted(actions.delete_pods) == ["tiny-worker-0", "tiny-worker-1"]
    assert actions.status.restarts == 1 and actions.status.start_time is None
    assert condition(actions, "Suspended") == ("True", "Suspended")
    assert reasons(actions) == ["Suspended"]
    gone = run(actions.status, [], runPolicy={"suspend": True})
    assert gone.delete_pods == () and gone.create_pods == ()
    assert gone.status.workers == WorkersStatus(total=2)
    assert not run(gone.status, [], runPolicy={"suspend": True}).status_changed


def test_resume_recreates_the_gang_as_a_new_attempt() -> None:
    """A resumed gang is a new attempt (so a new Kueue pod group), not counted as a restart."""
    suspended = run(running_status(), [], runPolicy={"suspend": True})
    resumed = run(suspended.status, [], now_offset=60)
    assert resumed.create_pods == () and resumed.requeue_after is not None
    assert (resumed.status.restarts, resumed.status.disruptions, resumed.status.relaunches) == (0, 0, 1)
    assert condition(resumed, "Suspended") == ("False", "Resumed")
    actions = run(resumed.status, [], now_offset=60)
    assert names_of(actions.create_pods) == ["tiny-worker-0", "tiny-worker-1"]
    assert {p["metadata"]["labels"]["finetune.dev/attempt"] for p in actions.create_pods} == {"1"}
    assert actions.status.phase == "Scheduling"
    assert actions.status.start_time == rfc3339(NOW + timedelta(seconds=60))
    assert reasons(resumed) + reasons(actions) == ["Resumed", "CreatedWorkers", "Scheduling"]


def test_a_job_suspended_from_the_start_creates_nothing() -> None:
    actions = run(None, [], runPolicy={"suspend": True})
    assert actions.status.phase == "Suspended" and actions.create_pods == ()


def test_active_deadline() -> None:
    policy = {"activeDeadlineSeconds": 150}
    within = run(running_status(), [pod_doc(0), pod_doc(1)], runPolicy=policy)
    assert within.status.phase == "Running" and within.requeue_after == 50
    past = run(running_status(), [pod_doc(0), pod_doc(1)], now_offset=50, runPolicy=policy)
    assert past.status.phase == "Failed"
    assert condition(past, "Failed") == ("True", "DeadlineExceeded")
    assert sorted(past.delete_pods) == ["tiny-worker-0", "tiny-worker-1"]


@pytest.mark.parametrize(
    ("ttl", "delete_job", "requeue"), [(60, True, None), (600, False, 500.0), (None, False, None)]
)
def test_ttl_after_finished(ttl: int | None, delete_job: bool, requeue: float | None) -> None:
    status = running_status(phase=Phase.SUCCEEDED, completion_time=EARLIER)
    actions = run(
        status, [pod_doc(0, phase="Succeeded", exit_code=0)], runPolicy={"ttlSecondsAfterFinished": ttl}
    )
    assert (actions.delete_job, actions.requeue_after) == (delete_job, requeue)
    assert not actions.status_changed


def test_finished_jobs_remove_workers_still_running() -> None:
    status = running_status(phase=Phase.FAILED, completion_time=EARLIER)
    actions = run(status, [pod_doc(0), pod_doc(1, phase="Failed", exit_code=78)])
    assert actions.delete_pods == ("tiny-worker-0",) and actions.create_pods == ()


def test_a_job_that_does_not_fit_fails_without_pods() -> None:
    actions = run(
        None,
        [],
        model={"name": "meta-llama/Meta-Llama-3-70B"},
        method={"type": "full"},
        resources={"gpuType": "L4", "gpusPerNode": 1, "gpus": 1},
    )
    assert actions.status.phase == "Failed"
    assert condition(actions, "Planned") == ("False", "MemoryFits")
    assert condition(actions, "MemoryFits") == ("False", "MemoryFits")
    assert condition(actions, "Failed") == ("True", "MemoryFits")
    assert actions.status.plan is not None and not actions.status.plan.fits
    assert actions.status.observed_generation == 1  # the verdict is for this generation
    assert actions.create_pods == () and actions.ensure == ()
    assert reasons(actions) == ["MemoryFits"]


def test_a_spec_change_replaces_the_gang_without_counting_a_restart() -> None:
    old = [pod_doc(0, template_hash="old"), pod_doc(1, template_hash="old")]
    actions = run(running_status(), old, generation=2)
    assert sorted(actions.delete_pods) == ["tiny-worker-0", "tiny-worker-1"]
    assert actions.status.phase == "Restarting" and actions.status.restarts == 0
    assert condition(actions, "Restarting") == ("True", "SpecChanged")
    assert actions.status.relaunches == 1  # the replacement is a new attempt (a new Kueue pod group)
    going = run(
        actions.status,
        [{**p, "metadata": {**p["metadata"], "deletionTimestamp": "x"}} for p in old],
        generation=2,
    )
    assert going.status.relaunches == 1 and going.create_pods == ()  # counted once
    recreated = run(actions.status, [], generation=2, now_offset=1)  # no backoff for a spec change
    assert names_of(recreated.create_pods) == ["tiny-worker-0", "tiny-worker-1"]
    assert recreated.create_pods[0]["metadata"]["annotations"]["finetune.dev/generation"] == "2"
    assert recreated.create_pods[0]["metadata"]["labels"]["finetune.dev/attempt"] == "1"


def test_a_spec_change_that_leaves_the_workers_alone_does_not_restart() -> None:
    same = [pod_doc(0, template_hash=current_hash()), pod_doc(1, template_hash=current_hash())]
    actions = run(running_status(), same, generation=2)
    assert actions.delete_pods == () and actions.status.phase == "Running"
    assert actions.status.observed_generation == 2


def test_an_operator_upgrade_that_renders_differently_does_not_restart() -> None:
    pods = [
        pod_doc(0, template_hash="rendered-by-old-operator"),
        pod_doc(1, template_hash="rendered-by-old-operator"),
    ]
    actions = run(running_status(), pods)
    assert actions.delete_pods == () and actions.status.phase == "Running"


def test_pods_of_a_deleted_job_with_the_same_name_block_creation() -> None:
    actions = run(None, [pod_doc(0, owner_uid="other-uid", deleting=True)])
    assert actions.create_pods == () and actions.delete_pods == ()
    assert actions.requeue_after == 1.0
    assert actions.status.message is not None and "earlier job named tiny" in actions.status.message


def test_progress_and_checkpoint_come_from_rank_0() -> None:
    report = (
        '{"step":40,"totalSteps":100,"epoch":1.2,"loss":0.9,"elapsedSeconds":80,"stepsThisAttempt":40,'
        '"lastCheckpointStep":40,"lastCheckpointPath":"/mnt/pvc/models/x/checkpoints/checkpoint-40",'
        '"updatedAt":"2025-01-02T03:04:00Z"}'
    )
    actions = run(running_status(), [pod_doc(0, progress=report), pod_doc(1)])
    assert actions.status.progress is not None
    assert (actions.status.progress.display, actions.status.progress.eta, actions.status.progress.loss) == (
        "40% (40/100)",
        "2m00s",
        0.9,
    )
    assert actions.status.last_checkpoint is not None and actions.status.last_checkpoint.step == 40


@pytest.mark.parametrize(("exit_code", "phase"), [(0, "Succeeded"), (78, "Failed")])
def test_a_finished_job_keeps_its_last_progress_but_no_eta(exit_code: int, phase: str) -> None:
    report = '{"step":40,"totalSteps":100,"loss":0.9,"elapsedSeconds":80,"stepsThisAttempt":40}'
    running = run(running_status(), [pod_doc(0, progress=report), pod_doc(1)])
    assert running.status.progress is not None and running.status.progress.eta == "2m00s"
    pods = [
        pod_doc(0, progress=report, phase="Succeeded" if exit_code == 0 else "Failed", exit_code=exit_code)
    ]
    pods.append(pod_doc(1, phase="Succeeded", exit_code=0))
    finished = run(running.status, pods)
    assert finished.status.phase == phase and finished.status.completion_time
    assert finished.status.progress is not None
    assert (finished.status.progress.display, finished.status.progress.eta) == ("40% (40/100)", None)


def test_backoff_is_capped() -> None:
    assert [POLICY.backoff(n) for n in (1, 2, 3, 6, 20)] == [10, 20, 40, 300, 300]


def test_conditions_keep_their_order_and_old_ones_are_untouched() -> None:
    status = running_status(conditions=[Condition(type="Custom", status="True", reason="X")])
    actions = run(status, [pod_doc(0), pod_doc(1)])
    assert [c.type for c in actions.status.conditions][:1] == ["Custom"]


def step_report(step: int, total: int = 100) -> str:
    return json.dumps({"step": step, "totalSteps": total, "elapsedSeconds": 10.0, "stepsThisAttempt": step})


def test_a_running_job_whose_step_stops_moving_is_stalled_until_it_moves_again() -> None:
    def at(step: int) -> list[dict[str, Any]]:
        return [pod_doc(0, progress=step_report(step)), pod_doc(1)]

    first = run(running_status(), at(5))
    assert first.status.progress is not None and first.status.progress.step_updated_at == rfc3339(NOW)
    assert condition(first, "Stalled") is None
    assert first.requeue_after == pytest.approx(POLICY.stalled_after_seconds)  # looks again exactly then
    quiet = run(first.status, at(5), now_offset=1799)
    assert condition(quiet, "Stalled") is None and quiet.requeue_after == pytest.approx(1)
    stalled = run(quiet.status, at(5), now_offset=1800)
    assert condition(stalled, "Stalled") == ("True", "NoProgress")
    assert stalled.status.phase == "Running" and stalled.delete_pods == ()  # a warning, not a failure
    assert reasons(stalled) == ["Stalled"]
    assert "step 5 has not moved since 2025-01-02T03:04:05Z" in stalled.events[0].message
    still = run(stalled.status, at(5), now_offset=2400)
    assert not still.status_changed and still.events == ()  # one event, and no status write per look
    moving = run(still.status, at(6), now_offset=2401)
    assert condition(moving, "Stalled") == ("False", "Progressing")
    assert moving.status.progress is not None
    assert moving.status.progress.step_updated_at == rfc3339(NOW + timedelta(seconds=2401))


def test_the_stall_clock_starts_when_the_gang_runs_and_a_job_may_shorten_it() -> None:
    # no report yet (model loading): counted from the Running condition, with the job's own deadline
    quiet = run(
        running_status(), [pod_doc(0), pod_doc(1)], now_offset=59, runPolicy={"progressDeadlineSeconds": 60}
    )
    assert condition(quiet, "Stalled") is None
    stalled = run(
        quiet.status, [pod_doc(0), pod_doc(1)], now_offset=60, runPolicy={"progressDeadlineSeconds": 60}
    )
    assert condition(stalled, "Stalled") == ("True", "NoProgress")
    # every other phase clears it: here a suspension
    suspended = run(stalled.status, [], runPolicy={"suspend": True})
    assert condition(suspended, "Stalled") == ("False", "Suspended")


def test_a_job_past_its_last_step_is_saving_not_stalled() -> None:
    done = run(running_status(), [pod_doc(0, progress=step_report(100)), pod_doc(1)], now_offset=5000)
    assert condition(done, "Stalled") is None


def test_the_eta_goes_when_the_gang_stops_running() -> None:
    report = '{"step":40,"totalSteps":100,"elapsedSeconds":80,"stepsThisAttempt":40}'
    running = run(running_status(), [pod_doc(0, progress=report), pod_doc(1)])
    assert running.status.progress is not None and running.status.progress.eta_seconds == 120
    failed = run(running.status, [pod_doc(0, progress=report, phase="Failed", exit_code=1), pod_doc(1)])
    assert failed.status.phase == "Restarting"
    assert failed.status.progress is not None
    assert (failed.status.progress.display, failed.status.progress.eta) == ("40% (40/100)", None)


def test_a_gang_that_fails_again_before_it_runs_backs_off_from_its_own_restart() -> None:
    """Restarting stays True from the first failure until a gang runs; the backoff must not count from it."""
    failed = run(running_status(), [pod_doc(0), pod_doc(1, phase="Failed", exit_code=1)])
    assert failed.status.last_restart_time == rfc3339(NOW)
    recreated = run(failed.status, [], now_offset=10)
    starting = [pod_doc(0, attempt=1, phase="Pending"), pod_doc(1, attempt=1, phase="Failed", exit_code=1)]
    again = run(recreated.status, starting, now_offset=11)
    assert again.status.restarts == 2 and again.requeue_after == 20
    assert again.status.last_restart_time == rfc3339(NOW + timedelta(seconds=11))
    waiting = run(again.status, [], now_offset=12)
    assert waiting.create_pods == () and waiting.requeue_after == pytest.approx(19)  # not 8
    assert run(again.status, [], now_offset=31).create_pods  # 20 s after the second failure


def test_a_worker_that_vanishes_from_a_running_gang_restarts_the_whole_gang() -> None:
    """A new rank cannot join a formed rendezvous: recreating only worker 1 would hang the gang."""
    actions = run(running_status(), [pod_doc(0)])  # worker 1 deleted (or evicted, or its node removed)
    assert actions.create_pods == () and actions.delete_pods == ("tiny-worker-0",)
    assert (actions.status.restarts, actions.status.disruptions) == (0, 1)  # not the trainer's failure
    assert actions.status.phase == "Restarting"
    assert condition(actions, "Restarting") == ("True", "WorkerMissing")
    assert "worker 1 vanished from the running gang" in actions.events[0].message
    # a gang still being created is not a vanished worker: the missing one is simply created
    created = run()
    partial = run(created.status, [pod_doc(0, phase="Pending")], now_offset=1)
    assert [p["metadata"]["name"] for p in partial.create_pods] == ["tiny-worker-1"]


@pytest.mark.parametrize("by", ["PreemptionByScheduler", "WorkloadEvictedDueToPreempted"])
def test_preempted_five_times_is_not_a_backoff_failure(by: str) -> None:
    """Pods ended by preemption exit 75 after their SIGTERM checkpoint, with the DisruptionTarget condition
    (the scheduler's) or TerminationTarget (Kueue's, when a higher-priority workload evicts the gang's):
    restarts that do not spend backoffLimit (3 here), counted apart."""
    status = running_status()
    for attempt in range(5):
        pods = [
            pod_doc(0, attempt=attempt, phase="Failed", exit_code=75, disruption=by),
            pod_doc(1, attempt=attempt),
        ]
        preempted = run(status, pods, runPolicy={"backoffLimit": 3})
        assert preempted.status.phase == "Restarting", preempted.status.message
        assert condition(preempted, "Restarting") == ("True", by)
        assert (preempted.status.restarts, preempted.status.disruptions) == (0, attempt + 1)
        assert preempted.requeue_after == POLICY.backoff(0)
        back = run(preempted.status, [], now_offset=POLICY.backoff(0))
        labels = [p["metadata"]["labels"]["finetune.dev/attempt"] for p in back.create_pods]
        assert labels == [str(attempt + 1)] * 2  # a new gang: attempts count disruptions too
        running = [pod_doc(0, attempt=attempt + 1), pod_doc(1, attempt=attempt + 1)]
        status = run(back.status, running, now_offset=POLICY.backoff(0) + 1).status
        assert status.phase == "Running"
    done = [pod_doc(i, attempt=5, phase="Succeeded", exit_code=0) for i in (0, 1)]
    assert run(status, done, runPolicy={"backoffLimit": 3}).status.phase == "Succeeded"
    # the trainer's own failure still counts
    failed = run(status, [pod_doc(0, attempt=5, phase="Failed", exit_code=1), pod_doc(1, attempt=5)])
    assert (failed.status.restarts, failed.status.disruptions) == (1, 5)


# --- node loss ------------------------------------------------------------------------------------------


def node(name: str, ready: bool, seconds_ago: float = 0) -> NodeView:
    return NodeView(name, ready, rfc3339(NOW - timedelta(seconds=seconds_ago)))


def on_a_silent_node(**updates: Any) -> list[dict[str, Any]]:
    """Worker 1's node stopped reporting: the node lifecycle controller marked its pod not Ready."""
    return [pod_doc(0), pod_doc(1, node="gpu-node-1", ready=False, **updates)]


def run_with_nodes(
    status: FineTuneJobStatus, pods: list[dict[str, Any]], nodes: dict[str, NodeView | None]
) -> Actions:
    the_job = job()
    desired = desire(the_job, ref(), OPTIONS, attempt=status.attempt)
    return reconcile(ref(), the_job.spec.run_policy, status, desired, pods, NOW, POLICY, nodes)


def test_a_node_not_ready_for_less_than_the_grace_is_waited_for() -> None:
    actions = run_with_nodes(
        running_status(), on_a_silent_node(), {"gpu-node-1": node("gpu-node-1", False, 30)}
    )
    assert actions.status.phase == "Running"
    assert (actions.delete_pods, actions.force_delete_pods) == ((), ())
    assert actions.requeue_after == pytest.approx(POLICY.node_lost_seconds - 30)


@pytest.mark.parametrize("lost", [node("gpu-node-1", False, 130), None], ids=["not-ready", "deleted"])
def test_a_lost_node_restarts_the_gang_as_a_disruption_and_force_deletes_its_pod(
    lost: NodeView | None,
) -> None:
    actions = run_with_nodes(running_status(), on_a_silent_node(), {"gpu-node-1": lost})
    assert actions.status.phase == "Restarting"
    assert condition(actions, "Restarting") == ("True", "NodeLost")
    assert (actions.status.restarts, actions.status.disruptions, actions.status.attempt) == (0, 1, 1)
    assert actions.force_delete_pods == ("tiny-worker-1",)  # no kubelet will confirm a graceful delete
    assert actions.delete_pods == ("tiny-worker-0",)  # its healthy peer gets SIGTERM and its grace
    assert reasons(actions)[0] == "NodeLost"
    assert (
        "tiny-worker-1) is on node gpu-node-1, which has not been Ready for 120s" in actions.events[0].message
    )


def test_a_pod_evicted_from_a_lost_node_stays_terminating_and_is_force_deleted() -> None:
    """The taint manager evicted it, but its kubelet is gone: as an old attempt it would block the names
    of the next one forever; the healthy terminating peer is waited for."""
    restarting = run_with_nodes(
        running_status(), on_a_silent_node(), {"gpu-node-1": node("gpu-node-1", False, 130)}
    ).status
    old = [
        pod_doc(0, deleting=True),
        pod_doc(1, node="gpu-node-1", ready=False, deleting=True, disruption="DeletionByTaintManager"),
    ]
    actions = run_with_nodes(restarting, old, {"gpu-node-1": node("gpu-node-1", False, 140)})
    assert (actions.force_delete_pods, actions.delete_pods, actions.create_pods) == (
        ("tiny-worker-1",),
        (),
        (),
    )
    assert actions.status.disruptions == 1  # the same loss is not counted again


def test_a_finished_job_force_deletes_a_worker_left_on_a_lost_node() -> None:
    done = running_status(phase=Phase.SUCCEEDED, completion_time=EARLIER)
    actions = run_with_nodes(done, on_a_silent_node(), {"gpu-node-1": None})
    assert (actions.delete_pods, actions.force_delete_pods) == (("tiny-worker-0",), ("tiny-worker-1",))


def test_a_ready_node_or_one_not_read_is_never_lost() -> None:
    for nodes in ({"gpu-node-1": node("gpu-node-1", True, 500)}, {}):
        actions = run_with_nodes(running_status(), on_a_silent_node(), nodes)
        assert actions.status.phase == "Running" and actions.force_delete_pods == ()


def test_an_api_error_that_persists_is_a_condition_until_the_writes_go_through() -> None:
    from finetune_operator.core.lifecycle import api_error

    quota = 'pods "x-worker-1" is forbidden: exceeded quota: one-pod (3 tries; retrying with backoff)'
    assert api_error(FineTuneJobStatus(), None, NOW, 1) is None  # a job that never had it does not get it
    failing = api_error(FineTuneJobStatus(), quota, NOW, 1)
    assert failing is not None
    (cond,) = failing.conditions
    assert (cond.type, cond.status, cond.reason, cond.message) == (
        "ApiError",
        "True",
        "RetryingApiError",
        quota,
    )
    assert api_error(failing, quota, NOW + timedelta(seconds=5), 1) is None  # the same error: no rewrite
    recovered = api_error(failing, None, NOW + timedelta(seconds=9), 1)
    assert recovered is not None
    (cond,) = recovered.conditions
    assert (cond.status, cond.reason) == ("False", "Recovered") and "exceeded quota" in cond.message
    assert cond.last_transition_time == rfc3339(NOW + timedelta(seconds=9))
    assert api_error(recovered, None, NOW + timedelta(seconds=20), 1) is None
