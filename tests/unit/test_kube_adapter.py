"""The operator's API adapter over real HTTP (a local server standing in for the API server).

Its writes send the bodies as they are, and read every response to the end so that one connection serves
them all: a response left unread keeps its connection out of the pool, and each later request then opens
(and, to a real API server, handshakes) a new one (400 TLS handshakes at 200 jobs before this was found).
Each call goes to the path, query and content type the API server expects, with the client's token, and
an error answer becomes the kopf error kind the controller retries or gives up on."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import kopf
import pytest
from kubernetes import client

from finetune_operator.adapters import preflight
from finetune_operator.adapters.kube import JobApi
from finetune_operator.api.models import FineTuneJobStatus
from finetune_operator.client import JsonBodiesApiClient
from finetune_operator.settings import from_env


@dataclass
class Sent:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


@dataclass
class Answer:
    status: int
    body: Any = None  # None: echo the request's body
    headers: dict[str, str] = field(default_factory=dict)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    connections = 0
    sent: list[Sent]
    #: (method, path) -> the answer; anything else is answered 200 with the request's body.
    answers: dict[tuple[str, str], Answer]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the API server
    server: Server

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def _answer(self) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.server.sent.append(
            Sent(self.command, url.path, dict(parse_qsl(url.query)), dict(self.headers), body)
        )
        answer = self.server.answers.get(
            (self.command, url.path), Answer(201 if self.command == "POST" else 200)
        )
        payload = json.dumps(body if answer.body is None else answer.body).encode()
        self.send_response(answer.status)
        for name, value in {"Content-Type": "application/json", **answer.headers}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


@pytest.fixture
def server() -> Iterator[Server]:
    httpd = Server(("127.0.0.1", 0), Handler)
    httpd.sent, httpd.answers = [], {}
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def api(server: Server) -> JobApi:
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{server.server_address[1]}"
    configuration.api_key = {"BearerToken": "s3cret"}
    configuration.api_key_prefix = {"BearerToken": "Bearer"}
    return JobApi(JsonBodiesApiClient(configuration))


JOBS = "/apis/finetune.dev/v1alpha1/namespaces/team-a/finetunejobs"
META = {"name": "tiny-0", "namespace": "team-a", "labels": {"finetune.dev/job-name": "tiny"}}


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "status": "Failure", "code": code, "reason": reason, "message": message}


def test_writes_send_their_bodies_as_they_are_and_reuse_one_connection(server: Server, api: JobApi) -> None:
    sent = []
    for i in range(10):
        meta = {**META, "name": f"tiny-{i}"}
        configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"a": "1"}}
        service = {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": {"clusterIP": "None"}}
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {"containers": [{"name": "w"}]}}
        api.ensure(configmap)
        api.ensure(service)
        assert api.create_pod(pod) == pod
        sent += [configmap, service, pod]
    assert [s.body for s in server.sent] == sent
    assert [s.path for s in server.sent[:3]] == [
        "/api/v1/namespaces/team-a/configmaps",
        "/api/v1/namespaces/team-a/services",
        "/api/v1/namespaces/team-a/pods",
    ]
    assert {s.headers["authorization"] for s in server.sent} == {"Bearer s3cret"}
    assert server.connections == 1


def test_each_call_goes_to_its_path_with_its_query_and_content_type(server: Server, api: JobApi) -> None:
    job = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "spec": {"a": 1}}
    job["metadata"] = {"name": "tiny", "namespace": "team-a", "resourceVersion": "7"}
    server.answers[("GET", f"{JOBS}/tiny")] = Answer(200, job)
    server.answers[("GET", "/api/v1/nodes/gone")] = Answer(404, status(404, "NotFound", "nodes gone"))
    server.answers[("POST", "/api/v1/namespaces/team-a/configmaps")] = Answer(
        409, status(409, "AlreadyExists", "")
    )
    server.answers[("GET", "/api/v1/namespaces/team-a/configmaps/tiny-0")] = Answer(200, {"data": {"a": "0"}})
    server.answers[("DELETE", "/api/v1/namespaces/team-a/pods/tiny-0")] = Answer(200, {"kind": "Pod"})

    assert api.read_job("team-a", "tiny") == job
    assert api.read_nodes(["gone"]) == {"gone": None}
    api.write_status(job, FineTuneJobStatus(phase="Running"))
    api.ensure({"apiVersion": "v1", "kind": "ConfigMap", "metadata": META, "data": {"a": "1"}})
    assert api.delete_pod("team-a", "tiny-0", force=True) == {"kind": "Pod"}
    api.delete_job("team-a", "tiny")

    calls = [(s.method, s.path, s.query) for s in server.sent]
    assert calls == [
        ("GET", f"{JOBS}/tiny", {}),
        ("GET", "/api/v1/nodes/gone", {}),
        ("PUT", f"{JOBS}/tiny/status", {}),
        ("POST", "/api/v1/namespaces/team-a/configmaps", {}),
        ("GET", "/api/v1/namespaces/team-a/configmaps/tiny-0", {}),
        ("PATCH", "/api/v1/namespaces/team-a/configmaps/tiny-0", {}),
        (
            "DELETE",
            "/api/v1/namespaces/team-a/pods/tiny-0",
            {"propagationPolicy": "Background", "gracePeriodSeconds": "0"},
        ),
        ("DELETE", f"{JOBS}/tiny", {"propagationPolicy": "Background"}),
    ]
    written = server.sent[2].body
    assert written["metadata"]["resourceVersion"] == "7"  # a stale decision gets 409
    assert written["status"]["phase"] == "Running"
    patch = server.sent[5]
    assert patch.headers["Content-Type"] == "application/merge-patch+json"
    assert patch.body == {"data": {"a": "1"}}


@pytest.mark.parametrize(
    ("answer", "kind", "delay"),
    [
        (
            Answer(429, status(429, "TooManyRequests", "slow down"), {"Retry-After": "3"}),
            kopf.TemporaryError,
            3.0,
        ),
        (Answer(500, status(500, "InternalError", "etcd")), kopf.TemporaryError, None),
        (Answer(422, status(422, "Invalid", "spec.containers: Required value")), kopf.PermanentError, None),
    ],
)
def test_an_error_answer_becomes_the_kind_the_controller_retries_or_gives_up_on(
    server: Server, api: JobApi, answer: Answer, kind: type[Exception], delay: float | None
) -> None:
    server.answers[("POST", "/api/v1/namespaces/team-a/pods")] = answer
    with pytest.raises(kind) as caught:
        api.create_pod({"apiVersion": "v1", "kind": "Pod", "metadata": META})
    assert answer.body["message"] in str(caught.value)
    assert getattr(caught.value, "delay", None) == delay


def test_preflight_names_a_missing_crd_and_each_refused_permission(server: Server, api: JobApi) -> None:
    crd = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/finetunejobs.finetune.dev"
    server.answers[("GET", crd)] = Answer(404, status(404, "NotFound", "no crd"))
    reviews = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
    server.answers[("POST", reviews)] = Answer(201, {"status": {"allowed": False}})

    settings = from_env({"FINETUNE_NAMESPACES": "team-a"})
    found = preflight.problems(api.rest, settings)

    assert "the FineTuneJob CRD (finetunejobs.finetune.dev) is not installed" in found[0]
    peering = f"/apis/kopf.dev/v1/namespaces/team-a/kopfpeerings/{settings.peering.name}"
    assert ("GET", peering) in [(s.method, s.path) for s in server.sent]
    assert not [p for p in found if "KopfPeering" in p]  # the server answered 200: it exists
    refused = [p for p in found if p.startswith("this account may not")]
    assert len(refused) == len(preflight.NEEDED)
    asked = [s.body["spec"]["resourceAttributes"] for s in server.sent if s.path == reviews]
    assert asked[2] == {
        "verb": "patch",
        "group": "finetune.dev",
        "resource": "finetunejobs",
        "subresource": "status",
        "namespace": "team-a",
    }
