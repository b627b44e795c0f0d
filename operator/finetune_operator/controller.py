"""One loop per FineTuneJob: read (job, pods) → decide purely → apply once → sleep until woken or due.

`decide` is pure glue over the core (parse, plan, render, refine for the scheduler, reconcile).
`Controller.lead` runs while this replica is the one that acts (handlers.py: the body of one kopf
daemon, which kopf's peering stops in the replica that does not act); meanwhile every job in the store
has a `run_job` loop, an asyncio task of the controller's own. A loop reads the job and its pods from
the operator's informer stores (adapters/informer.py: one LIST, then watches), so a pass costs no API
request unless it has something to write. The stores are rebuilt from the API server after a
restart, and a store that lags cannot make a pass count a step twice (see the informer's docstring).
A change to the job's spec or to one of its pods wakes its loop; a running job is also looked at every
`timing.resync_seconds`, a finished one only when woken or when its TTL is due.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, TypeVar, cast

import kopf
from pydantic import ValidationError

from finetune_operator.adapters import events
from finetune_operator.adapters.informer import Document, Informer, Key, Store
from finetune_operator.adapters.kube import JobApi
from finetune_operator.api.models import KIND, FineTuneJobStatus, RunPolicySpec
from finetune_operator.core import names
from finetune_operator.core.desire import Desired, SpecProblem, desire, parse_job
from finetune_operator.core.gang import JobRef
from finetune_operator.core.lifecycle import Actions, Event, api_error, reconcile, rejected
from finetune_operator.core.status import (
    FINISHED,
    ConditionType,
    NodeView,
    get_condition,
    nodes_to_check,
    parse_time,
    read_worker,
    worker_fields,
)
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.scheduling import refiner_for
from finetune_operator.settings import Settings

log = logging.getLogger(__name__)
#: Logged once per process, when the replica first acts after its handover wait (`Controller._handover`).
ACTING_MESSAGE = "acting from now on"

T = TypeVar("T")

#: What a job's spec plans to: its run policy (the default when the spec does not parse) and its desired
#: objects, or why it cannot run. Not the parsed job: the controller keeps an intent per running job, and
#: the rest of the spec is already in the desired gang.
Intent = tuple[RunPolicySpec, Desired | SpecProblem]


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


def intend(body: Mapping[str, Any], attempt: int, settings: Settings) -> Intent:
    """Parse, plan and render the job for gang attempt `attempt`: a function of the spec (its
    generation), the attempt and the settings only, so the controller keeps it between passes."""
    job = parse_job(body)
    if isinstance(job, SpecProblem):
        return RunPolicySpec(), job
    refine = refiner_for(job, settings.scheduling_options())
    return job.spec.run_policy, desire(job, job_ref(body), settings.render_options(), attempt, refine)


def decide(
    body: Mapping[str, Any],
    pods: Sequence[Mapping[str, Any]],
    now: datetime,
    settings: Settings,
    nodes: Mapping[str, NodeView | None] = MappingProxyType({}),
    intent: Intent | None = None,
    status: FineTuneJobStatus | None = None,
) -> Actions:
    """The next step for the job `body` with `pods` (and the nodes of its suspect workers): the whole pure
    pipeline. `status` is `read_status(body)` and `intent` is `intend(body, status.attempt, settings)`
    when the caller already has them (the controller does: one parse of the status per pass)."""
    if status is None:
        status = read_status(body)
    run_policy, desired = intent or intend(body, status.attempt, settings)
    return reconcile(
        job_ref(body), run_policy, status, desired, pods, now, settings.lifecycle_policy(), nodes
    )


def without_managed_fields(obj: Document) -> Document:
    """A job as the store keeps it: managedFields are most of a small object and nobody here reads them."""
    meta = obj.get("metadata") or {}
    if "managedFields" not in meta:
        return obj
    return {**obj, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}


def pod_job_label(pod: Mapping[str, Any]) -> str | None:
    """The pod store's index: the job-name label every worker carries (`names.selector_labels`)."""
    return ((pod.get("metadata") or {}).get("labels") or {}).get(names.LABEL_JOB_NAME)


def controlling_job(pod: Mapping[str, Any]) -> str | None:
    """The FineTuneJob a pod belongs to, by its controller owner reference."""
    for owner in (pod.get("metadata") or {}).get("ownerReferences") or []:
        if owner.get("kind") == KIND and owner.get("controller"):
            return str(owner["name"])
    return None


class Controller:
    """Runs the per-job loops of this operator replica, over the stores its informers keep."""

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
        self.jobs = Store(transform=without_managed_fields)
        self.pods = Store(index=pod_job_label, transform=worker_fields)
        self.informers: list[Informer] = []
        self._wakers: dict[Key, asyncio.Event] = {}
        #: The job loops, while this replica leads (`lead`); none otherwise.
        self._loops: dict[Key, asyncio.Task[None]] = {}
        #: kopf's settings, from startup on, and its context (its event queue) while leading: the loops
        #: log and post events through them.
        self._kopf_settings = kopf.OperatorSettings()
        self._leading: contextvars.Context | None = None
        self._intents: dict[Key, tuple[tuple[str, int, int], Intent]] = {}
        #: The threads the synchronous client's writes run in: sized, so a burst of jobs queues here
        #: rather than in the default pool every other to_thread shares.
        self._executor = ThreadPoolExecutor(settings.timing.api_threads, thread_name_prefix="finetune-api")
        #: Passes in progress at once, as many as the threads that apply them: when a thousand jobs start
        #: together, the rest wait before their pass rather than holding its rendered objects in the
        #: executor's queue (all at once, that was the operator's peak memory).
        self._passes = asyncio.Semaphore(settings.timing.api_threads)
        #: When this replica may first act (event-loop time), set when it first leads.
        self._acting_from: float | None = None
        self._handed_over = False

    def credentials(self) -> kopf.ConnectionInfo:
        """What kopf logs in with: the adapter's own connection."""
        return self.api.credentials()

    def start(self, loop: asyncio.AbstractEventLoop, kopf_settings: kopf.OperatorSettings) -> None:
        """Start the informers (at operator startup, on the loop that runs the job loops)."""
        self._kopf_settings = kopf_settings
        namespaces = self.settings.namespaces
        self.informers = [
            Informer(self.api.job_source(), self.jobs, namespaces, self._job_changed),
            Informer(self.api.pod_source(), self.pods, namespaces, self._pod_changed),
        ]
        for informer in self.informers:
            informer.start(loop)

    def stop(self) -> None:
        for informer in self.informers:
            informer.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def synced(self) -> None:
        """Until every store holds a full LIST: a pass before that could take a worker for missing."""
        for informer in self.informers:
            await informer.synced.wait()

    def wake(self, namespace: str, name: str) -> None:
        """Reconcile the job soon (a pod or the job changed); a no-op for jobs this replica does not run.
        Called on the event loop only (asyncio.Event is not thread-safe)."""
        waker = self._wakers.get((namespace, name))
        if waker is not None:
            waker.set()

    def _job_changed(self, job: Document, gone: bool) -> None:
        meta = job["metadata"]
        if not gone:
            self._start_loop(meta["namespace"], meta["name"])
        # Our own status writes come back as changes too; only spec changes need an early look.
        status = job.get("status") or {}
        if gone or meta.get("generation") != status.get("observedGeneration"):
            self.wake(meta["namespace"], meta["name"])

    def _pod_changed(self, pod: Document, gone: bool) -> None:
        owner = controlling_job(pod)
        if owner is not None:
            self.wake(pod["metadata"]["namespace"], owner)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    async def lead(self, until: Awaitable[object]) -> None:
        """Run a loop for every job until `until` is done (kopf's daemon is told to stop: a peer took over,
        or the operator exits) or this is cancelled, then stop them all. One task per job, started from
        the store rather than by kopf per job: kopf would otherwise watch and keep every job a second
        time."""
        try:
            await self._handover()
            await self.synced()
            self._leading = contextvars.copy_context()
            for namespace, name in list(self.jobs.objects):
                self._start_loop(namespace, name)
            await until
        finally:
            self._leading = None
            tasks = list(self._loops.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _start_loop(self, namespace: str, name: str) -> None:
        """A loop for the job, if this replica leads and the job has none and is not being deleted."""
        key = (namespace, name)
        body = self.jobs.get(namespace, name)
        if (
            self._leading is None
            or key in self._loops
            or body is None
            or body["metadata"].get("deletionTimestamp")
        ):
            return
        logger = kopf.ObjectLogger(body=kopf.Body(cast(kopf.RawBody, body)), settings=self._kopf_settings)
        # Each task its own copy: one context cannot be entered by two tasks at once.
        task = asyncio.get_running_loop().create_task(
            self.run_job(namespace, name, logger),
            name=f"job {namespace}/{name}",
            context=self._leading.copy(),
        )
        self._loops[key] = task
        task.add_done_callback(functools.partial(self._loop_ended, key, body["metadata"]["uid"]))

    def _loop_ended(self, key: Key, uid: str, task: asyncio.Task[None]) -> None:
        if self._loops.get(key) is task:
            del self._loops[key]
        if not task.cancelled() and task.exception() is not None:
            log.error("the loop of job %s/%s ended", *key, exc_info=task.exception())
        # A job deleted and created again under the same name while its old loop was ending.
        body = self.jobs.get(*key)
        if body is not None and body["metadata"]["uid"] != uid:
            self._start_loop(*key)

    async def run_job(
        self, namespace: str, name: str, logger: logging.Logger | logging.LoggerAdapter[Any]
    ) -> None:
        """A job's loop: until the job is gone or `lead` cancels it."""
        key = (namespace, name)
        waker = self._wakers.setdefault(key, asyncio.Event())
        timing = self.settings.timing
        errors = 0
        reported: str | None = None  # the last error posted as an event, so each is posted once
        try:
            while True:
                delay: float | None
                try:
                    async with self._passes:
                        with self.metrics.reconcile_seconds.time():
                            alive, delay = await self.tick(namespace, name, logger)
                    errors, reported = 0, None
                    if not alive:
                        return
                except kopf.TemporaryError as exc:
                    errors += 1
                    self.metrics.reconcile_errors.labels("temporary").inc()
                    delay = max(  # never sooner than the server asked (Retry-After)
                        min(
                            timing.error_backoff_seconds * 2 ** (errors - 1), timing.error_backoff_max_seconds
                        ),
                        exc.delay or 0.0,
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
            self._intents.pop(key, None)
            self.metrics.forget(namespace, name)

    async def _handover(self) -> None:
        """With peering, wait `handover_seconds` from the first time this replica leads before acting.

        kopf starts `lead` as soon as this replica finds no peer above it, but a lower replica that
        was acting pauses only once its watch brings this one's record, and its loops then take a moment
        to stop: for that moment both would act. The wait counts from the first time, so leading again
        later waits less or not at all. A replica that first leads only when it takes over from a
        crashed peer waits too, needlessly: it cannot tell the two cases apart."""
        if self.settings.peering.standalone:
            return
        loop = asyncio.get_running_loop()
        handover = self.settings.peering.handover_seconds
        if self._acting_from is None:
            self._acting_from = loop.time() + handover
        await asyncio.sleep(max(self._acting_from - loop.time(), 0.0))
        if not self._handed_over:  # what a replica did is told from its log by this line
            self._handed_over = True
            log.info("%s: waited %.0f s for any replica this one outranks to stop", ACTING_MESSAGE, handover)

    def _intent(self, body: Mapping[str, Any], attempt: int) -> Intent:
        """`intend`, computed again only when the spec (its generation) or the gang attempt changed."""
        meta = body["metadata"]
        key, version = (
            (meta["namespace"], meta["name"]),
            (meta["uid"], int(meta.get("generation", 1)), attempt),
        )
        held = self._intents.get(key)
        if held is not None and held[0] == version:
            return held[1]
        intent = intend(body, attempt, self.settings)
        self._intents[key] = (version, intent)
        return intent

    async def tick(
        self, namespace: str, name: str, logger: logging.Logger | logging.LoggerAdapter[Any]
    ) -> tuple[bool, float | None]:
        """One reconcile; (whether the job still exists, seconds until something is due; infinity when
        nothing will be until an event wakes it)."""
        body = self.jobs.get(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return False, None
        pods = self.pods.indexed(namespace, names.selector_labels(name)[names.LABEL_JOB_NAME])
        # Only the nodes of workers being deleted or no longer Ready: a healthy gang costs no node reads.
        suspects = nodes_to_check(read_worker(pod) for pod in pods)
        nodes = await self._call(self.api.read_nodes, suspects) if suspects else {}
        stored = read_status(body)
        intent: Intent | None = None
        if stored.phase in FINISHED:  # rarely looked at again: not worth the memory of its rendering
            self._intents.pop((namespace, name), None)
        else:
            intent = self._intent(body, stored.attempt)
        actions = decide(body, pods, datetime.now(UTC), self.settings, nodes, intent, stored)
        try:
            await self._apply(body, actions)
        except kopf.PermanentError as exc:
            # The API server refused an object we rendered (admission, invalid field): retrying the same
            # object cannot help, so the job fails and says why.
            fresh = await self._call(self.api.read_job, namespace, name)
            if fresh is None:
                return False, None
            body = fresh
            actions = rejected(job_ref(body), read_status(body), str(exc), datetime.now(UTC))
            await self._apply(body, actions)
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
        if actions.requeue_after is None and actions.status.phase in FINISHED:
            return not actions.delete_job, float("inf")
        return not actions.delete_job, actions.requeue_after

    async def _apply(self, body: Mapping[str, Any], actions: Actions) -> None:
        """Apply the decision, then put what the API server returned into the stores, so the next pass
        starts from the writes this one made even before their watch events arrive."""
        written = await self._call(self.api.apply, body, actions)
        if written.job is not None:
            self.jobs.upsert(written.job)
        for pod in written.pods:
            self.pods.upsert(pod)

    async def _report(self, namespace: str, name: str, message: str) -> None:
        """A Warning event and the ApiError condition on the job for an API error that persists (a
        ResourceQuota, missing RBAC): `kubectl describe ftj`, `kubectl wait` and `ftctl status` show it.
        Best effort: the API may be what is failing."""
        try:
            body = await self._call(self.api.read_job, namespace, name)
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
        fresh = await self._call(self.api.read_job, meta["namespace"], meta["name"])
        if fresh is not None:
            await self._api_error(fresh, None)

    async def _api_error(self, body: Mapping[str, Any], message: str | None) -> None:
        updated = api_error(
            read_status(body), message, datetime.now(UTC), int(body["metadata"].get("generation") or 0)
        )
        if updated is not None:
            with contextlib.suppress(kopf.TemporaryError, kopf.PermanentError):
                self.jobs.upsert(await self._call(self.api.write_status, body, updated))

    async def _sleep(self, waker: asyncio.Event, delay: float | None) -> None:
        """Until woken, due, or (for a job not finished) the resync interval; then a short debounce to
        batch bursts of events."""
        timing = self.settings.timing
        timeout = timing.resync_seconds if delay is None else max(delay, 0.0)
        if timeout != float("inf"):
            timeout = min(timeout, timing.resync_seconds)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waker.wait(), None if timeout == float("inf") else timeout)
        waker.clear()
        await asyncio.sleep(timing.debounce_seconds)
