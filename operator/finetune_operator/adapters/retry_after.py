"""Retry-After: how long the API server asked a client to wait before trying again."""

from __future__ import annotations


def retry_after(exc: Exception) -> float | None:
    """The seconds an API server asked us to wait (429 or 503 with Retry-After: API priority and
    fairness, a server shedding load), or None."""
    headers = getattr(exc, "headers", None) or {}
    try:
        return max(float(headers.get("Retry-After", "")), 0.0)
    except ValueError:
        return None
