"""The glue around the lifecycle: deciding from raw API documents, settings, metrics and kopf wiring."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import kopf
import pytest
import urllib3
from kopf._core.intents.causes import Activity
from kopf._core.intents.handlers import DaemonHandler
from operator_fixtures import NOW, job_doc, pod_doc

from finetune_operator import handlers
from finetune_operator.__main__ import JobPrefixFormatter
from finetune_operator.adapters.kube import classify
from finetune_operator.adapters.rest import ApiError
from finetune_operator.controller import ACTING_MESSAGE, Controller, decide
from finetune_operator.metrics import build_metrics
from finetune_operator.settings import PeeringSettings, Settings, WebhookSettings, from_env


def stored(document: dict[str, Any], status: dict[str, Any] | None = None) -> dict[str, Any]:
    """A job as the API server returns it (resourceVersion, creationTimestamp, maybe a status)."""
    body = json.loads(json.dumps(document))
    body["metadata"].update({"resourceVersion": "42", "creationTimestamp": "2025-01-01T00:00:00Z"})
    if status is not None:
        body["status"] = status
    return body


def test_decide_plans_and_creates_from_a_stored_document() -> None:
    actions = decide(stored(job_doc()), [], NOW, Settings())
    assert actions.status.phase == "Scheduling"
    assert [p["metadata"]["name"] for p in actions.create_pods] == ["tiny-worker-0", "tiny-worker-1"]
    assert actions.create_pods[0]["spec"]["containers"][0]["image"] == Settings().trainer.image


def test_decide_uses_kueue_for_queued_jobs() -> None:
    actions = decide(stored(job_doc(runPolicy={"queueName": "q"})), [], NOW, Settings())
    assert actions.create_pods[0]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "q"


def test_decide_fails_a_document_the_models_reject() -> None:
    document = job_doc()
    document["spec"]["training"] = {"learningRate": 5}
    actions = decide(stored(document), [], NOW, Settings())
    assert actions.status.phase == "Failed"
    failed = next(c for c in actions.status.conditions if c.type == "Failed")
    assert failed.reason == "InvalidSpec" and "spec.training.learningRate" in failed.message
    assert actions.create_pods == ()


def test_decide_ignores_an_unreadable_status_and_rebuilds_it() -> None:
    actions = decide(stored(job_doc(), {"phase": "Bogus"}), [pod_doc(0), pod_doc(1)], NOW, Settings())
    assert actions.status.phase == "Running"


def test_settings_from_env_by_group_and_field() -> None:
    settings = from_env(
        {
            "FINETUNE_RESTARTS_BACKOFF_SECONDS": "0.5",
            "FINETUNE_TIMING_RESYNC_SECONDS": "2",
            "FINETUNE_PEERING_STANDALONE": "true",
            "FINETUNE_TRAINER_IMAGE": "img:1",
            "FINETUNE_NAMESPACES": "a, b",
            "UNRELATED": "x",
        }
    )
    assert settings.restarts.backoff_seconds == 0.5
    assert settings.timing.resync_seconds == 2.0
    assert settings.peering.standalone is True
    assert settings.trainer.image == "img:1"
    assert settings.namespaces == ("a", "b")
    assert settings.lifecycle_policy().backoff(2) == 1.0
    assert settings.render_options().image == "img:1"


def test_settings_reject_malformed_values() -> None:
    with pytest.raises(ValueError, match="FINETUNE_TIMING_RESYNC_SECONDS"):
        from_env({"FINETUNE_TIMING_RESYNC_SECONDS": "soon"})


def test_kopf_watches_no_job_and_its_one_daemon_leads_from_the_crd_without_a_finalizer() -> None:
    registry = kopf.OperatorRegistry()
    handlers.register(registry, Controller(Settings(), api=None, metrics=build_metrics()), Settings())  # type: ignore[arg-type]
    daemons = [h for h in registry._spawning._handlers if isinstance(h, DaemonHandler)]
    assert len(daemons) == 1 and daemons[0].requires_finalizer is False
    assert daemons[0].selector is not None and daemons[0].selector.plural == "customresourcedefinitions"
    assert daemons[0].when is not None
    assert daemons[0].when(name="finetunejobs.finetune.dev") and not daemons[0].when(name="pods.example.com")
    # kopf watches a resource only for its handlers: none is for FineTuneJobs.
    resource_handlers = [
        *registry._spawning._handlers,
        *registry._changing._handlers,
        *registry._watching._handlers,
    ]
    assert [h.selector.plural for h in resource_handlers if h.selector] == ["customresourcedefinitions"]


def job_in_store(controller: Controller, name: str, uid: str, **meta: Any) -> None:
    job = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob"}
    controller.jobs.upsert({**job, "metadata": {"namespace": "ns", "name": name, "uid": uid, **meta}})
    controller._job_changed(controller.jobs.objects[("ns", name)], False)


def test_a_leading_replica_runs_one_loop_per_job_and_stops_them_all_when_it_no_longer_leads() -> None:
    """Loops start for the stored jobs when the replica leads and for jobs that come later, once each, not
    for a job being deleted; a loop that ends is started again only for a job created again; when kopf
    tells `lead` to stop, every loop is cancelled, and `lead` returns."""
    controller = Controller(
        Settings(peering=PeeringSettings(standalone=True)), api=None, metrics=build_metrics()
    )  # type: ignore[arg-type]
    started: list[tuple[str, str]] = []
    ends = {uid: asyncio.Event() for uid in ("a1", "a2", "b1", "l1")}

    async def loop(namespace: str, name: str, logger: logging.LoggerAdapter[Any]) -> None:
        uid = logger.extra["k8s_ref"]["uid"]  # type: ignore[index]
        started.append((name, uid))
        await ends[uid].wait()

    controller.run_job = loop  # type: ignore[method-assign]

    async def scenario() -> dict[str, Any]:
        job_in_store(controller, "a", "a1")
        job_in_store(controller, "b", "b1")
        assert started == [] and controller._loops == {}  # not leading yet: no loop
        stop = asyncio.Event()
        leading = asyncio.create_task(controller.lead(stop.wait()))
        await asyncio.sleep(0.01)
        seen: dict[str, Any] = {"leading": sorted(started)}
        job_in_store(controller, "late", "l1")
        job_in_store(controller, "late", "l1", resourceVersion="2")  # a change: still one loop
        job_in_store(controller, "going", "g1", deletionTimestamp="2025-01-01T00:00:00Z")
        await asyncio.sleep(0.01)
        seen["later"] = sorted(started)
        job_in_store(controller, "a", "a2")  # deleted and created again while its loop was ending
        ends["a1"].set()
        ends["b1"].set()  # b's job is the same: its loop ended for good (deleted by its TTL, say)
        await asyncio.sleep(0.01)
        seen["ended"] = sorted(started)
        seen["loops"] = sorted(name for _, name in controller._loops)
        tasks = list(controller._loops.values())
        stop.set()
        seen["returned"] = await leading is None
        seen["cancelled"] = [task.cancelled() for task in tasks]
        seen["after"] = dict(controller._loops)
        job_in_store(controller, "new", "n1")  # no longer leading: no loop
        return seen

    seen = asyncio.run(scenario())
    assert seen["leading"] == [("a", "a1"), ("b", "b1")]
    assert seen["later"] == [("a", "a1"), ("b", "b1"), ("late", "l1")]
    assert seen["ended"] == [("a", "a1"), ("a", "a2"), ("b", "b1"), ("late", "l1")]
    assert seen["loops"] == ["a", "late"]
    assert seen["cancelled"] == [True, True] and seen["after"] == {} and seen["returned"]
    assert len(started) == 4


@pytest.mark.parametrize("webhook_port", [0, 9443])
def test_no_handler_needs_kopfs_diff_base_so_the_operator_skips_it(webhook_port: int) -> None:
    settings = Settings(webhook=WebhookSettings(port=webhook_port))
    registry = kopf.OperatorRegistry()
    handlers.register(registry, Controller(settings, api=None, metrics=build_metrics()), settings)  # type: ignore[arg-type]
    # kopf diffs bodies only for on.create/update/delete/resume/field handlers: with one of those, the
    # empty diff base would make every event look like a creation.
    assert registry._changing._handlers == []
    kopf_settings = kopf.OperatorSettings()
    for handler in registry._activities._handlers:
        if handler.activity == Activity.STARTUP and handler.id.endswith(".configure"):
            handler.fn(settings=kopf_settings)
    assert isinstance(kopf_settings.persistence.diffbase_storage, handlers.NoDiffBase)
    body = kopf.Body({"metadata": {"name": "j"}, "spec": {"x": 1}})
    assert kopf_settings.persistence.diffbase_storage.build(body=body) == {}


def test_events_are_attributed_to_the_operator_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "finetune-operator-7d9c-abcde")
    registry = kopf.OperatorRegistry()
    handlers.register(registry, Controller(Settings(), api=None, metrics=build_metrics()), Settings())  # type: ignore[arg-type]
    settings = kopf.OperatorSettings()
    for handler in registry._activities._handlers:
        if handler.activity == Activity.STARTUP and handler.id.endswith(".configure"):
            handler.fn(settings=settings)
    posting = settings.posting
    assert (posting.reporting_component, posting.reporting_instance) == (
        "finetune-operator",
        "finetune-operator-7d9c-abcde",
    )


def test_wake_reaches_only_loops_this_replica_runs() -> None:
    controller = Controller(Settings(), api=None, metrics=build_metrics())  # type: ignore[arg-type]
    controller.wake("ns", "nobody")  # no loop: nothing happens, nothing is created
    assert controller._wakers == {}

    async def scenario() -> bool:
        waker = controller._wakers.setdefault(("ns", "job"), asyncio.Event())
        controller.wake("ns", "job")
        return waker.is_set()

    assert asyncio.run(scenario())


@pytest.mark.parametrize(("standalone", "waits"), [(False, (0.3, 0.2)), (True, (0.0, 0.0))])
def test_a_peered_replica_first_acts_a_handover_after_its_first_loop(
    standalone: bool, waits: tuple[float, float], caplog: pytest.LogCaptureFixture
) -> None:
    """The first loop waits `handover_seconds`; one that starts 0.1 s later waits the rest, one after that
    not at all; standalone, nobody waits. The log says once when the replica began to act."""
    caplog.set_level(logging.INFO, logger="finetune_operator.controller")
    settings = Settings(peering=PeeringSettings(standalone=standalone, handover_seconds=0.3))
    controller = Controller(settings, api=None, metrics=build_metrics())  # type: ignore[arg-type]

    async def waited() -> float:
        loop = asyncio.get_running_loop()
        begun = loop.time()
        await controller._handover()
        return loop.time() - begun

    async def loops() -> list[float]:
        first = asyncio.create_task(waited())
        await asyncio.sleep(0.1)
        second = asyncio.create_task(waited())
        return [await first, await second, await waited()]

    first, second, later = asyncio.run(loops())
    assert (first, second) == (pytest.approx(waits[0], abs=0.05), pytest.approx(waits[1], abs=0.05))
    assert later < 0.05  # after the handover nobody waits
    acting = [r for r in caplog.records if r.getMessage().startswith(ACTING_MESSAGE)]
    assert len(acting) == (0 if standalone else 1)


def refused(status: int, reason: str, body: str = "", headers: dict[str, str] | None = None) -> ApiError:
    return ApiError(status, reason, body, headers or {})


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (refused(409, "Conflict"), kopf.TemporaryError),
        (refused(429, "Too Many Requests"), kopf.TemporaryError),
        (refused(503, "Unavailable"), kopf.TemporaryError),
        (urllib3.exceptions.ProtocolError("Connection aborted."), kopf.TemporaryError),
        (ConnectionRefusedError("refused"), kopf.TemporaryError),
        (refused(422, "Unprocessable Entity"), kopf.PermanentError),
        (refused(400, "Bad Request"), kopf.PermanentError),
    ],
)
def test_api_errors_are_temporary_or_permanent(error: Exception, kind: type[Exception]) -> None:
    classified = classify(error, "create pod ns/x")
    assert type(classified) is kind
    assert str(classified).startswith("create pod ns/x")


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ('pods "x" is forbidden: exceeded quota: gpus, requested: nvidia.com/gpu=8', kopf.TemporaryError),
        (
            'pods is forbidden: User "system:serviceaccount:ops:op" cannot create resource "pods"',
            kopf.TemporaryError,
        ),
        ('pods "x" is forbidden: no PriorityClass with name nope was found', kopf.PermanentError),
    ],
)
def test_forbidden_is_temporary_only_for_quota_and_rbac(message: str, kind: type[Exception]) -> None:
    """Quota and RBAC refusals clear without a spec change; an admission plugin's refusal does not."""
    error = refused(403, "Forbidden", json.dumps({"kind": "Status", "message": message}))
    assert type(classify(error, "create pod ns/x")) is kind


def test_api_error_messages_come_from_the_status_body() -> None:
    error = refused(
        422,
        "Unprocessable Entity",
        json.dumps({"kind": "Status", "message": 'Pod "x" is invalid: spec.priorityClassName: not found'}),
    )
    assert "spec.priorityClassName: not found" in str(classify(error, "create pod ns/x"))


@pytest.mark.parametrize(("header", "delay"), [("3", 3.0), ("0.5", 0.5), ("soon", None), (None, None)])
def test_a_throttled_call_waits_as_long_as_the_server_asked(header: str | None, delay: float | None) -> None:
    """429 with Retry-After (API priority and fairness): the retry comes no sooner than the header says;
    a missing or unreadable header leaves the controller's own backoff."""
    error = refused(429, "Too Many Requests", headers={"Retry-After": header} if header is not None else {})
    classified = classify(error, "write status ns/x")
    assert isinstance(classified, kopf.TemporaryError)
    assert classified.delay == delay


def test_a_jobs_log_lines_name_the_job_and_its_events_do_not() -> None:
    logger = kopf.ObjectLogger(
        body=kopf.Body({"metadata": {"namespace": "ns", "name": "job", "uid": "u"}}),
        settings=kopf.OperatorSettings(),
    )
    lines: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = lines.append  # type: ignore[method-assign]
    logger.logger.addHandler(handler)
    try:
        logger.warning("%s: %s", "Running", "2 workers")
        logging.getLogger("elsewhere").addHandler(handler)
        logging.getLogger("elsewhere").warning("not about a job")
        crd = kopf.Body({"metadata": {"name": "finetunejobs.finetune.dev"}})
        kopf.ObjectLogger(body=crd, settings=kopf.OperatorSettings()).warning("cluster-scoped")
    finally:
        logger.logger.removeHandler(handler)
        logging.getLogger("elsewhere").removeHandler(handler)
    formatter = JobPrefixFormatter("%(levelname)s %(message)s")
    assert [formatter.format(r) for r in lines] == [
        "WARNING [ns/job] Running: 2 workers",
        "WARNING not about a job",
        "WARNING [finetunejobs.finetune.dev] cluster-scoped",
    ]
    assert lines[0].getMessage() == "Running: 2 workers"  # the record itself (what kopf posts) is untouched
