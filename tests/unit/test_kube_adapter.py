"""The operator's API adapter over real HTTP (a local server standing in for the API server).

Its writes send the bodies as they are, and read every response to the end so that one connection serves
them all: a response left unread keeps its connection out of the pool, and each later request then opens
(and, to a real API server, handshakes) a new one (400 TLS handshakes at 200 jobs before this was found).
Each call goes to the path, query and content type the API server expects, with the client's token, and
an error answer becomes the kopf error kind the controller retries or gives up on."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import kopf
import pytest

from finetune_operator.adapters import preflight
from finetune_operator.adapters.kube import JobApi
from finetune_operator.adapters.rest import Rest, lines
from finetune_operator.api.models import FineTuneJobStatus
from finetune_operator.settings import from_env


@dataclass
class Sent:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names in lower case
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
    #: (method, path) -> the answers, given in turn (the last again and again); anything else is
    #: answered 200 with the request's body.
    answers: dict[tuple[str, str], Answer | list[Answer]]
    #: The bearer token the server accepts (401 for any other).
    token: str
    #: What GET /watch streams, one chunk of the chunked answer each.
    chunks: list[bytes]


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
        headers = {name.lower(): value for name, value in self.headers.items()}
        self.server.sent.append(Sent(self.command, url.path, dict(parse_qsl(url.query)), headers, body))
        answer = self.server.answers.get(
            (self.command, url.path), Answer(201 if self.command == "POST" else 200)
        )
        if isinstance(answer, list):
            answer = answer.pop(0) if len(answer) > 1 else answer[0]
        if headers.get("authorization") != f"Bearer {self.server.token}":
            answer = Answer(401, status(401, "Unauthorized", "Unauthorized"))
        elif url.path == "/watch":
            self._stream()
            return
        payload = json.dumps(body if answer.body is None else answer.body).encode()
        self.send_response(answer.status)
        for name, value in {"Content-Type": "application/json", **answer.headers}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for chunk in [*self.server.chunks, b""]:
            self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.flush()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


@pytest.fixture
def server() -> Iterator[Server]:
    httpd = Server(("127.0.0.1", 0), Handler)
    httpd.sent, httpd.answers, httpd.token, httpd.chunks = [], {}, "s3cret", []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def api(server: Server) -> JobApi:
    return JobApi(Rest(lambda: kopf.ConnectionInfo(server=url(server), token=server.token)))


def url(server: Server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


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
    assert patch.headers["content-type"] == "application/merge-patch+json"
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


def test_a_refused_token_is_read_again_and_the_request_made_once_more(server: Server) -> None:
    """A service account's token is rotated in its file: the 401 after a rotation logs in again (kopf's
    login gets the same fresh credentials), and the request goes through."""
    logins = []

    def login() -> kopf.ConnectionInfo:
        logins.append(server.token)
        return kopf.ConnectionInfo(server=url(server), token=server.token)

    api = JobApi(Rest(login))
    server.token = "rotated"
    server.answers[("GET", f"{JOBS}/tiny")] = Answer(200, {"metadata": META})
    assert api.read_job("team-a", "tiny") == {"metadata": META}
    assert api.read_job("team-a", "tiny") == {"metadata": META}
    assert logins == ["s3cret", "rotated"]
    assert [s.headers["authorization"] for s in server.sent] == ["Bearer s3cret"] + ["Bearer rotated"] * 2
    assert api.credentials().token == "rotated"


def test_a_token_refused_again_is_an_error(server: Server) -> None:
    api = JobApi(Rest(lambda: kopf.ConnectionInfo(server=url(server), token="not ours")))
    with pytest.raises(kopf.PermanentError, match="401 Unauthorized"):
        api.read_job("team-a", "tiny")
    assert len(server.sent) == 2  # the first try and the one after logging in again, no more


def test_a_watch_is_read_line_by_line_as_its_chunks_arrive(server: Server, api: JobApi) -> None:
    events = [{"type": "ADDED", "object": {"metadata": {"name": f"tiny-{i}"}}} for i in range(3)]
    stream = b"".join(json.dumps(e).encode() + b"\n" for e in events)
    server.chunks = [stream[:10], stream[10:70], stream[70:]]  # lines split across chunks
    response = api.rest.call("GET", "/watch", query={"watch": True}, timeout=5.0)
    assert [json.loads(line) for line in lines(response)] == events
    assert server.sent[-1].query == {"watch": "true"}


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
    assert asked[-1] == {
        "verb": "watch",
        "group": "apiextensions.k8s.io",
        "resource": "customresourcedefinitions",
    }
    assert found[-1] == (
        "this account may not watch customresourcedefinitions cluster-wide: grant it (the chart's ClusterRole "
        "has every rule the operator needs)"
    )


def test_the_operator_process_never_loads_the_kubernetes_client() -> None:
    """kopf would import it (when installed) just to recognise its models: 25 MiB the operator never uses."""
    run = subprocess.run(
        [sys.executable, "-c", OPERATOR_MODULES],
        capture_output=True,
        text=True,
        check=True,
    )
    loaded = set(json.loads(run.stdout.splitlines()[-1]))
    assert {"kopf", "urllib3", "finetune_operator.adapters.rest", "finetune_operator.handlers"} <= loaded
    assert not [name for name in loaded if name.split(".")[0] == "kubernetes"]


#: `python -m finetune_operator --help`, then the modules it loaded (as a JSON list, on the last line).
OPERATOR_MODULES = """
import json, runpy, sys
sys.argv = ["finetune_operator", "--help"]
try:
    runpy.run_module("finetune_operator", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
print(json.dumps([name for name, module in sys.modules.items() if module is not None]))
"""
