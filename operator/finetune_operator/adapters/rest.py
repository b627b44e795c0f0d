"""JSON requests to the API server by path, over one urllib3 connection pool: the operator's whole client.

Why not the kubernetes client: the operator sends and reads the API's own JSON and never uses the client's
models, yet its generated API classes loaded 251 pydantic model modules (25 MiB), its package alone adds 285
modules and 10 MiB that nothing else in the operator loads, and its generated calls validate their arguments
and serialize their parameters (0.3 ms of CPU, against 0.035 ms for the same request made here). A path, a
query and the credentials kopf uses too (`adapters/login.py`) are all a call needs.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast
from urllib.parse import urlencode

import kopf
import urllib3

from finetune_operator import USER_AGENT

#: A request's timeout: total seconds, or (connect, read).
Timeout = float | tuple[float, float]

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"


class ApiError(Exception):
    """An answer that is not 2xx: its HTTP status, reason, body (usually a `Status`) and headers
    (`Retry-After`). The attributes are those of the kubernetes client's ApiException, so a refusal is
    read the same way whichever client got it (`api.refusal.server_refusal`)."""

    def __init__(self, status: int, reason: str, body: str, headers: Mapping[str, str]) -> None:
        super().__init__(f"({status}) {reason}: {body[:500]}")
        self.status = status
        self.reason = reason
        self.body = body
        self.headers = headers


def collection(group: str, version: str, plural: str, namespace: str | None = None) -> str:
    """The path of a resource's collection: core (`group` "") or a named group; cluster-wide when
    `namespace` is None (for a namespaced resource, its objects in every namespace)."""
    base = f"/apis/{group}/{version}" if group else f"/api/{version}"
    return f"{base}/namespaces/{namespace}/{plural}" if namespace else f"{base}/{plural}"


def query_string(query: Mapping[str, Any] | None) -> str:
    """`?a=1&watch=true`, leaving out None values; booleans as the API server spells them."""
    pairs = [
        (k, str(v).lower() if isinstance(v, bool) else v) for k, v in (query or {}).items() if v is not None
    ]
    return f"?{urlencode(pairs)}" if pairs else ""


class Rest:
    """Requests through one connection pool, logged in by `login`; every answer that is not 2xx raises
    `ApiError`. A 401 logs in again and retries once: a service account's token is rotated in its file
    by the kubelet, and the file is read anew on each login."""

    def __init__(self, login: Callable[[], kopf.ConnectionInfo], pool_size: int = 10) -> None:
        self._login = login
        self._pool_size = pool_size
        self._lock = threading.Lock()
        self.relogin()

    def relogin(self) -> kopf.ConnectionInfo:
        """Read the credentials afresh and use them from now on; kopf's own login gets the same."""
        info = self._login()
        pool_options: dict[str, Any] = {"maxsize": self._pool_size, "num_pools": 2}
        if info.server.startswith("https:"):
            pool_options["ssl_context"] = info.as_ssl_context()
        pool = (
            urllib3.ProxyManager(info.proxy_url, **pool_options)
            if info.proxy_url
            else urllib3.PoolManager(**pool_options)
        )
        headers = {"Accept": JSON, "User-Agent": USER_AGENT, **info.as_http_headers()}
        with self._lock:
            self._server, self._pool, self._headers = info.server.rstrip("/"), pool, headers
        return info

    def call(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str = JSON,
        timeout: Timeout | None = None,
    ) -> urllib3.BaseHTTPResponse:
        """The raw response, to read with `document` or `discard`, or to stream (a watch, with `lines`)."""
        target, payload = path + query_string(query), None if body is None else json.dumps(body).encode()
        response = self._send(method, target, payload, content_type, timeout)
        if response.status == 401:
            discard(response)
            self.relogin()
            response = self._send(method, target, payload, content_type, timeout)
        if not 200 <= response.status <= 299:
            raise ApiError(
                response.status,
                response.reason or "",
                response.data.decode(errors="replace"),
                response.headers,
            )
        return response

    def _send(
        self, method: str, target: str, payload: bytes | None, content_type: str, timeout: Timeout | None
    ) -> urllib3.BaseHTTPResponse:
        with self._lock:
            server, pool, headers = self._server, self._pool, self._headers
        if payload is not None:
            headers = {**headers, "Content-Type": content_type}
        return pool.request(
            method,
            server + target,
            body=payload,
            headers=headers,
            timeout=as_timeout(timeout),
            preload_content=False,
        )

    def get(self, path: str, **options: Any) -> dict[str, Any]:
        return document(self.call("GET", path, **options))

    def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return document(self.call("POST", path, body=body))


def as_timeout(timeout: Timeout | None) -> urllib3.Timeout | None:
    if timeout is None:
        return None
    if isinstance(timeout, tuple):
        return urllib3.Timeout(connect=timeout[0], read=timeout[1])
    return urllib3.Timeout(total=timeout)


def document(response: urllib3.BaseHTTPResponse) -> dict[str, Any]:
    """A response's JSON body (the API's camelCase, no client models)."""
    return cast(dict[str, Any], json.loads(response.data))


def discard(response: urllib3.BaseHTTPResponse) -> None:
    """A response whose body is not needed, read to its end and its connection returned to the pool. Left
    unread, the connection is not reused, and every later request opens and handshakes a new one."""
    response.drain_conn()
    response.release_conn()


def lines(response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    """A streamed response's lines as they arrive (a watch sends one JSON event per line)."""
    pending = b""
    # amt=None: each chunk of the chunked answer as it comes, not blocks of a fixed size (which would wait).
    for chunk in response.stream(amt=None, decode_content=False):
        pending += chunk
        *complete, pending = pending.split(b"\n")
        yield from (line for line in complete if line)
    if pending:
        yield pending
