"""The kopf wiring, and nothing else: which events reach which controller function.

Registered into an explicit registry by `register` (never at import time). kopf does not watch the
jobs: the controller's own informers (started here at startup) do, and the controller runs a loop per
job while it leads. Leading is one kopf daemon, on the FineTuneJob CRD: kopf runs daemons only in the
active peer and stops them when the replica pauses, so of two replicas exactly one acts, and a replica
that loses peering stops its loops.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
from collections.abc import Iterable
from typing import Any

import kopf
from kopf._core.intents.handlers import DaemonHandler

from finetune_operator.adapters.webhook import build_server
from finetune_operator.api.models import GROUP, PLURAL, VERSION
from finetune_operator.controller import Controller
from finetune_operator.core.admission import review
from finetune_operator.settings import Settings

#: The object the leading daemon runs for: it exists whenever jobs can.
CRD_NAME = f"{PLURAL}.{GROUP}"

#: The events' source (`kubectl describe`'s "From" column, reportingController).
REPORTING_COMPONENT = "finetune-operator"


def register(registry: kopf.OperatorRegistry, controller: Controller, operator_settings: Settings) -> None:
    """Declare the operator's handlers in `registry`."""
    webhook = operator_settings.webhook

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # The controller posts its own events for transitions; kopf's per-log-line events are noise.
        settings.posting.level = logging.WARNING
        # `kubectl describe ftj` shows who said it: the operator and its replica, not "kopf".
        settings.posting.reporting_component = REPORTING_COMPONENT
        settings.posting.reporting_instance = os.environ.get("POD_NAME") or socket.gethostname()
        settings.posting.event_name_prefix = "finetune-operator-"
        # Seconds a watch stays open before kopf reopens it: bounds how stale a silent watch can get.
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        settings.persistence.diffbase_storage = NoDiffBase()
        settings.peering.lifetime = operator_settings.peering.lifetime_seconds
        if webhook.port:
            settings.admission.server = build_server(webhook)
            settings.admission.managed = webhook.configuration or None

    @kopf.on.startup(registry=registry)
    async def start_informers(settings: kopf.OperatorSettings, **_: Any) -> None:
        controller.start(asyncio.get_running_loop(), settings)

    @kopf.on.cleanup(registry=registry)
    async def stop_informers(**_: Any) -> None:
        controller.stop()

    @kopf.on.probe(registry=registry, id="preflight")
    def preflight(**_: Any) -> dict[str, Any]:
        # /healthz shows what kept this replica from acting when it started (empty when nothing).
        return {"problems": list(controller.preflight_problems)}

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        # An explicit registry starts without kopf's default logins; kopf uses the adapter's credentials.
        return controller.credentials()

    @kopf.daemon(
        group="apiextensions.k8s.io",
        version="v1",
        plural="customresourcedefinitions",
        when=lambda name, **_: name == CRD_NAME,
        registry=registry,
        cancellation_timeout=10.0,
    )
    async def lead(stopped: kopf.DaemonStopped, **_: Any) -> None:
        # Returning when told to stop, rather than being cancelled, spares a warning at every pause.
        await controller.lead(stopped.wait())

    if webhook.port:

        @kopf.on.validate(
            GROUP,
            VERSION,
            PLURAL,
            id="plan",
            operations=["CREATE", "UPDATE"],
            ignore_failures=webhook.failure_policy == "Ignore",
            registry=registry,
        )
        def admit(body: kopf.Body, **kwargs: Any) -> None:
            # `old` is passed on updates only.
            message = review(body, kwargs.get("old"), operator_settings.render_options())
            if message is not None:
                raise kopf.AdmissionError(message, code=422)

    _daemons_without_finalizer(registry)


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf deep-copies every event's body to diff it against the last handled one, for on.create/update
    handlers; this operator registers none (a unit test keeps it so), and the copy was the largest CPU
    cost per job event at scale (2 ms of each). Nothing to build, fetch or store."""

    def build(self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


def _daemons_without_finalizer(registry: kopf.OperatorRegistry) -> None:
    """kopf puts a finalizer on every object a daemon runs for, so that it can stop the daemon before
    the object goes. Ours needs no such grace (all state is in the API server, owned objects are
    garbage-collected), and a finalizer on the CRD would keep it, and every job, from being deleted
    whenever the operator is not running. kopf offers no switch for daemons, so the registered handler
    is replaced by a copy with `requires_finalizer=False` (kopf pinned at 1.45.2; a unit test checks
    this still holds)."""
    spawning = registry._spawning
    spawning._handlers = [
        dataclasses.replace(handler, requires_finalizer=False)
        if isinstance(handler, DaemonHandler)
        else handler
        for handler in spawning._handlers
    ]
