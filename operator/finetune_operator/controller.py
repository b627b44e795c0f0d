"""One loop per FineTuneJob: read (job, pods) → decide purely → apply once → sleep until woken or due.

`decide` is pure glue over the core (parse, plan, render, refine for the scheduler, reconcile).
`Controller.run_job` is the body of the kopf daemon kopf runs per job; it reads fresh state from the
API server on every pass (quorum reads), so nothing it decides depends on a cache or on memory that a
restart would lose. Pod and job watch events only `wake` the loop early; missing a wake costs at most
`timing.resync_seconds`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import kopf
from pydantic import ValidationError

from finetune_operator.adapters import events
from finetune_operator.adapters.kube import JobApi
from finetune_operator.api.models import FineTuneJobStatus
from finetune_operator.core.desire import SpecProblem, desire, parse_job
from finetune_operator.core.gang import JobRef
from finetune_operator.core.lifecycle import Actions, Event, api_error, reconcile, rejected
from finetune_operator.core.status import (
    ConditionType,
    NodeView,
    get_condition,
    nodes_to_check,
    parse_time,
    read_worker,
)
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.scheduling import refiner_for
from finetune_operator.settings import Settings


def read_status(body: Mapping[str, Any]) -> FineTuneJobStatus:
    """The stored status, or a fresh one when there is none (or it does not parse: it is ours to rewrite)."""
    try:
        return FineTuneJobStatus.model_validate(body.get("status") or {})
    except ValidationError:
        return FineTuneJobStatus()


def job_ref(body: Mapping[str, Any]) -> JobRef:
    meta = body["metadata"]
    return JobRef(
        name=meta["name"],
        namespace=meta["namespace"],
        uid=meta["uid"],
        generation=int(meta.get("generation", 1)),
    )


def decide(
    body: Mapping[str, Any],
    pods: Sequence[Mapping[str, Any]],
    now: datetime,
    settings: Settings,
    nodes: Mapping[str, NodeView | None] = MappingProxyType({}),
) -> Actions:
    """The next step for the job `body` with `pods` (and the nodes of its suspect workers): the whole pure
    pipeline."""
    ref = job_ref(body)
    status = read_status(body)
    job = parse_job(body)
    policy = settings.lifecycle_policy()
    if isinstance(job, SpecProblem):
        return reconcile(ref, None, status, job, pods, now, policy, nodes)
    desired = desire(job, ref, settings.render_options(), status.attempt, refiner_for(job))
    return reconcile(ref, job.spec, status, desired, pods, now, policy, nodes)


class Controller:
    """Runs the per-job loops of this operator replica."""

    def __init__(
        self,
        settings: Settings,
        api: JobApi,
        metrics: OperatorMetrics,
        preflight_problems: tuple[str, ...] = (),
    ) -> None:
        self.settings = settings
        self.api = api
        self.metrics = metrics
        #: What kept this replica from acting when it started (adapters/preflight.py); the health
        #: endpoint reports it.
        self.preflight_problems = preflight_problems
        self._wakers: dict[tuple[str, str], asyncio.Event] = {}

    def credentials(self) -> kopf.ConnectionInfo:
        """What kopf logs in with: the adapter's own connection."""
        return self.api.credentials()

    def wake(self, namespace: str, name: str) -> None:
        """Reconcile the job soon (a pod or the job changed); a no-op for jobs this replica does not run."""
        waker = self._wakers.get((namespace, name))
        if waker is not None:
            waker.set()

    async def run_job(
        self, namespace: str, name: str, logger: logging.Logger | logging.LoggerAdapter[Any]
    ) -> None:
        """The daemon body: loop until the job is gone or kopf cancels the task (job deleted, peer took over)."""
        key = (namespace, name)
        waker = self._wakers.setdefault(key, asyncio.Event())
        timing = self.settings.timing
        errors = 0
        reported: str | None = None  # the last error posted as an event, so each is posted once
        try:
            while True:
                delay: float | None
                try:
                    with self.metrics.reconcile_seconds.time():
                        alive, delay = await self.tick(namespace, name, logger)
                    errors, reported = 0, None
                    if not alive:
                        return
                except kopf.TemporaryError as exc:
                    errors += 1
                    self.metrics.reconcile_errors.labels("temporary").inc()
                    delay = min(
                        timing.error_backoff_seconds * 2 ** (errors - 1), timing.error_backoff_max_seconds
                    )
                    logger.warning("reconcile failed, retrying in %.1fs: %s", delay, exc)
                    if errors >= timing.report_errors_after and str(exc) != reported:
                        reported = str(exc)
                        await self._report(namespace, name, f"{exc} ({errors} tries; retrying with backoff)")
                    await asyncio.sleep(
                        delay
                    )  # backing off: an event arriving meanwhile does not cut it short
                    continue
                except kopf.PermanentError as exc:
                    self.metrics.reconcile_errors.labels("permanent").inc()
                    delay = timing.resync_seconds
                    logger.error("reconcile failed permanently: %s", exc)
                except Exception:
                    errors += 1
                    self.metrics.reconcile_errors.labels("unexpected").inc()
                    delay = min(
                        timing.error_backoff_seconds * 2 ** (errors - 1), timing.error_backoff_max_seconds
                    )
                    logger.exception("unexpected error while reconciling; retrying in %.1fs", delay)
                    await asyncio.sleep(delay)
                    continue
                await self._sleep(waker, delay)
        finally:
            self._wakers.pop(key, None)
            self.metrics.forget(namespace, name)

    async def tick(
        self, namespace: str, name: str, logger: logging.Logger | logging.LoggerAdapter[Any]
    ) -> tuple[bool, float | None]:
        """One reconcile; (whether the job still exists, seconds until something is due)."""
        body = await asyncio.to_thread(self.api.read_job, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return False, None
        pods = await asyncio.to_thread(self.api.list_pods, namespace, name)
        # Only the nodes of workers being deleted or no longer Ready: a healthy gang costs no node reads.
        suspects = nodes_to_check(read_worker(pod) for pod in pods)
        nodes = await asyncio.to_thread(self.api.read_nodes, suspects) if suspects else {}
        actions = decide(body, pods, datetime.now(UTC), self.settings, nodes)
        try:
            await asyncio.to_thread(self.api.apply, body, actions)
        except kopf.PermanentError as exc:
            # The API server refused an object we rendered (admission, invalid field): retrying the same
            # object cannot help, so the job fails and says why.
            fresh = await asyncio.to_thread(self.api.read_job, namespace, name)
            if fresh is None:
                return False, None
            body = fresh
            actions = rejected(job_ref(body), read_status(body), str(exc), datetime.now(UTC))
            await asyncio.to_thread(self.api.apply, body, actions)
        stored = read_status(body)
        await self._recovered(body, stored)
        for event in actions.events:
            logger.info("%s: %s", event.reason, event.message)
            events.post(body, event)
        self.metrics.observe(
            namespace,
            name,
            stored,
            actions.status,
            created=parse_time(body["metadata"].get("creationTimestamp")),
            deadline_seconds=((body.get("spec") or {}).get("runPolicy") or {}).get("activeDeadlineSeconds"),
        )
        return not actions.delete_job, actions.requeue_after

    async def _report(self, namespace: str, name: str, message: str) -> None:
        """A Warning event and the ApiError condition on the job for an API error that persists (a
        ResourceQuota, missing RBAC): `kubectl describe ftj`, `kubectl wait` and `ftctl status` show it.
        Best effort: the API may be what is failing."""
        try:
            body = await asyncio.to_thread(self.api.read_job, namespace, name)
        except (kopf.TemporaryError, kopf.PermanentError):
            return
        if body is not None:
            events.post(body, Event("Warning", "RetryingApiError", message))
            await self._api_error(body, message)

    async def _recovered(self, body: Mapping[str, Any], stored: FineTuneJobStatus) -> None:
        """After a pass whose writes all went through, ApiError (if True in `stored`, the status the pass
        started from) turns False. Not in the pass's own status write: that goes first, and the write
        that failed before may fail again after it."""
        condition = get_condition(stored.conditions, ConditionType.API_ERROR)
        if condition is None or condition.status != "True":
            return
        meta = body["metadata"]
        fresh = await asyncio.to_thread(self.api.read_job, meta["namespace"], meta["name"])
        if fresh is not None:
            await self._api_error(fresh, None)

    async def _api_error(self, body: Mapping[str, Any], message: str | None) -> None:
        updated = api_error(
            read_status(body), message, datetime.now(UTC), int(body["metadata"].get("generation") or 0)
        )
        if updated is not None:
            with contextlib.suppress(kopf.TemporaryError, kopf.PermanentError):
                await asyncio.to_thread(self.api.write_status, body, updated)

    async def _sleep(self, waker: asyncio.Event, delay: float | None) -> None:
        """Until woken, due, or the resync interval; then a short debounce to batch bursts of events."""
        timing = self.settings.timing
        timeout = timing.resync_seconds if delay is None else min(max(delay, 0.0), timing.resync_seconds)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waker.wait(), timeout)
        waker.clear()
        await asyncio.sleep(timing.debounce_seconds)
