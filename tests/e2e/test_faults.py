"""The fault proxy itself, against the real API server: a fault it makes up must look like one the API
server could give, or a test that uses it finds bugs in the proxy instead of the operator."""

from __future__ import annotations

import itertools
import json
import urllib.request

import pytest
from kubernetes.client import CoreV1Api, V1ConfigMap, V1ObjectMeta

from .conftest import Cluster
from .faults import Fault, FaultProxy, Rule

pytestmark = pytest.mark.cluster

#: 1.2 MB of events: each spans several of the chunks the proxy reads, and even on a loaded machine, where
#: aiohttp hands over what it buffered (it stops reading past 128 KiB), they come in more batches than the
#: latest pick (5). With 30 objects, a loaded CI run once got fewer, and the watch never ended.
OBJECTS = 60
OBJECT_BYTES = 20_000


def test_a_watch_the_proxy_ends_mid_stream_ends_between_events(cluster: Cluster, namespace: str) -> None:
    """The proxy ends a watch already streaming with a 410 ERROR event; it must come after a whole event,
    never inside one (a broken JSON line crashed kopf's watcher, which no API server would do)."""
    core = CoreV1Api(cluster.api_client)
    for i in range(OBJECTS):
        core.create_namespaced_config_map(
            namespace, V1ConfigMap(metadata=V1ObjectMeta(name=f"big-{i}"), data={"blob": "x" * OBJECT_BYTES})
        )
    with FaultProxy(cluster.api_client.configuration) as proxy:
        for end_at in (2, 3, 5):
            picks = itertools.count()  # picks: at the opening, then before each batch of whole lines
            proxy.rules = [
                Rule(lambda r, p=picks, n=end_at: r.watch and next(p) == n, Fault("expired", 410), 1.0)
            ]
            url = (  # the server's own timeout ends a watch the proxy did not end, failing the assert below
                f"http://127.0.0.1:{proxy.port}/api/v1/namespaces/{namespace}/configmaps"
                "?watch=1&resourceVersion=0&timeoutSeconds=20"
            )
            with urllib.request.urlopen(url, timeout=30) as stream:
                events = [json.loads(line) for line in stream]  # every line is a whole event
            assert events[-1]["type"] == "ERROR" and events[-1]["object"]["code"] == 410, events[-1]
            added = [e for e in events[:-1] if e["type"] == "ADDED"]
            assert 0 < len(added) < OBJECTS, (end_at, len(added))  # ended mid-stream, after whole events
            assert all(len(e["object"]["data"]["blob"]) == OBJECT_BYTES for e in added)
        assert len(proxy.given("expired")) == 3
