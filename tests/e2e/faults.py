"""A fault-injecting proxy in front of the real API server, for the faults a real one will not give on
demand: 409 on a status write, 429 with Retry-After, 500, a watch that ends with 410 Gone, slow answers.

Everything else is the real API server's answer, so the operator under test still sees real objects,
resourceVersions, watches and admission; only the faults are made up. The operator is pointed at the
proxy through a kubeconfig with a plain-HTTP server; the proxy talks to the API server with the admin
client certificate. It runs an aiohttp server on its own event loop in a thread, and logs every request
with the fault it got, so a test can check that each fault was really given and how clients answered it.
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web
from kubernetes.client import Configuration

#: Hop-by-hop and encoding headers the proxy does not pass on (aiohttp sets its own).
DROPPED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "content-encoding", "accept-encoding"}
)
REASONS = {409: "Conflict", 410: "Expired", 429: "TooManyRequests", 500: "InternalError"}


@dataclass(frozen=True)
class Request:
    """What a fault rule sees of a request."""

    method: str
    path: str
    watch: bool
    user_agent: str
    name: str | None  # metadata.name of a created object (POST), else None

    @property
    def ours(self) -> bool:
        """Sent by the operator's own client (not kopf's, whose user agent is kopf/…)."""
        return self.user_agent.startswith("finetune-operator/")

    @property
    def key(self) -> tuple[str, str, str | None]:
        """The same request sent again has the same key (a POST to a collection: the same object)."""
        return self.method, self.path, self.name


@dataclass(frozen=True)
class Fault:
    """An answer the API server did not give: `status` (with `retry_after` seconds) instead of forwarding,
    or a `delay` before forwarding; `status` 410 on a watch is an ERROR event in an open stream."""

    kind: str
    status: int | None = None
    retry_after: int | None = None
    delay: float = 0.0


@dataclass(frozen=True)
class Rule:
    """Give `fault` to a request that `matches`, with probability `chance`."""

    matches: Callable[[Request], bool]
    fault: Fault
    chance: float


@dataclass(frozen=True)
class Seen:
    at: float  # time.monotonic()
    request: Request
    fault: str | None


def status_body(code: int, message: str) -> dict[str, object]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": REASONS.get(code, "InternalError"),
        "code": code,
    }


class FaultProxy:
    """`with FaultProxy(upstream) as proxy:` serves on 127.0.0.1:proxy.port until the block ends."""

    def __init__(self, upstream: Configuration, seed: int = 0) -> None:
        self.upstream = upstream.host
        self.tls = ssl.create_default_context(cafile=upstream.ssl_ca_cert)
        self.tls.load_cert_chain(upstream.cert_file, upstream.key_file)
        self.rules: list[Rule] = []  # replaced whole by the test thread; read by the proxy's loop
        self.seen: list[Seen] = []
        self.rng = random.Random(seed)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._stopping: asyncio.Event | None = None

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the fault proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=30)

    def kubeconfig(self, path: Path) -> Path:
        """A kubeconfig that reaches the API server through this proxy."""
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "proxy", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
                    "users": [{"name": "proxy", "user": {}}],
                    "contexts": [{"name": "proxy", "context": {"cluster": "proxy", "user": "proxy"}}],
                    "current-context": "proxy",
                }
            )
        )
        return path

    def given(self, kind: str) -> list[Seen]:
        return [s for s in list(self.seen) if s.fault == kind]

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self.tls, limit=0), timeout=timeout, auto_decompress=False
        ) as self._session:
            self._ready.set()
            await self._stopping.wait()
            await runner.cleanup()

    def _pick(self, request: Request) -> Fault | None:
        for rule in self.rules:
            if rule.matches(request) and self.rng.random() < rule.chance:
                return rule.fault
        return None

    async def _handle(self, incoming: web.Request) -> web.StreamResponse:
        body = await incoming.read()
        name = None
        if incoming.method == "POST" and body:
            try:
                name = (json.loads(body).get("metadata") or {}).get("name")
            except ValueError:
                name = None
        request = Request(
            incoming.method,
            incoming.path,
            incoming.query.get("watch") in ("true", "1"),
            incoming.headers.get("User-Agent", ""),
            name,
        )
        fault = self._pick(request)
        self.seen.append(Seen(time.monotonic(), request, fault.kind if fault else None))
        if fault is not None and fault.status is not None:
            if request.watch:
                stream = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
                await stream.prepare(incoming)
                return await self._end_watch(stream, fault)
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after else {}
            return web.json_response(
                status_body(fault.status, f"injected: {fault.kind}"), status=fault.status, headers=headers
            )
        if fault is not None and fault.delay:
            await asyncio.sleep(fault.delay)
        headers = {k: v for k, v in incoming.headers.items() if k.lower() not in DROPPED_HEADERS}
        async with self._session.request(
            incoming.method,
            self.upstream + incoming.path_qs,
            headers=headers,
            data=body or None,
            # No Content-Type sent means JSON to the API server, not octet-stream; no Accept-Encoding keeps
            # answers uncompressed, so the proxy can end a watch mid-stream with plain JSON.
            skip_auto_headers=("Content-Type", "Accept-Encoding"),
        ) as answer:
            response = web.StreamResponse(
                status=answer.status,
                headers={k: v for k, v in answer.headers.items() if k.lower() not in DROPPED_HEADERS},
            )
            await response.prepare(incoming)
            watching = request.watch and answer.status == 200
            pending = b""
            try:
                async for chunk in answer.content.iter_any():
                    if not watching:
                        await response.write(chunk)
                        continue
                    # A watch already open can end too, but only between events: a chunk may end mid-line,
                    # and an ERROR event written there would be a broken line no API server sends.
                    complete, newline, pending = (pending + chunk).rpartition(b"\n")
                    if not newline:
                        continue
                    ending = self._pick(request)
                    if ending is not None and ending.status is not None:
                        self.seen.append(Seen(time.monotonic(), request, ending.kind))
                        return await self._end_watch(response, ending)
                    await response.write(complete + newline)
                if pending:
                    await response.write(pending)
                await response.write_eof()
            except (ConnectionResetError, aiohttp.ClientError):
                pass  # the client went away (a watch it stopped) or the API server did
            return response

    @staticmethod
    async def _end_watch(stream: web.StreamResponse, fault: Fault) -> web.StreamResponse:
        """End a watch stream the way an API server does when its resourceVersion is too old: an ERROR
        event carrying the Status."""
        event = {"type": "ERROR", "object": status_body(fault.status or 410, f"injected: {fault.kind}")}
        await stream.write(json.dumps(event).encode() + b"\n")
        await stream.write_eof()
        return stream
