"""Progress reporting from rank 0 to the operator, and Prometheus metrics from every worker.

Channel: rank 0 writes a `ProgressReport` as JSON into the `finetune.dev/progress` annotation of its own
pod (name and namespace from the downward API: POD_NAME, POD_NAMESPACE). The operator watches worker
pods anyway, so it needs no new connection, and the worker needs only RBAC to patch its own pod — no
route to the operator, and a report survives an operator restart. Locally (ftctl train) and in tests
the file reporter writes `progress.json` instead. Reporters are throttled: at most one report per
`intervalSeconds`, except final ones (checkpoint saved, completed, failed) which always go out.

Metrics live in a registry made by `start_metrics`, never at import time, so importing this module in
tests or the operator registers nothing.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from finetune_operator.api.trainer import PROGRESS_ANNOTATION, PROGRESS_FILE, ProgressReport, TrainerConfig

log = logging.getLogger(__name__)


class Reporter(Protocol):
    def report(self, progress: ProgressReport) -> None:
        """Deliver one report; failures are logged, never raised (progress must not stop training)."""
        ...


class PodPatcher(Protocol):
    """The one call of kubernetes' CoreV1Api the reporter makes (a fake in tests)."""

    def patch_namespaced_pod(self, name: str, namespace: str, body: Any) -> Any: ...


class FileReporter:
    """Writes progress.json atomically (temp file + rename), for local runs and tests."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def report(self, progress: ProgressReport) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        temporary.write_text(progress.to_json())
        os.replace(temporary, self.path)


class PodAnnotationReporter:
    """Patches `finetune.dev/progress` on this pod through the in-cluster API (ServiceAccount token)."""

    def __init__(self, pod_name: str, namespace: str, api: PodPatcher | None = None) -> None:
        if api is None:
            from kubernetes import client, config  # only in-cluster; the hot path never imports it otherwise

            config.load_incluster_config()  # type: ignore[no-untyped-call]
            api = client.CoreV1Api()
        self._api = api
        self.pod_name, self.namespace = pod_name, namespace

    def report(self, progress: ProgressReport) -> None:
        body = {"metadata": {"annotations": {PROGRESS_ANNOTATION: progress.to_json()}}}
        try:
            self._api.patch_namespaced_pod(self.pod_name, self.namespace, body)
        except Exception as exc:  # an API hiccup must not kill a 10-hour run
            log.warning("progress report to pod %s/%s failed: %s", self.namespace, self.pod_name, exc)


class LogReporter:
    def report(self, progress: ProgressReport) -> None:
        log.info("progress %s", progress.to_json())


class ThrottledReporter:
    """Passes at most one report per `interval` seconds on; `force` reports always pass."""

    def __init__(self, inner: Reporter, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.inner, self.interval = inner, interval
        self._clock = clock
        self._last: float | None = None

    def report(self, progress: ProgressReport, force: bool = False) -> bool:
        now = self._clock()
        if not force and self._last is not None and now - self._last < self.interval:
            return False
        self._last = now
        self.inner.report(progress)
        return True


def build_reporter(config: TrainerConfig) -> ThrottledReporter:
    """The reporter the config asks for; pod-annotation falls back to logging outside a pod."""
    settings = config.progress
    inner: Reporter
    if settings.reporter == "file":
        inner = FileReporter(settings.path or Path(config.paths.output) / PROGRESS_FILE)
    elif (
        settings.reporter == "pod-annotation"
        and os.environ.get("POD_NAME")
        and os.environ.get("POD_NAMESPACE")
    ):
        inner = PodAnnotationReporter(os.environ["POD_NAME"], os.environ["POD_NAMESPACE"])
    else:
        if settings.reporter == "pod-annotation":
            log.warning("POD_NAME/POD_NAMESPACE not set: progress goes to the log only")
        inner = LogReporter()
    return ThrottledReporter(inner, settings.interval_seconds)


# --- Prometheus ---------------------------------------------------------------------------------------


@dataclass
class TrainerMetrics:
    registry: CollectorRegistry
    step: Gauge
    total_steps: Gauge
    loss: Gauge
    eval_loss: Gauge
    learning_rate: Gauge
    tokens: Counter
    gpu_memory_peak_bytes: Gauge
    port: int | None
    tokens_seen: int = 0

    def update(self, progress: ProgressReport) -> None:
        self.step.set(progress.step)
        self.total_steps.set(progress.total_steps)
        for gauge, value in (
            (self.loss, progress.loss),
            (self.eval_loss, progress.eval_loss),
            (self.learning_rate, progress.learning_rate),
            (self.gpu_memory_peak_bytes, progress.peak_memory_bytes),
        ):
            if value is not None:
                gauge.set(value)
        # A counter (throughput is its rate): it counts up to the job's cumulative total, which starts at
        # the checkpoint's count in a resumed process. Prometheus reads a new process as a counter reset.
        if progress.tokens is not None and progress.tokens > self.tokens_seen:
            self.tokens.inc(progress.tokens - self.tokens_seen)
            self.tokens_seen = progress.tokens


def create_metrics(job: str, rank: int) -> TrainerMetrics:
    """Gauges in a fresh registry, labelled with the job and this worker's rank."""
    registry = CollectorRegistry()
    labels = {"job_name": job, "rank": str(rank)}

    def gauge(name: str, doc: str) -> Gauge:
        family = Gauge(f"finetune_trainer_{name}", doc, list(labels), registry=registry)
        return family.labels(**labels)

    tokens = Counter(
        "finetune_trainer_tokens",
        "Input tokens trained on over all workers.",
        list(labels),
        registry=registry,
    )

    return TrainerMetrics(
        registry=registry,
        step=gauge("step", "Optimizer steps done."),
        total_steps=gauge("total_steps", "Optimizer steps planned."),
        loss=gauge("loss", "Latest training loss."),
        eval_loss=gauge("eval_loss", "Latest evaluation loss."),
        learning_rate=gauge("learning_rate", "Current learning rate."),
        tokens=tokens.labels(**labels),
        gpu_memory_peak_bytes=gauge("gpu_memory_peak_bytes", "Peak GPU memory allocated by this worker."),
        port=None,
    )


def start_metrics(job: str, rank: int, port: int | None) -> TrainerMetrics:
    """Create the gauges and serve them on `port` (0: any free port); None serves nothing.

    Several workers on one host (ftctl train, tests) would collide on one port, so local rank k serves
    on port + k.
    """
    metrics = create_metrics(job, rank)
    if port is None:
        return metrics
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    wanted = port + local_rank if port else 0
    server, _ = start_http_server(wanted, registry=metrics.registry)
    actual = int(server.server_port)
    log.info("metrics on :%d/metrics", actual)
    return TrainerMetrics(**{**metrics.__dict__, "port": actual})
