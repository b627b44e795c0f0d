"""Serves the operator's Prometheus registry on /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server


def serve(registry: CollectorRegistry, port: int) -> None:
    """Start the /metrics endpoint in a daemon thread (no-op for port 0)."""
    if port:
        start_http_server(port, registry=registry)
