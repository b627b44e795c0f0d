"""What the API server last said about our jobs and their pods: a list-then-watch cache (an informer).

Why: a quorum GET of the job and a LIST of its pods on every pass made the operator's cost grow with
the number of jobs times their passes, even for jobs where nothing happened. Instead one watch per
resource (pods with a server-side label selector, namespace-scoped where the operator is) keeps a
`Store` current, and each pass reads from it for free.

Nothing here outlives a restart, and nothing needs to: a store is filled by a LIST before the first
pass reads it (`Informer.synced`), relisted whenever its watch cannot resume (410 Gone, errors), and
decisions stay safe against a store that lags: status writes carry the resourceVersion they were
decided from (a stale one gets 409 and a retry), creating an existing pod is a no-op, and the
controller puts what its own writes returned into the store (`Store.upsert`) so its next pass does
not repeat them. Tombstones keep such a write-through from resurrecting an object whose deletion
the watch has already reported.

The watches run in one thread each (rest.py's client is synchronous) and hand every change to
the event loop, which alone touches the stores: no locks.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import urllib3

from finetune_operator.adapters.rest import Rest, Timeout, document, lines
from finetune_operator.adapters.retry_after import retry_after

log = logging.getLogger(__name__)

Key = tuple[str, str]
Document = dict[str, Any]

#: Seconds a deletion is remembered, to refuse a write-through that raced it (one request's duration
#: would do; this is ample and keeps the tombstones of a 1,000-job soak few).
TOMBSTONE_SECONDS = 120.0
#: Seconds the API server keeps one watch open before we resume it from the last resourceVersion.
WATCH_SECONDS = 300
#: Items per LIST page: bounds the size of one response on big clusters.
PAGE = 500
#: Strings up to this long are interned in the stores (`compact`): keys, label values, phases, reasons.
INTERNED_LENGTH = 32


def resource_version(obj: Mapping[str, Any]) -> int | None:
    """The object's resourceVersion as a number (etcd's revision), None if it is not one."""
    value = (obj.get("metadata") or {}).get("resourceVersion")
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


def key_of(obj: Mapping[str, Any]) -> Key:
    meta = obj["metadata"]
    return meta.get("namespace", ""), meta["name"]


def compact(value: Any) -> Any:
    """`value` with its keys and short strings interned. json makes every document its own copy of each
    key and of values such as "True", "Running" or a label, so a thousand jobs held a thousand copies of
    each; shared, a job's document in the store takes half the memory (deep size 9.3 → 4.3 KiB), for
    about 20 µs of CPU per stored change."""
    if isinstance(value, dict):
        return {sys.intern(k): compact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [compact(v) for v in value]
    if isinstance(value, str) and len(value) <= INTERNED_LENGTH:
        return sys.intern(value)
    return value


def namespace_matches(namespace: str, patterns: Iterable[str]) -> bool:
    """Whether `namespace` is one the operator serves (no patterns: all)."""
    patterns = tuple(patterns)
    return not patterns or any(fnmatch.fnmatchcase(namespace, p) for p in patterns)


@dataclass
class Store:
    """Objects by (namespace, name), and by (namespace, index value) when `index` is given.

    `transform` trims each object to what the controller reads (managedFields and most of a pod's
    spec are the bulk of its size), so the memory held grows with the jobs, not with their manifests;
    what it keeps shares its keys and short strings with every other object (`compact`).
    """

    index: Callable[[Mapping[str, Any]], str | None] | None = None
    transform: Callable[[Document], Document] = lambda obj: obj
    objects: dict[Key, Document] = field(default_factory=dict)
    by_index: dict[Key, dict[str, Document]] = field(default_factory=dict)
    tombstones: dict[Key, tuple[int | None, float]] = field(default_factory=dict)

    def get(self, namespace: str, name: str) -> Document | None:
        return self.objects.get((namespace, name))

    def indexed(self, namespace: str, value: str) -> list[Document]:
        return list(self.by_index.get((namespace, value), {}).values())

    def upsert(self, obj: Document) -> bool:
        """Store `obj` unless the store already holds a newer version, or saw it deleted at or after this
        version; True when stored."""
        key = key_of(obj)
        version = resource_version(obj)
        dead = self.tombstones.get(key)
        if dead is not None and (version is None or dead[0] is None or version <= dead[0]):
            return False
        held = self.objects.get(key)
        if held is not None:
            held_version = resource_version(held)
            if version is not None and held_version is not None and version < held_version:
                return False
        self._unindex(held)
        obj = compact(self.transform(obj))
        self.objects[key] = obj
        if self.index is not None and (value := self.index(obj)) is not None:
            self.by_index.setdefault((key[0], value), {})[key[1]] = obj
        return True

    def remove(self, obj: Mapping[str, Any]) -> None:
        """The watch reported `obj` deleted."""
        key = key_of(obj)
        self._unindex(self.objects.pop(key, None))
        now = time.monotonic()
        self.tombstones[key] = (resource_version(obj), now)
        if len(self.tombstones) > 64:
            self.tombstones = {k: v for k, v in self.tombstones.items() if now - v[1] < TOMBSTONE_SECONDS}

    def replace(self, objs: Iterable[Document]) -> set[Key]:
        """A fresh LIST: the store becomes exactly `objs`; the keys of everything added, changed or gone."""
        before = self.objects
        self.objects, self.by_index, self.tombstones = {}, {}, {}
        for obj in objs:
            self.upsert(obj)
        changed = {k for k in before.keys() | self.objects.keys() if before.get(k) != self.objects.get(k)}
        return changed

    def _unindex(self, obj: Document | None) -> None:
        if obj is None or self.index is None or (value := self.index(obj)) is None:
            return
        bucket = self.by_index.get((obj["metadata"].get("namespace", ""), value))
        if bucket is not None:
            bucket.pop(obj["metadata"]["name"], None)
            if not bucket:
                del self.by_index[(obj["metadata"].get("namespace", ""), value)]


@dataclass(frozen=True)
class Source:
    """One watched resource: the path of its collection in one namespace or, for None, in all
    (`rest.collection`), listed and watched through `rest`."""

    what: str
    rest: Rest
    collection: Callable[[str | None], str]
    label_selector: str | None = None


class Informer:
    """Keeps `store` current with the resource of `source` in `namespaces` (exact names each get their own
    watch; patterns, or none, mean one cluster-wide watch filtered here). `on_change(namespace, name,
    gone)` runs on the loop for each change the store took (`obj` as last seen, `gone` once deleted)."""

    def __init__(
        self,
        source: Source,
        store: Store,
        namespaces: tuple[str, ...],
        on_change: Callable[[Document, bool], None],
    ) -> None:
        self.source = source
        self.store = store
        self.patterns = namespaces
        exact = all(not any(c in p for c in "*?[") for p in namespaces)
        self.scopes: tuple[str | None, ...] = namespaces if namespaces and exact else (None,)
        self.on_change = on_change
        self.synced = asyncio.Event()
        self._listed: set[str | None] = set()
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[threading.Thread] = []

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start one watch thread per scope; `synced` is set once every scope has been listed."""
        self._loop = loop
        for scope in self.scopes:
            thread = threading.Thread(
                target=self._run,
                args=(scope,),
                name=f"watch-{self.source.what}-{scope or 'all'}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()

    # --- on the loop ------------------------------------------------------------------------------

    def _listed_scope(self, scope: str | None, items: list[Document]) -> None:
        before = dict(self.store.objects)
        keep = [o for o in before.values() if scope is not None and o["metadata"]["namespace"] != scope]
        changed = self.store.replace([*keep, *items])
        self._listed.add(scope)
        if self._listed >= set(self.scopes):
            self.synced.set()
        for key in changed:
            now = self.store.objects.get(key)
            self.on_change(now if now is not None else before[key], now is None)

    def _event(self, kind: str, obj: Document) -> None:
        if kind == "DELETED":
            self.store.remove(obj)
            self.on_change(obj, True)
        elif self.store.upsert(obj):
            self.on_change(obj, False)

    # --- in the watch thread ----------------------------------------------------------------------

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the operator is exiting
            self._stop.set()

    def _call(self, scope: str | None, timeout: Timeout, **query: Any) -> urllib3.BaseHTTPResponse:
        query["labelSelector"] = self.source.label_selector
        return self.source.rest.call("GET", self.source.collection(scope), query=query, timeout=timeout)

    def _list(self, scope: str | None) -> tuple[list[Document], str]:
        items: list[Document] = []
        token: str | None = None
        while True:
            page = document(self._call(scope, (10, 60), limit=PAGE, **{"continue": token}))
            items.extend(
                o for o in page["items"] if namespace_matches(o["metadata"]["namespace"], self.patterns)
            )
            token = page["metadata"].get("continue")
            if not token:
                return items, page["metadata"]["resourceVersion"]

    def _watch(self, scope: str | None, version: str) -> Iterator[tuple[str, Document]]:
        response = self._call(
            scope,
            # A connection that goes silent (an API server gone without a FIN) ends, and is relisted.
            (10, WATCH_SECONDS + 30),
            watch=True,
            resourceVersion=version,
            allowWatchBookmarks=True,
            timeoutSeconds=WATCH_SECONDS,
        )
        try:
            for line in lines(response):
                if self._stop.is_set():
                    return
                event = json.loads(line)
                yield event["type"], event["object"]
        finally:
            response.release_conn()

    def _run(self, scope: str | None) -> None:
        """List, then watch from the list's resourceVersion, resuming from the last one seen; relist when the
        server says it is too old (410) or anything fails (after a backoff)."""
        failures = 0
        while not self._stop.is_set():
            try:
                items, version = self._list(scope)
                self._post(self._listed_scope, scope, items)
                failures = 0
                while not self._stop.is_set():
                    for kind, obj in self._watch(scope, version):
                        if kind == "ERROR":
                            raise Gone(obj.get("message", "watch error"))
                        version = obj["metadata"]["resourceVersion"]
                        if kind != "BOOKMARK" and namespace_matches(
                            obj["metadata"]["namespace"], self.patterns
                        ):
                            self._post(self._event, kind, obj)
            except Gone as exc:
                log.info("%s watch expired (%s); listing again", self.source.what, exc)
            except Exception as exc:  # the API server restarting, a network error: list again after a pause
                failures += 1
                delay = max(min(2.0 ** min(failures, 5), 30.0), retry_after(exc) or 0.0)
                log.warning("%s watch failed (%s); listing again in %.0fs", self.source.what, exc, delay)
                self._stop.wait(delay)


class Gone(Exception):
    """The watch's resourceVersion is too old (410), or the server ended it with an error event."""
