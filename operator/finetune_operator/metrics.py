"""The operator's Prometheus metrics, created by `build_metrics` into a registry of the caller's choice.

Nothing is registered at import time, so tests build as many independent sets as they like and the
operator exposes exactly one. Two kinds of series:

- operator-wide: reconcile time and errors, jobs finished by outcome and reason, the time from creation
  to running and to the end, queue time, gang restarts and disruptions, GPU-seconds per namespace. Transitions are
  counted from the status write that made them (before → after), so a job is counted once however
  often it is reconciled, and a restarted replica does not count old transitions again;
- per job (labels `namespace` and `job_name`, never anything per step or per pod): phase, restarts,
  disruptions, planned
  GPUs, estimated and measured peak per-GPU bytes and their ratio, step, progress, loss, tokens, ETA,
  deadline, Stalled and GPU-seconds. They are produced at scrape time from each job's last `JobSample`,
  and a finished job's series go `retention_seconds` after its completionTime (an hour by default: long
  enough for the FineTuneJobFailed alert and a dashboard's last look, short enough that the series count
  follows the jobs running, not the job history). The namespace's GPU-seconds keep counting what its
  dropped jobs used, so chargeback never loses time.

GPU-seconds are the GPUs of running workers times the time they ran: the count changes at the reconcile
that sees workers start or stop (a pod event wakes it), and the time is read live at scrape time. They start from zero when a
replica starts: Prometheus reads that as a counter reset, and `increase()` stays right.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from finetune_operator.api.enums import Phase
from finetune_operator.api.models import FineTuneJobStatus
from finetune_operator.core.status import FINISHED, ConditionType, get_condition, parse_time

#: `job_name`, not `job`: Prometheus's own target label `job` would rename ours to `exported_job` (the
#: same reason kube-state-metrics says job_name); the trainer's metrics say job_name too.
JOB_LABELS = ("namespace", "job_name")
#: Buckets for times users wait: seconds (a free cluster) to a day (a full queue).
WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
#: Buckets for whole runs: a minute to a week.
RUN_BUCKETS = (60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400, 172800, 604800)


@dataclass(frozen=True)
class JobSample:
    """One job's per-job values, read purely from its status (None: not known yet, no series)."""

    phase: str
    restarts: int
    disruptions: int
    gpus_held: int
    planned_gpus: int | None = None
    estimated_bytes: int | None = None
    peak_bytes: int | None = None
    step: int | None = None
    progress_ratio: float | None = None
    loss: float | None = None
    tokens: int | None = None
    eta_seconds: int | None = None
    deadline_timestamp: float | None = None
    stalled: bool = False
    finished_timestamp: float | None = None


def _timestamp(text: str | None) -> float | None:
    moment = parse_time(text)
    return moment.timestamp() if moment is not None else None


def sample_job(status: FineTuneJobStatus, deadline_seconds: int | None) -> JobSample:
    """The per-job values of `status`; `deadline_seconds` is the spec's runPolicy.activeDeadlineSeconds."""
    phase = status.phase or Phase.PENDING
    plan, progress = status.plan, status.progress
    running = status.workers.running if status.workers is not None else 0
    gpus_held = running * plan.gpus_per_node if plan is not None and phase not in FINISHED else 0
    started = _timestamp(status.start_time)
    stalled = get_condition(status.conditions, ConditionType.STALLED)
    peak = progress.peak_memory_bytes if progress is not None else None
    estimate = plan.per_gpu_bytes if plan is not None and plan.per_gpu_bytes > 0 else None
    return JobSample(
        phase=phase,
        restarts=status.restarts,
        disruptions=status.disruptions,
        gpus_held=gpus_held,
        planned_gpus=plan.gpus if plan is not None else None,
        estimated_bytes=estimate,
        peak_bytes=peak,
        step=progress.step if progress is not None else None,
        progress_ratio=progress.step / progress.total_steps if progress and progress.total_steps else None,
        loss=progress.loss if progress is not None else None,
        tokens=progress.tokens if progress is not None else None,
        eta_seconds=progress.eta_seconds if progress is not None else None,
        deadline_timestamp=(
            started + deadline_seconds
            if started is not None and deadline_seconds and phase not in FINISHED
            else None
        ),
        stalled=stalled is not None and stalled.status == "True",
        finished_timestamp=_timestamp(status.completion_time) if phase in FINISHED else None,
    )


@dataclass
class GpuClock:
    """GPU-seconds of one job: what it used so far, plus the GPUs it holds now times the time since."""

    used: float = 0.0
    gpus: int = 0
    since: float = 0.0

    def advance(self, now: float, gpus: int) -> None:
        self.used = self.read(now)
        self.gpus, self.since = gpus, now

    def read(self, now: float) -> float:
        return self.used + self.gpus * max(now - self.since, 0.0)


@dataclass(eq=False)  # hashable by identity: the registry keys collectors by themselves
class OperatorMetrics(Collector):
    """The operator's metrics; register as a collector for the per-job series (`build_metrics` does)."""

    registry: CollectorRegistry
    reconcile_errors: Counter
    reconcile_seconds: Histogram
    jobs_finished: Counter
    gang_restarts: Counter
    gang_disruptions: Counter
    time_to_running: Histogram
    queue_seconds: Histogram
    duration: Histogram
    retention_seconds: float = 3600.0
    clock: Callable[[], float] = time.time
    _samples: dict[tuple[str, str], JobSample] = field(default_factory=dict)
    _phases: dict[tuple[str, str], str] = field(default_factory=dict)
    _clocks: dict[tuple[str, str], GpuClock] = field(default_factory=dict)
    #: GPU-seconds of jobs whose series were dropped, per namespace.
    _namespace_used: dict[str, float] = field(default_factory=dict)

    def observe(
        self,
        namespace: str,
        job: str,
        before: FineTuneJobStatus,
        after: FineTuneJobStatus,
        created: datetime | None = None,
        deadline_seconds: int | None = None,
    ) -> None:
        """Count what changed from `before` to the newly written `after`, and refresh the job's series."""
        key, now = (namespace, job), self.clock()
        self._count_transitions(namespace, before, after, created, now)
        sample = sample_job(after, deadline_seconds)
        self._phases[key] = sample.phase
        clock = self._clocks.setdefault(key, GpuClock(since=now))
        clock.advance(now, sample.gpus_held)
        finished = sample.finished_timestamp
        if finished is not None and now - finished > self.retention_seconds:
            self._drop(key, now)
        else:
            self._samples[key] = sample

    def forget(self, namespace: str, job: str) -> None:
        """The job is gone (deleted, or no longer this replica's): drop its series."""
        key = (namespace, job)
        self._phases.pop(key, None)
        self._drop(key, self.clock())

    def _drop(self, key: tuple[str, str], now: float) -> None:
        self._samples.pop(key, None)
        clock = self._clocks.pop(key, None)
        if clock is not None:
            self._namespace_used[key[0]] = self._namespace_used.get(key[0], 0.0) + clock.read(now)

    def _count_transitions(
        self,
        namespace: str,
        before: FineTuneJobStatus,
        after: FineTuneJobStatus,
        created: datetime | None,
        now: float,
    ) -> None:
        if after.restarts > before.restarts:
            self.gang_restarts.labels(namespace).inc(after.restarts - before.restarts)
        if after.disruptions > before.disruptions:
            self.gang_disruptions.labels(namespace).inc(after.disruptions - before.disruptions)
        age = now - created.timestamp() if created is not None else None
        if before.phase not in FINISHED and after.phase in FINISHED:
            failed = get_condition(after.conditions, ConditionType.FAILED)
            reason = failed.reason if after.phase == Phase.FAILED and failed is not None else "Completed"
            self.jobs_finished.labels(namespace, after.phase, reason).inc()
            if age is not None:
                self.duration.labels(after.phase).observe(age)
        running = get_condition(after.conditions, ConditionType.RUNNING)
        first_run = get_condition(before.conditions, ConditionType.RUNNING) is None
        if first_run and running is not None and running.status == "True" and age is not None:
            self.time_to_running.observe(age)
        was = get_condition(before.conditions, ConditionType.SCHEDULED)
        placed = get_condition(after.conditions, ConditionType.SCHEDULED)
        if placed is not None and placed.status == "True" and (was is None or was.status != "True"):
            # Waiting began when Scheduled turned False (gated, unschedulable) or when workers were created.
            waited_since = _timestamp(was.last_transition_time) if was is not None else None
            waited_since = waited_since or _timestamp(after.start_time)
            if waited_since is not None:
                self.queue_seconds.observe(max(now - waited_since, 0.0))

    def collect(self) -> Iterable[Any]:
        """The per-job series and the per-phase and per-namespace totals, as of now."""
        now = self.clock()
        jobs = GaugeMetricFamily(
            "finetune_jobs", "FineTuneJobs this replica runs, by phase.", labels=["phase"]
        )
        for phase in Phase:
            jobs.add_metric([phase.value], sum(1 for p in self._phases.values() if p == phase.value))
        yield jobs
        used = dict(self._namespace_used)
        for (namespace, _), clock in self._clocks.items():
            used[namespace] = used.get(namespace, 0.0) + clock.read(now)
        by_namespace = CounterMetricFamily(
            "finetune_namespace_gpu_seconds",
            "GPU-seconds used by a namespace's jobs (GPUs of running workers × time), for chargeback.",
            labels=["namespace"],
        )
        for namespace, seconds in sorted(used.items()):
            by_namespace.add_metric([namespace], seconds)
        yield by_namespace
        yield from self._job_families(now)

    def _job_families(self, now: float) -> Iterable[Any]:
        labels = [*JOB_LABELS]
        phase = GaugeMetricFamily(
            "finetune_job_phase",
            "1 for the job's current phase, 0 for the others.",
            labels=[*labels, "phase"],
        )
        gauges: dict[str, tuple[str, Callable[[JobSample], float | None]]] = {
            "finetune_job_planned_gpus": ("GPUs the planner gave the job.", lambda s: s.planned_gpus),
            "finetune_job_gpu_memory_estimated_bytes": (
                "The planner's estimated peak memory per GPU.",
                lambda s: s.estimated_bytes,
            ),
            "finetune_job_gpu_memory_peak_bytes": (
                "Measured peak GPU memory allocated on rank 0 (absent on CPU).",
                lambda s: s.peak_bytes,
            ),
            "finetune_job_gpu_memory_peak_ratio": (
                "Measured peak / estimated peak per GPU: above 1, the estimate was low (an OOM risk).",
                lambda s: s.peak_bytes / s.estimated_bytes if s.peak_bytes and s.estimated_bytes else None,
            ),
            "finetune_job_step": ("Optimizer steps done.", lambda s: s.step),
            "finetune_job_progress_ratio": ("Optimizer steps done / planned.", lambda s: s.progress_ratio),
            "finetune_job_loss": ("Latest training loss rank 0 reported.", lambda s: s.loss),
            "finetune_job_eta_seconds": ("Estimated time left while running.", lambda s: s.eta_seconds),
            "finetune_job_deadline_timestamp_seconds": (
                "When runPolicy.activeDeadlineSeconds fails the job (Unix time).",
                lambda s: s.deadline_timestamp,
            ),
            "finetune_job_stalled": (
                "1 while the job's Stalled condition is True.",
                lambda s: int(s.stalled),
            ),
        }
        counters: dict[str, tuple[str, Callable[[JobSample], float | None]]] = {
            "finetune_job_restarts": ("Whole-gang restarts after the trainer failed.", lambda s: s.restarts),
            "finetune_job_disruptions": (
                "Whole-gang restarts after Kubernetes ended a worker (preemption, eviction, node loss).",
                lambda s: s.disruptions,
            ),
            "finetune_job_tokens": ("Input tokens trained on (all workers).", lambda s: s.tokens),
        }
        families = {name: GaugeMetricFamily(name, doc, labels=labels) for name, (doc, _) in gauges.items()}
        totals = {name: CounterMetricFamily(name, doc, labels=labels) for name, (doc, _) in counters.items()}
        gpu_seconds = CounterMetricFamily(
            "finetune_job_gpu_seconds", "GPU-seconds the job's running workers held.", labels=labels
        )
        for key, sample in sorted(self._samples.items()):
            for candidate in Phase:
                phase.add_metric([*key, candidate.value], 1 if sample.phase == candidate.value else 0)
            _add_all(families, gauges, key, sample)
            _add_all(totals, counters, key, sample)
            clock = self._clocks.get(key)
            gpu_seconds.add_metric([*key], clock.read(now) if clock is not None else 0.0)
        yield phase
        yield from families.values()
        yield from totals.values()
        yield gpu_seconds


def _add_all(
    families: Mapping[str, GaugeMetricFamily | CounterMetricFamily],
    readers: Mapping[str, tuple[str, Callable[[JobSample], float | None]]],
    key: tuple[str, str],
    sample: JobSample,
) -> None:
    for name, (_, read) in readers.items():
        value = read(sample)
        if value is not None:
            families[name].add_metric([*key], value)


def build_metrics(
    registry: CollectorRegistry | None = None, retention_seconds: float = 3600.0
) -> OperatorMetrics:
    """One set of the operator's metrics in `registry` (a fresh one by default)."""
    registry = registry or CollectorRegistry()
    metrics = OperatorMetrics(
        registry=registry,
        retention_seconds=retention_seconds,
        reconcile_errors=Counter(
            "finetune_reconcile_errors",
            "Reconciles that failed, by kind (temporary, permanent, unexpected).",
            ["kind"],
            registry=registry,
        ),
        reconcile_seconds=Histogram(
            "finetune_reconcile_duration_seconds",
            "Time of one reconcile, API calls included.",
            registry=registry,
        ),
        jobs_finished=Counter(
            "finetune_jobs_finished",
            "Jobs that reached Succeeded or Failed, by outcome and reason.",
            ["namespace", "outcome", "reason"],
            registry=registry,
        ),
        gang_restarts=Counter(
            "finetune_gang_restarts",
            "Whole-gang restarts this replica performed after a trainer failed.",
            ["namespace"],
            registry=registry,
        ),
        gang_disruptions=Counter(
            "finetune_gang_disruptions",
            "Whole-gang restarts this replica performed after Kubernetes ended a worker.",
            ["namespace"],
            registry=registry,
        ),
        time_to_running=Histogram(
            "finetune_job_time_to_running_seconds",
            "From creation until every worker first ran.",
            buckets=WAIT_BUCKETS,
            registry=registry,
        ),
        queue_seconds=Histogram(
            "finetune_job_queue_seconds",
            "Time the workers waited to be placed (gated by a queue, or unschedulable).",
            buckets=WAIT_BUCKETS,
            registry=registry,
        ),
        duration=Histogram(
            "finetune_job_duration_seconds",
            "From creation until the job succeeded or failed, by outcome.",
            ["outcome"],
            buckets=RUN_BUCKETS,
            registry=registry,
        ),
    )
    registry.register(metrics)
    ProcessCollector(registry=registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
    return metrics
