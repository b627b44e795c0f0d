"""Kubernetes events on a job, posted through kopf's event queue (batched, never blocking a reconcile)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import kopf

from finetune_operator.core.lifecycle import Event


def post(job: Mapping[str, Any], event: Event) -> None:
    kopf.event(cast(kopf.Body, job), type=event.type, reason=event.reason, message=event.message[:1024])
