"""The operator's API adapter over real HTTP (a local server standing in for the API server): its writes
send the bodies as they are, and read every response to the end so that one connection serves them all.
A response left unread keeps its connection out of the pool, and each later request then opens (and, to a
real API server, handshakes) a new one: 400 TLS handshakes at 200 jobs before this was found."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from kubernetes import client

from finetune_operator.adapters.kube import JobApi
from finetune_operator.client import JsonBodiesApiClient


class Server(ThreadingHTTPServer):
    daemon_threads = True
    connections = 0
    bodies: list[Any]


class Handler(BaseHTTPRequestHandler):
    """Answers every POST with 201 and the object it was sent, as the API server does for a create."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the API server
    server: Server

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.bodies.append(json.loads(body))
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


@pytest.fixture
def server() -> Iterator[Server]:
    httpd = Server(("127.0.0.1", 0), Handler)
    httpd.bodies = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_writes_send_their_bodies_as_they_are_and_reuse_one_connection(server: Server) -> None:
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{server.server_address[1]}"
    api = JobApi(JsonBodiesApiClient(configuration))
    sent = []
    for i in range(10):
        meta = {"name": f"tiny-{i}", "namespace": "team-a", "labels": {"finetune.dev/job-name": "tiny"}}
        configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"a": "1"}}
        service = {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": {"clusterIP": "None"}}
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {"containers": [{"name": "w"}]}}
        api.ensure(configmap)
        api.ensure(service)
        assert api.create_pod(pod) == pod
        sent += [configmap, service, pod]
    assert server.bodies == sent
    assert server.connections == 1
