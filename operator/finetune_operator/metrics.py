"""Prometheus metrics, created by `build_metrics` into a registry of the caller's choice.

Nothing is registered at import time, so tests build as many independent sets as they like and the
operator exposes exactly one. Per-job series carry `namespace` and `job` labels and are removed when the
job goes away, so a cluster that ran thousands of jobs does not export thousands of dead series.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from finetune_operator.api.enums import Phase
from finetune_operator.api.models import FineTuneJobStatus

JOB_LABELS = ("namespace", "job")


@dataclass
class OperatorMetrics:
    registry: CollectorRegistry
    jobs: Gauge
    job_phase: Gauge
    restarts: Gauge
    gang_restarts: Counter
    planned_gpus: Gauge
    progress: Gauge
    loss: Gauge
    tokens_per_second: Gauge
    reconcile_errors: Counter
    reconcile_seconds: Histogram
    _phases: dict[tuple[str, str], str] = field(default_factory=dict)

    def observe(self, namespace: str, job: str, status: FineTuneJobStatus, restarted: bool = False) -> None:
        """Refresh one job's series from its newly written status."""
        key = (namespace, job)
        phase = status.phase or Phase.PENDING
        for candidate in Phase:
            self.job_phase.labels(namespace, job, candidate.value).set(1 if candidate.value == phase else 0)
        self._phases[key] = phase
        self._count_phases()
        self.restarts.labels(*key).set(status.restarts)
        if restarted:
            self.gang_restarts.labels(namespace).inc()
        if status.plan is not None:
            self.planned_gpus.labels(*key).set(status.plan.gpus)
        progress = status.progress
        if progress is not None:
            if progress.total_steps:
                self.progress.labels(*key).set(progress.step / progress.total_steps)
            if progress.loss is not None:
                self.loss.labels(*key).set(progress.loss)
            if progress.tokens_per_second is not None:
                self.tokens_per_second.labels(*key).set(progress.tokens_per_second)

    def forget(self, namespace: str, job: str) -> None:
        """Drop a deleted job's series."""
        key = (namespace, job)
        self._phases.pop(key, None)
        self._count_phases()
        for candidate in Phase:
            _remove(self.job_phase, namespace, job, candidate.value)
        for gauge in (self.restarts, self.planned_gpus, self.progress, self.loss, self.tokens_per_second):
            _remove(gauge, namespace, job)

    def _count_phases(self) -> None:
        for candidate in Phase:
            self.jobs.labels(candidate.value).set(
                sum(1 for p in self._phases.values() if p == candidate.value)
            )


def _remove(metric: Gauge, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


def build_metrics(registry: CollectorRegistry | None = None) -> OperatorMetrics:
    """One set of the operator's metrics in `registry` (a fresh one by default)."""
    registry = registry or CollectorRegistry()
    return OperatorMetrics(
        registry=registry,
        jobs=Gauge(
            "finetune_jobs", "FineTuneJobs this replica tracks, by phase.", ["phase"], registry=registry
        ),
        job_phase=Gauge(
            "finetune_job_phase",
            "1 for the job's current phase, 0 for the others.",
            [*JOB_LABELS, "phase"],
            registry=registry,
        ),
        restarts=Gauge(
            "finetune_job_restarts", "Whole-gang restarts of the job so far.", JOB_LABELS, registry=registry
        ),
        gang_restarts=Counter(
            "finetune_gang_restarts",
            "Whole-gang restarts this replica performed.",
            ["namespace"],
            registry=registry,
        ),
        planned_gpus=Gauge(
            "finetune_job_planned_gpus", "GPUs the planner gave the job.", JOB_LABELS, registry=registry
        ),
        progress=Gauge(
            "finetune_job_progress_ratio", "Optimizer steps done / planned.", JOB_LABELS, registry=registry
        ),
        loss=Gauge(
            "finetune_job_loss", "Latest training loss rank 0 reported.", JOB_LABELS, registry=registry
        ),
        tokens_per_second=Gauge(
            "finetune_job_tokens_per_second",
            "Training throughput over all GPUs.",
            JOB_LABELS,
            registry=registry,
        ),
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
    )
