"""What an API server said when it refused a request, whichever client got the answer: the kubernetes
client's `ApiException` (ftctl, FineTuneClient) or the operator's own `ApiError` (adapters/rest.py)."""

from __future__ import annotations

import json
from typing import Protocol


class Refusal(Protocol):
    """An answer that is not 2xx, as both clients' exceptions hold it."""

    @property
    def status(self) -> int | None: ...

    @property
    def reason(self) -> str | None: ...

    @property
    def body(self) -> str | None: ...


def server_refusal(exc: Refusal) -> tuple[str, str]:
    """(reason, message) of an API server refusal, from the Status in its body (`NotFound`, `Forbidden`,
    what the webhook said); the HTTP status and reason where the body is not a Status."""
    try:
        body = json.loads(exc.body or "{}")
        return str(body.get("reason") or exc.status), str(body.get("message") or exc.reason)
    except (TypeError, ValueError, AttributeError):
        return str(exc.status), str(exc.reason)
