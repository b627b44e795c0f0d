"""Decide what one job needs next, purely: `reconcile(job, run_policy, status, desired, pods, now) -> Actions`.

All the state it needs lives in the API server — the job's status (phase, restarts, conditions and
their transition times, startTime, completionTime) and its pods (labelled with the attempt they belong
to) — so the same inputs give the same answer in any operator replica, before or after a restart.
The adapter applies the answer in a fixed order: status first (guarded by the resourceVersion it was
decided from), then objects, then events. Writing status first is what keeps a crash between the two
harmless: the restart counter is bumped before the old gang is deleted, so a repeated decision finds
pods of an older attempt (stale, deleted again) instead of counting the same failure twice.

The rules, in the order they apply:
1. finished jobs only clean up leftover active pods and honour ttlSecondsAfterFinished;
2. a spec that cannot run (invalid, or the planner's MemoryFits verdict) fails without creating pods;
3. runPolicy.suspend removes the gang and keeps the status (phase Suspended); resuming recreates it
   and restarts the activeDeadlineSeconds clock, as a Kubernetes Job does;
4. activeDeadlineSeconds fails the job (its clock runs from the gang's creation, or for a job in a Kueue
   queue from its admission: time spent queued is not charged);
5. pods of an older attempt, or from an older spec generation whose rendering changed, are deleted
   first (a spec change to a running job is applied by a clean restart that does not count against
   backoffLimit); nothing new is created while any remain, because the names are reused;
6. one failed worker fails the gang: a permanent exit code (config error, OOM) fails the job, an
   exhausted backoffLimit fails it, anything else deletes the whole gang and recreates it after an
   exponential backoff (counted from status.lastRestartTime), and the trainer resumes from its newest
   checkpoint; a worker that vanished from a running gang restarts it the same way;
   a worker whose node has not been Ready for `node_lost_seconds` restarts it as a disruption;
7. missing workers are created; the phase and conditions follow from what the pods say;
8. a running gang whose step has not moved for the progress deadline is Stalled (a condition and an
   event, not a failure: a hung collective is worth a look, a slow step is not worth killing).

Workers on a lost node are force-deleted wherever a rule removes workers: their kubelet is gone, so a
graceful deletion would never finish and, with names reused, would block the next attempt forever.
This is safe for the reasons Kubernetes' out-of-service taint is: if the machine is only cut off and its
process still runs, it cannot finish a checkpoint (every save ends in a barrier with the other ranks,
which are being replaced), a half-written one is never marked complete (checkpoints.py), and its
kubelet kills it once it reconnects and finds the pod gone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, Literal

from finetune_operator.api.enums import Phase
from finetune_operator.api.exit_codes import PERMANENT_EXIT_CODES, describe
from finetune_operator.api.models import CheckpointStatus, FineTuneJobStatus, RunPolicySpec
from finetune_operator.api.text import count
from finetune_operator.core.desire import Desired, SpecProblem
from finetune_operator.core.gang import JobRef
from finetune_operator.core.status import (
    CONFIG_WAIT_REASONS,
    FINISHED,
    IMAGE_PULL_REASONS,
    SIBLING_REJECTIONS,
    ConditionType,
    GangObservation,
    NodeView,
    Worker,
    WorkerState,
    get_condition,
    observe,
    parse_time,
    progress_status,
    read_progress,
    read_worker,
    rfc3339,
    set_condition,
)

#: How soon to look again while waiting for the API server to finish something (pods terminating).
SHORT_REQUEUE_SECONDS = 1.0


@dataclass(frozen=True)
class LifecyclePolicy:
    """Operator-wide lifecycle settings (the job's own runPolicy holds the per-job ones)."""

    #: First whole-gang restart waits this long; each next one twice as long (seconds).
    restart_backoff_seconds: float = 10.0
    #: The cap on that wait (seconds): a long-running job should not sleep for hours between tries.
    restart_backoff_max_seconds: float = 300.0
    #: Exit codes that fail the job at once: the same config fails the same way again.
    permanent_exit_codes: frozenset[int] = PERMANENT_EXIT_CODES
    #: A running job whose step has not moved this long is Stalled (runPolicy.progressDeadlineSeconds
    #: overrides it per job). Half an hour covers loading and tokenising a large model before step 1.
    stalled_after_seconds: float = 1800.0
    #: A worker whose node has not been Ready this long (its kubelet stopped reporting: a dead or cut-off
    #: machine) is lost: its gang restarts as a disruption, and its pod is force-deleted, since no kubelet
    #: will ever confirm a graceful deletion. Two minutes ride out a kubelet restart or a network blip,
    #: which do not stop the training itself.
    node_lost_seconds: float = 120.0

    def backoff(self, restarts: int) -> float:
        """The wait before recreating the gang for restart number `restarts` (1-based)."""
        return float(
            min(self.restart_backoff_seconds * 2 ** max(restarts - 1, 0), self.restart_backoff_max_seconds)
        )


@dataclass(frozen=True)
class Event:
    """A Kubernetes event to post on the job."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Actions:
    """What to do, applied in this order: status, ensure, delete (force-delete), create, events, delete the
    job."""

    status: FineTuneJobStatus
    status_changed: bool
    #: The trainer's account and binding, the attempt's PodGroup, ConfigMap and Service: create if absent
    #: (a ConfigMap is updated if different)
    ensure: tuple[dict[str, Any], ...] = ()
    delete_pods: tuple[str, ...] = ()
    #: Pods on lost nodes, deleted without a grace period (see `_lost`)
    force_delete_pods: tuple[str, ...] = ()
    create_pods: tuple[dict[str, Any], ...] = ()
    events: tuple[Event, ...] = ()
    delete_job: bool = False
    requeue_after: float | None = None  # seconds until something is due (backoff, deadline, ttl)


@dataclass
class _Decision:
    """Accumulates one reconcile's decision; the only mutable thing here, local to `reconcile`."""

    before: FineTuneJobStatus
    now: datetime
    generation: int
    status: FineTuneJobStatus = field(init=False)
    events: list[Event] = field(default_factory=list)
    ensure: list[dict[str, Any]] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    force_delete: list[str] = field(default_factory=list)
    #: Names of workers on lost nodes: removing one force-deletes it, even while it is terminating
    lost: frozenset[str] = frozenset()
    create: list[dict[str, Any]] = field(default_factory=list)
    delete_job: bool = False
    requeue: float | None = None

    def __post_init__(self) -> None:
        self.status = self.before.model_copy(deep=True)

    def condition(self, kind: ConditionType, ok: bool, reason: str, message: str) -> bool:
        """Set a condition; True when its status or reason changed (worth an event)."""
        previous = get_condition(self.status.conditions, kind)
        self.status.conditions = set_condition(
            self.status.conditions, kind, ok, reason, message, self.now, self.generation
        )
        return previous is None or previous.status != ("True" if ok else "False") or previous.reason != reason

    def clear(self, kind: ConditionType, reason: str, message: str) -> None:
        """Set a condition False only if it exists and is True (no noise on jobs that never had it)."""
        previous = get_condition(self.status.conditions, kind)
        if previous is not None and previous.status == "True":
            self.condition(kind, False, reason, message)

    def phase(self, phase: Phase, message: str, event: Literal["Normal", "Warning"] = "Normal") -> None:
        """Move to `phase`; a transition posts an event whose reason is the new phase. Only a running gang
        can stall, so every other phase clears Stalled."""
        if self.status.phase != phase:
            self.events.append(Event(event, phase.value, message))
        if phase != Phase.RUNNING:
            self.clear(ConditionType.STALLED, phase.value, message)
        self.status.phase = phase
        self.status.message = message

    def finish(self) -> None:
        self.status.completion_time = self.status.completion_time or rfc3339(self.now)

    def fail(self, reason: str, message: str) -> None:
        self.condition(ConditionType.FAILED, True, reason, message)
        for kind in (ConditionType.SUCCEEDED, ConditionType.RUNNING, ConditionType.RESTARTING):
            self.clear(kind, reason, message)
        self.clear(ConditionType.STALLED, Phase.FAILED.value, message)
        self.finish()
        if self.status.phase != Phase.FAILED:
            self.events.append(Event("Warning", reason, message))
        self.status.phase = Phase.FAILED
        self.status.message = message

    def remove(self, workers: Iterable[Worker]) -> None:
        """Delete these workers: gracefully (SIGTERM, a checkpoint), or at once where the node is lost and
        no kubelet would ever finish a graceful deletion."""
        for w in workers:
            if w.name in self.lost:
                if w.name not in self.force_delete:
                    self.force_delete.append(w.name)
            elif not w.deleting and w.name not in self.delete:
                self.delete.append(w.name)

    def after(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        self.requeue = seconds if self.requeue is None else min(self.requeue, seconds)

    def actions(self) -> Actions:
        progress = self.status.progress
        if progress is not None and self.status.phase != Phase.RUNNING:
            # Time left exists only while the gang runs: the last report's ETA would otherwise stay in
            # `kubectl get` through a restart, a suspension or forever after the job finished.
            progress.eta = progress.eta_seconds = None
        changed = self.status.model_dump(mode="json") != self.before.model_dump(mode="json")
        return Actions(
            status=self.status,
            status_changed=changed,
            ensure=tuple(self.ensure),
            delete_pods=tuple(self.delete),
            force_delete_pods=tuple(self.force_delete),
            create_pods=tuple(self.create),
            events=tuple(self.events),
            delete_job=self.delete_job,
            requeue_after=self.requeue,
        )


def reconcile(
    job: JobRef,
    run_policy: RunPolicySpec,
    status: FineTuneJobStatus,
    desired: Desired | SpecProblem,
    pods: Sequence[Mapping[str, Any]],
    now: datetime,
    policy: LifecyclePolicy,
    nodes: Mapping[str, NodeView | None] = MappingProxyType({}),
) -> Actions:
    """The next step for one job, given its run policy (the default when its spec does not parse), status
    and pods, and the nodes of its suspect workers (`status.nodes_to_check`; None for a node that no longer
    exists). Of the spec, only the run policy is read here: the rest is in `desired`."""
    d = _Decision(status, now, job.generation)
    workers = [read_worker(pod) for pod in pods]
    ours = [w for w in workers if w.owner_uid == job.uid]
    foreign = [w for w in workers if w.owner_uid != job.uid]
    d.lost = _lost(d, ours, nodes, policy)

    if d.status.phase in FINISHED:
        _finished(d, ours, run_policy)
        return d.actions()

    # Acted on, whether it runs or fails: a client waiting on observedGeneration sees the verdict too.
    d.status.observed_generation = job.generation
    if isinstance(desired, SpecProblem):
        _cannot_run(d, desired, ours)
        return d.actions()

    d.status.plan = desired.plan
    d.condition(ConditionType.PLANNED, True, "Planned", desired.plan.message)
    d.condition(ConditionType.MEMORY_FITS, True, "MemoryFits", desired.plan.message)
    if d.status.phase is None:
        d.phase(Phase.PENDING, f"planned {desired.plan.message}")

    current = [w for w in ours if w.attempt == d.status.attempt and not _outdated(w, desired, job.generation)]
    stale = [w for w in ours if w not in current]
    gang = observe(current, desired.plan.nodes)
    d.status.workers = gang.counts()
    _progress(d, gang)

    if run_policy.suspend:
        d.status.workers = gang.counts(missing_are_pending=False)
        _suspend(d, ours)
        return d.actions()
    if d.status.phase == Phase.SUSPENDED:
        d.condition(ConditionType.SUSPENDED, False, "Resumed", "runPolicy.suspend is false")
        d.events.append(Event("Normal", "Resumed", "recreating the workers"))
        d.status.phase = Phase.PENDING
        # A fresh gang: its own attempt and Kueue pod group. It is rendered for that attempt next pass.
        d.status.relaunches += 1
        d.after(SHORT_REQUEUE_SECONDS)
        return d.actions()

    if _deadline_passed(d, run_policy, ours):
        return d.actions()

    wanted = set(desired.pod_names)
    blocking = [w for w in foreign if w.name in wanted]
    if stale or blocking:
        _replace_stale(d, stale, blocking, job, desired)
        return d.actions()

    failure = gang.failure(policy.permanent_exit_codes)
    if failure is not None:
        _gang_failed(d, failure, current, run_policy, policy)
        return d.actions()

    stranded = [w for w in gang.workers if w.name in d.lost and w.state != WorkerState.SUCCEEDED]
    if stranded:
        _node_lost(d, stranded[0], current, run_policy, policy)
        return d.actions()

    if d.status.phase == Phase.RESTARTING and _backing_off(d, policy):
        return d.actions()

    if gang.missing and current and d.status.phase == Phase.RUNNING:
        _worker_vanished(d, gang.missing[0], current, run_policy, policy)
        return d.actions()

    if gang.missing:
        d.ensure.extend([*desired.access, *desired.companions, desired.configmap, desired.service])
        pods = desired.pods
        d.create.extend(pods[i] for i in gang.missing)
        if not current:
            d.events.append(
                Event(
                    "Normal",
                    "CreatedWorkers",
                    f"created {count(len(gang.missing), 'worker')}, attempt {d.status.attempt}",
                )
            )
        if run_policy.queue_name is None:
            _start_clock(d, run_policy)

    _follow_pods(d, gang, run_policy)
    _watch_progress(d, gang, run_policy, policy)
    return d.actions()


# --- the rules ----------------------------------------------------------------------------------------


def _finished(d: _Decision, ours: Sequence[Worker], run_policy: RunPolicySpec) -> None:
    """Succeeded or Failed: remove workers still holding GPUs, delete the job when its TTL is up."""
    d.remove(w for w in ours if w.active)
    ttl = run_policy.ttl_seconds_after_finished
    finished = parse_time(d.status.completion_time)
    if ttl is None or finished is None:
        return
    left = (finished + timedelta(seconds=ttl) - d.now).total_seconds()
    if left <= 0:
        d.delete_job = True
    else:
        d.after(left)


def _cannot_run(d: _Decision, problem: SpecProblem, ours: Sequence[Worker]) -> None:
    if problem.plan is not None:
        d.status.plan = problem.plan
    d.condition(ConditionType.PLANNED, False, problem.reason, problem.message)
    if problem.reason == "MemoryFits":
        d.condition(ConditionType.MEMORY_FITS, False, "MemoryFits", problem.message)
    d.remove(w for w in ours if w.active)
    d.fail(problem.reason, problem.message)


def _suspend(d: _Decision, ours: Sequence[Worker]) -> None:
    d.remove(ours)
    d.status.start_time = None  # the deadline clock restarts on resume
    message = "workers removed; set runPolicy.suspend to false to resume"
    d.condition(ConditionType.SUSPENDED, True, "Suspended", message)
    d.clear(ConditionType.RUNNING, "Suspended", message)
    d.phase(Phase.SUSPENDED, message)
    if ours:
        d.after(SHORT_REQUEUE_SECONDS)  # until the workers are gone


def _deadline_passed(d: _Decision, run_policy: RunPolicySpec, ours: Sequence[Worker]) -> bool:
    limit = run_policy.active_deadline_seconds
    started = parse_time(d.status.start_time)
    if limit is None or started is None:
        return False
    left = (started + timedelta(seconds=limit) - d.now).total_seconds()
    if left > 0:
        d.after(left)
        return False
    d.remove(w for w in ours if w.active)
    d.fail("DeadlineExceeded", f"the job ran longer than runPolicy.activeDeadlineSeconds ({limit}s)")
    return True


def _start_clock(d: _Decision, run_policy: RunPolicySpec) -> None:
    """Start the activeDeadlineSeconds clock, unless it runs already."""
    if d.status.start_time is not None:
        return
    d.status.start_time = rfc3339(d.now)
    if run_policy.active_deadline_seconds is not None:
        d.after(float(run_policy.active_deadline_seconds))


def _outdated(worker: Worker, desired: Desired, generation: int) -> bool:
    """Created for an older spec generation whose rendering differs. Comparing hashes only after a spec
    change means an operator upgrade that renders pods differently never restarts running training."""
    return (
        worker.generation is not None
        and worker.generation < generation
        and worker.template_hash is not None
        and worker.template_hash != desired.template_hash
    )


def _replace_stale(
    d: _Decision, stale: Sequence[Worker], foreign: Sequence[Worker], job: JobRef, desired: Desired
) -> None:
    """Delete pods of older attempts or specs and wait until they are gone (their names are reused)."""
    d.remove(stale)
    d.after(SHORT_REQUEUE_SECONDS)
    outdated = [w for w in stale if _outdated(w, desired, job.generation)]
    if any(w.attempt == d.status.attempt for w in outdated):
        d.status.relaunches += 1  # the replacement is a fresh gang: its own attempt and Kueue pod group
    if outdated and d.status.phase != Phase.RESTARTING:
        message = f"the spec changed (generation {job.generation}): replacing the workers"
        d.condition(ConditionType.RESTARTING, True, "SpecChanged", message)
        d.clear(ConditionType.RUNNING, "SpecChanged", message)
        d.phase(Phase.RESTARTING, message)
    if foreign:
        d.status.message = (
            f"waiting for {count(len(foreign), 'pod')} of an earlier job named {job.name} to go"
        )


def _gang_failed(
    d: _Decision,
    failure: Worker,
    current: Sequence[Worker],
    run_policy: RunPolicySpec,
    policy: LifecyclePolicy,
) -> None:
    code = failure.exit_code
    what = f"worker {failure.index} ({failure.name}) failed"
    what += f" with exit code {code}" if code is not None else ""
    what += f" ({failure.reason})" if failure.reason else ""
    if failure.message.strip():
        # The trainer's one line, or the last line of a log tail (a traceback ends with the error)
        what += f": {failure.message.strip().splitlines()[-1].strip()[:512]}"
    if failure.reason == "OOMKilled":
        reason = "OOMKilled"
    elif code is not None and code != 0:
        reason = describe(code) if code in policy.permanent_exit_codes else "WorkerFailed"
    else:
        reason = "WorkerFailed"
    if failure.disruption is not None:
        # Kubernetes ended it (preemption, eviction, drain): the trainer saved a checkpoint on SIGTERM and
        # exited retryable; not the job's failure, so it does not spend backoffLimit.
        _restart_gang(
            d, failure.disruption, f"{what}; {failure.disruption}", current, run_policy, policy, True
        )
        return
    if code is not None and code in policy.permanent_exit_codes:
        d.remove(w for w in current if w.active)
        d.fail(reason, f"{what}; not retried: the same configuration fails the same way")
        return
    _restart_gang(d, reason, what, current, run_policy, policy)


def _worker_vanished(
    d: _Decision, missing: int, current: Sequence[Worker], run_policy: RunPolicySpec, policy: LifecyclePolicy
) -> None:
    """A worker of a running gang is gone (deleted, evicted, its node removed): a new rank cannot join the
    rendezvous the others formed, so recreating it alone would hang the gang until the collective times
    out. The whole gang restarts instead."""
    what = f"worker {missing} vanished from the running gang (deleted or evicted)"
    _restart_gang(d, "WorkerMissing", what, current, run_policy, policy, disruption=True)


def _lost(
    d: _Decision, ours: Sequence[Worker], nodes: Mapping[str, NodeView | None], policy: LifecyclePolicy
) -> frozenset[str]:
    """Workers whose node is gone, or has not been Ready for `policy.node_lost_seconds`; for a node not
    Ready for less, look again when that time is up."""
    lost = set()
    for worker in ours:
        if not worker.suspect or worker.node is None or worker.node not in nodes:
            continue
        node = nodes[worker.node]
        if node is None:
            lost.add(worker.name)
            continue
        if node.ready:
            continue
        since = parse_time(node.since) or d.now
        left = (since + timedelta(seconds=policy.node_lost_seconds) - d.now).total_seconds()
        if left <= 0:
            lost.add(worker.name)
        else:
            d.after(left)
    return frozenset(lost)


def _node_lost(
    d: _Decision,
    worker: Worker,
    current: Sequence[Worker],
    run_policy: RunPolicySpec,
    policy: LifecyclePolicy,
) -> None:
    """A worker's node stopped reporting (a dead machine, a cut network): the gang cannot go on without
    it, and nothing will confirm its pod's deletion, so the gang restarts now, as a disruption, on the
    nodes that remain (the scheduler avoids the lost node by its unreachable / not-ready taint)."""
    what = (
        f"worker {worker.index} ({worker.name}) is on node {worker.node}, which has not been Ready for "
        f"{policy.node_lost_seconds:.0f}s"
    )
    _restart_gang(d, "NodeLost", what, current, run_policy, policy, disruption=True)


def _restart_gang(
    d: _Decision,
    reason: str,
    what: str,
    current: Sequence[Worker],
    run_policy: RunPolicySpec,
    policy: LifecyclePolicy,
    disruption: bool = False,
) -> None:
    """Replace the whole gang after the backoff, or fail the job when backoffLimit is spent. A disruption
    (Kubernetes ended a worker) counts in status.disruptions, not against backoffLimit, and does not
    lengthen the backoff, which follows the trainer's own failures."""
    d.status.last_restart_time = rfc3339(d.now)
    if disruption:
        d.status.disruptions += 1
        delay = policy.backoff(d.status.restarts)
        message = f"{what}; restarting all workers (disruption {d.status.disruptions}) in {delay:.0f}s"
        _replace(d, reason, what, message, current, delay)
        return
    if d.status.restarts >= run_policy.backoff_limit:
        d.remove(w for w in current if w.active)
        d.fail(
            "BackoffLimitExceeded",
            f"{what}; {count(d.status.restarts, 'restart')} reached runPolicy.backoffLimit "
            f"({run_policy.backoff_limit})",
        )
        return
    d.status.restarts += 1
    delay = policy.backoff(d.status.restarts)
    message = (
        f"{what}; restarting all workers ({d.status.restarts}/{run_policy.backoff_limit}) in {delay:.0f}s, "
        "resuming from the last checkpoint"
    )
    _replace(d, reason, what, message, current, delay)


def _replace(
    d: _Decision, reason: str, what: str, message: str, current: Sequence[Worker], delay: float
) -> None:
    d.events.append(Event("Warning", reason, what))
    d.condition(ConditionType.RESTARTING, True, reason, message)
    d.clear(ConditionType.RUNNING, reason, what)
    d.phase(Phase.RESTARTING, message, "Warning")
    d.remove(current)  # the failed and the healthy: the gang is replaced together
    d.after(delay)


def _backing_off(d: _Decision, policy: LifecyclePolicy) -> bool:
    """Whether the restart backoff (after a worker failure, not a spec change) is still running."""
    restarting = get_condition(d.status.conditions, ConditionType.RESTARTING)
    if restarting is None or restarting.status != "True" or restarting.reason == "SpecChanged":
        return False
    # From this restart, not from when Restarting turned True: a gang that fails again before it runs
    # keeps the condition True, and its transition time would make the next backoff already spent.
    since = parse_time(d.status.last_restart_time) or parse_time(restarting.last_transition_time)
    if since is None:
        return False
    left = (since + timedelta(seconds=policy.backoff(d.status.restarts)) - d.now).total_seconds()
    if left <= 0:
        return False
    d.after(left)
    return True


def _follow_pods(d: _Decision, gang: GangObservation, run_policy: RunPolicySpec) -> None:
    """Phase and conditions from the current gang's pods."""
    n = gang.expected
    queued = [w for w in gang.workers if w.queued]
    if queued:
        # Kueue holds the gang: the deadline clock stops, as a Job's does while Kueue keeps it suspended.
        queue = f" (LocalQueue {run_policy.queue_name})" if run_policy.queue_name else ""
        message = f"waiting for Kueue to admit the gang{queue}"
        d.condition(ConditionType.SCHEDULED, False, "Queued", f"{queued[0].name}: {message}")
        d.status.start_time = None  # the move to Queued posts the event
        d.phase(Phase.QUEUED, message)
        return
    if run_policy.queue_name is not None and not gang.missing:
        _start_clock(d, run_policy)  # admitted: every worker exists and none is gated
    if gang.all_succeeded:
        message = f"all {count(n, 'worker')} succeeded"
        d.finish()
        d.condition(ConditionType.SUCCEEDED, True, "Completed", message)
        d.clear(ConditionType.RUNNING, "Completed", message)
        d.clear(ConditionType.RESTARTING, "Completed", message)
        d.phase(Phase.SUCCEEDED, message)
        if run_policy.ttl_seconds_after_finished is not None:
            d.after(float(run_policy.ttl_seconds_after_finished))
        return
    if gang.all_running:
        message = f"{count(n, 'worker')} running"
        d.condition(ConditionType.SCHEDULED, True, "Scheduled", f"{count(n, 'worker')} placed")
        d.condition(ConditionType.RUNNING, True, "Running", message)
        d.clear(ConditionType.RESTARTING, "Running", message)
        d.phase(Phase.RUNNING, message)
        return
    unscheduled = [w for w in gang.workers if w.state == WorkerState.UNSCHEDULED and w.reason]
    if unscheduled:
        # The first worker the scheduler gave its own reason, over one held back for a sibling's sake.
        worker = min(unscheduled, key=lambda w: any(words in w.message for words in SIBLING_REJECTIONS))
        message = f"{worker.name}: {worker.message}" if worker.message else worker.name
        if d.condition(ConditionType.SCHEDULED, False, worker.reason, message):
            d.events.append(
                Event("Normal" if worker.reason == "SchedulingGated" else "Warning", worker.reason, message)
            )
    elif not gang.missing and all(w.state != WorkerState.UNSCHEDULED for w in gang.workers):
        d.condition(ConditionType.SCHEDULED, True, "Scheduled", f"{count(n, 'worker')} placed")
    stuck = [w for w in gang.workers if w.reason in IMAGE_PULL_REASONS | CONFIG_WAIT_REASONS]
    if stuck:
        worker = stuck[0]
        reason = "ImagePullBackOff" if worker.reason in IMAGE_PULL_REASONS else worker.reason
        message = f"{worker.name}: {worker.message or worker.reason}"
        if d.condition(ConditionType.RUNNING, False, reason, message):
            d.events.append(Event("Warning", reason, message))
    d.phase(Phase.SCHEDULING, f"waiting for {count(n, 'worker')} to be placed and started")


def _watch_progress(
    d: _Decision, gang: GangObservation, run_policy: RunPolicySpec, policy: LifecyclePolicy
) -> None:
    """Stalled when every worker runs and the step has not moved for the progress deadline, counted from
    the later of the gang starting to run and the step last moving; the clock lives in the status."""
    if d.status.phase != Phase.RUNNING:
        return
    running = get_condition(d.status.conditions, ConditionType.RUNNING)
    since = parse_time(running.last_transition_time) if running is not None else None
    if since is None:
        return
    progress = d.status.progress
    moved = parse_time(progress.step_updated_at) if progress is not None else None
    start = max(since, moved) if moved is not None else since
    step = progress.step if progress is not None else 0
    if progress is not None and 0 < progress.total_steps <= step:
        d.clear(ConditionType.STALLED, "Finishing", f"all {step} steps done; saving")
        return
    limit = run_policy.progress_deadline_seconds or policy.stalled_after_seconds
    left = (start + timedelta(seconds=limit) - d.now).total_seconds()
    if left > 0:
        d.clear(ConditionType.STALLED, "Progressing", f"step {step} reached at {rfc3339(start)}")
        d.after(left)
        return
    message = (
        f"step {step} has not moved since {rfc3339(start)} while all {count(gang.expected, 'worker')} run "
        f"(progress deadline {limit:.0f}s): check the workers' logs"
    )
    if d.condition(ConditionType.STALLED, True, "NoProgress", message):
        d.events.append(Event("Warning", "Stalled", message))


def _progress(d: _Decision, gang: GangObservation) -> None:
    """Rank 0's report into status.progress and status.lastCheckpoint; the time the step last moved is
    the operator's own observation, so it survives a throttled or silent trainer."""
    rank0 = gang.rank0()
    report = read_progress(rank0.progress if rank0 is not None else None)
    before = d.before.progress
    d.status.progress = progress_status(report, d.status.progress)
    if d.status.progress is not None:
        kept = (
            before.step_updated_at if before is not None and before.step == d.status.progress.step else None
        )
        d.status.progress.step_updated_at = kept or rfc3339(d.now)
    if report is not None and report.last_checkpoint_step is not None and report.last_checkpoint_path:
        d.status.last_checkpoint = CheckpointStatus(
            step=report.last_checkpoint_step, path=report.last_checkpoint_path, time=report.updated_at
        )


def rejected(job: JobRef, status: FineTuneJobStatus, message: str, now: datetime) -> Actions:
    """The job fails because the API server refused an object rendered for it (an admission policy,
    a field it does not accept): retrying the same object would be refused the same way."""
    d = _Decision(status, now, job.generation)
    d.fail("Rejected", message)
    return d.actions()


def api_error(
    status: FineTuneJobStatus, message: str | None, now: datetime, generation: int
) -> FineTuneJobStatus | None:
    """The status with ApiError True for an API error that persists (`message`), or False once the
    operator's writes go through again (None); None when that changes nothing, which keeps a job that
    never had the condition free of it."""
    d = _Decision(status, now, generation)
    if message is not None:
        if not d.condition(ConditionType.API_ERROR, True, "RetryingApiError", message):
            return None
    else:
        previous = get_condition(status.conditions, ConditionType.API_ERROR)
        if previous is None or previous.status != "True":
            return None
        d.condition(
            ConditionType.API_ERROR,
            False,
            "Recovered",
            f"the operator's API calls succeed again (was: {previous.message})",
        )
    return d.status
