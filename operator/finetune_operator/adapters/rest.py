"""JSON requests to the API server by path: the kubernetes client's `ApiClient` (its configuration, auth
and token refresh, TLS and connection pool), without its generated API classes.

Why: the operator sends and reads the API's own JSON and never uses the client's models, yet importing
`CoreV1Api` loads 251 pydantic model modules (the operator started at 100 MiB with them, 75 MiB without,
and they cost 0.5 s of CPU at every start), and each generated call validates its arguments and serializes
its parameters (0.3 ms of CPU, against 0.035 ms for the same request made here). A path and a query are
all a call needs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, cast

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

#: A request's timeout: total seconds, or (connect, read).
Timeout = float | tuple[float, float]

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"


def collection(group: str, version: str, plural: str, namespace: str | None = None) -> str:
    """The path of a resource's collection: core (`group` "") or a named group; cluster-wide when
    `namespace` is None (for a namespaced resource, its objects in every namespace)."""
    base = f"/apis/{group}/{version}" if group else f"/api/{version}"
    return f"{base}/namespaces/{namespace}/{plural}" if namespace else f"{base}/{plural}"


class Rest:
    """Requests through one `ApiClient`; every answer that is not 2xx raises `ApiException`, as the
    generated classes do, so callers classify errors the same way."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client

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
        """The raw response, to read with `document` or `discard`, or to stream (a watch)."""
        headers = {"Accept": JSON} if body is None else {"Accept": JSON, "Content-Type": content_type}
        request = self.api_client.param_serialize(
            method,
            path,
            query_params=[(k, v) for k, v in (query or {}).items() if v is not None],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api_client.call_api(*request, _request_timeout=timeout)
        if not 200 <= response.status <= 299:
            response.read()  # type: ignore[no-untyped-call]
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        return cast(urllib3.BaseHTTPResponse, response.response)

    def get(self, path: str, **options: Any) -> dict[str, Any]:
        return document(self.call("GET", path, **options))

    def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return document(self.call("POST", path, body=body))


def document(response: urllib3.BaseHTTPResponse) -> dict[str, Any]:
    """A response's JSON body (the API's camelCase, no client models)."""
    return cast(dict[str, Any], json.loads(response.data))


def discard(response: urllib3.BaseHTTPResponse) -> None:
    """A response whose body is not needed, read to its end and its connection returned to the pool. Left
    unread, the connection is not reused, and every later request opens and handshakes a new one."""
    response.drain_conn()
    response.release_conn()
