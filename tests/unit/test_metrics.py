"""The operator's metrics: per-job series from status, transitions counted once, GPU-seconds, retention."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prometheus_client import generate_latest

from finetune_operator.api.enums import Offload
from finetune_operator.api.models import (
    Condition,
    FineTuneJobStatus,
    PlanStatus,
    ProgressStatus,
    WorkersStatus,
)
from finetune_operator.core.status import rfc3339
from finetune_operator.metrics import OperatorMetrics, build_metrics

CREATED = datetime(2025, 1, 2, 3, 0, 0, tzinfo=UTC)
GIB = 2**30
PLAN = PlanStatus(
    fits=True,
    gpus=16,
    nodes=2,
    gpus_per_node=8,
    zero_stage=2,
    offload=Offload.NONE,
    per_gpu_bytes=40 * GIB,
    usable_bytes=70 * GIB,
)


class Clock:
    def __init__(self) -> None:
        self.now = CREATED.timestamp()

    def __call__(self) -> float:
        return self.now

    def at(self, seconds: float) -> str:
        """Move to CREATED + seconds; the RFC 3339 time, for status fields."""
        self.now = CREATED.timestamp() + seconds
        return rfc3339(CREATED + timedelta(seconds=seconds))


def metrics_with(clock: Clock, retention: float = 3600) -> OperatorMetrics:
    metrics = build_metrics(retention_seconds=retention)
    metrics.clock = clock
    return metrics


def cond(kind: str, status: str, reason: str, since: str) -> Condition:
    return Condition(type=kind, status=status, reason=reason, last_transition_time=since)


def value(metrics: OperatorMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_per_job_series_follow_the_status_and_go_with_the_job() -> None:
    clock = Clock()
    metrics = metrics_with(clock)
    running = FineTuneJobStatus(
        phase="Running",
        restarts=1,
        disruptions=2,
        plan=PLAN,
        workers=WorkersStatus(total=2, running=2),
        start_time=clock.at(0),
        progress=ProgressStatus(
            step=25, total_steps=100, loss=1.5, tokens=90_000, eta_seconds=600, peak_memory_bytes=44 * GIB
        ),
        conditions=[cond("Stalled", "True", "NoProgress", clock.at(10))],
    )
    metrics.observe("ns", "a", FineTuneJobStatus(), running, CREATED, deadline_seconds=7200)
    metrics.observe("ns", "b", FineTuneJobStatus(), FineTuneJobStatus(phase="Pending"))
    job = {"namespace": "ns", "job_name": "a"}
    assert value(metrics, "finetune_jobs", phase="Running") == 1
    assert value(metrics, "finetune_jobs", phase="Pending") == 1
    assert value(metrics, "finetune_job_phase", **job, phase="Running") == 1
    assert value(metrics, "finetune_job_phase", **job, phase="Pending") == 0
    assert value(metrics, "finetune_job_planned_gpus", **job) == 16
    assert value(metrics, "finetune_job_progress_ratio", **job) == 0.25
    assert value(metrics, "finetune_job_step", **job) == 25
    assert value(metrics, "finetune_job_loss", **job) == 1.5
    assert value(metrics, "finetune_job_tokens_total", **job) == 90_000
    assert value(metrics, "finetune_job_restarts_total", **job) == 1
    assert value(metrics, "finetune_job_disruptions_total", **job) == 2
    assert value(metrics, "finetune_job_eta_seconds", **job) == 600
    assert value(metrics, "finetune_job_deadline_timestamp_seconds", **job) == CREATED.timestamp() + 7200
    assert value(metrics, "finetune_job_stalled", **job) == 1
    assert value(metrics, "finetune_job_gpu_memory_estimated_bytes", **job) == 40 * GIB
    assert value(metrics, "finetune_job_gpu_memory_peak_bytes", **job) == 44 * GIB
    assert value(metrics, "finetune_job_gpu_memory_peak_ratio", **job) == 1.1
    # what is not known yet has no series (not a misleading zero)
    assert value(metrics, "finetune_job_loss", namespace="ns", job_name="b") is None
    assert value(metrics, "finetune_gang_restarts_total", namespace="ns") == 1
    assert value(metrics, "finetune_gang_disruptions_total", namespace="ns") == 2
    metrics.forget("ns", "a")
    assert value(metrics, "finetune_jobs", phase="Running") == 0
    assert b'job_name="a"' not in generate_latest(metrics.registry)
    # two sets never collide: nothing is registered at import time
    assert build_metrics().registry is not metrics.registry


def test_gpu_seconds_grow_while_workers_run_and_stop_when_they_end() -> None:
    clock = Clock()
    metrics = metrics_with(clock)
    job = {"namespace": "ns", "job_name": "a"}
    scheduling = FineTuneJobStatus(phase="Scheduling", plan=PLAN, workers=WorkersStatus(total=2, pending=2))
    metrics.observe("ns", "a", FineTuneJobStatus(), scheduling, CREATED)
    clock.at(60)
    assert value(metrics, "finetune_job_gpu_seconds_total", **job) == 0  # pending workers hold nothing
    running = scheduling.model_copy(update={"phase": "Running", "workers": WorkersStatus(total=2, running=2)})
    metrics.observe("ns", "a", scheduling, running, CREATED)
    clock.at(70)
    assert value(metrics, "finetune_job_gpu_seconds_total", **job) == 16 * 10  # read live at scrape time
    succeeded = running.model_copy(
        update={"phase": "Succeeded", "completion_time": clock.at(100), "workers": WorkersStatus(total=2)}
    )
    metrics.observe("ns", "a", running, succeeded, CREATED)
    clock.at(500)
    assert value(metrics, "finetune_job_gpu_seconds_total", **job) == 16 * 40
    assert value(metrics, "finetune_namespace_gpu_seconds_total", namespace="ns") == 16 * 40
    # after the retention the job's series go, the namespace keeps what it used
    clock.at(100 + 3601)
    metrics.observe("ns", "a", succeeded, succeeded, CREATED)
    assert value(metrics, "finetune_job_gpu_seconds_total", **job) is None
    assert value(metrics, "finetune_job_phase", **job, phase="Succeeded") is None
    assert value(metrics, "finetune_jobs", phase="Succeeded") == 1  # still a job this replica tracks
    assert value(metrics, "finetune_namespace_gpu_seconds_total", namespace="ns") == 16 * 40


def test_transitions_are_counted_once_from_the_status_write_that_made_them() -> None:
    clock = Clock()
    metrics = metrics_with(clock)
    created = FineTuneJobStatus(phase="Scheduling", plan=PLAN, start_time=clock.at(5))
    queued = created.model_copy(update={"conditions": [cond("Scheduled", "False", "Queued", clock.at(5))]})
    metrics.observe("ns", "a", created, queued, CREATED)
    placed_at = clock.at(65)
    placed = queued.model_copy(
        update={
            "phase": "Running",
            "conditions": [
                cond("Scheduled", "True", "Scheduled", placed_at),
                cond("Running", "True", "Running", placed_at),
            ],
        }
    )
    metrics.observe("ns", "a", queued, placed, CREATED)
    metrics.observe("ns", "a", placed, placed, CREATED)  # seen again: nothing new
    assert value(metrics, "finetune_job_queue_seconds_count") == 1
    assert value(metrics, "finetune_job_queue_seconds_sum") == 60
    assert value(metrics, "finetune_job_time_to_running_seconds_count") == 1
    assert value(metrics, "finetune_job_time_to_running_seconds_sum") == 65
    failed_at = clock.at(1000)
    failed = placed.model_copy(
        update={
            "phase": "Failed",
            "completion_time": failed_at,
            "conditions": [cond("Failed", "True", "BackoffLimitExceeded", failed_at)],
        }
    )
    metrics.observe("ns", "a", placed, failed, CREATED)
    metrics.observe("ns", "a", failed, failed, CREATED)
    finished = {"namespace": "ns", "outcome": "Failed", "reason": "BackoffLimitExceeded"}
    assert value(metrics, "finetune_jobs_finished_total", **finished) == 1
    assert value(metrics, "finetune_job_duration_seconds_sum", outcome="Failed") == 1000
