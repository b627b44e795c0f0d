"""API-server calls for one job: read it and its pods, then apply a decision in a fixed order.

Synchronous (rest.py's urllib3 pool), run in a worker thread by the controller. Every call is
idempotent: creating an object that exists is success (AlreadyExists, 409), deleting one that is gone
is success (NotFound, 404). Errors become kopf's two kinds: `TemporaryError` (conflicts, throttling,
server errors, network) is retried with backoff; `PermanentError` (the API server refused the object
itself, 400/422) will not get better by retrying.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import kopf
import urllib3

from finetune_operator.adapters.informer import Source
from finetune_operator.adapters.rest import MERGE_PATCH, ApiError, Rest, collection, discard, document
from finetune_operator.adapters.retry_after import retry_after
from finetune_operator.api.models import GROUP, PLURAL, VERSION, FineTuneJobStatus
from finetune_operator.api.refusal import server_refusal
from finetune_operator.core import names
from finetune_operator.core.lifecycle import Actions
from finetune_operator.core.status import NodeView, read_node
from finetune_operator.scheduling import coscheduling

log = logging.getLogger(__name__)

#: Status codes worth retrying: conflict (stale resourceVersion), throttling, server-side trouble.
#: 403 is here too: a ResourceQuota refusal ("exceeded quota") clears when other work ends.
RETRYABLE_STATUS = frozenset({409, 429, 500, 502, 503, 504})
#: 403s that clear by themselves (a quota frees up when other work ends) or by an admin fixing RBAC;
#: any other 403 is an admission plugin refusing this object (e.g. a missing PriorityClass): permanent.
RETRYABLE_FORBIDDEN = ("exceeded quota", " cannot ")


def classify(exc: Exception, what: str) -> kopf.TemporaryError | kopf.PermanentError:
    """kopf's error kind for a failed API call."""
    if isinstance(exc, ApiError):
        detail = server_refusal(exc)[1]
        transient_403 = exc.status == 403 and any(marker in detail for marker in RETRYABLE_FORBIDDEN)
        if exc.status in RETRYABLE_STATUS or transient_403:
            return kopf.TemporaryError(f"{what}: {exc.status} {detail}", delay=retry_after(exc))
        return kopf.PermanentError(f"{what}: {exc.status} {detail}")
    if isinstance(exc, urllib3.exceptions.HTTPError | OSError):
        return kopf.TemporaryError(f"{what}: {exc}")
    return kopf.PermanentError(f"{what}: {exc!r}")


@dataclass(frozen=True)
class Written:
    """What the API server returned for a decision's writes: the job after its status write (None when the
    status did not change), and the pods created or being deleted."""

    job: dict[str, Any] | None
    pods: tuple[dict[str, Any], ...]


#: Where `ensure` creates each kind it handles: (group, version, plural).
ENSURED = {
    "ConfigMap": ("", "v1", "configmaps"),
    "Service": ("", "v1", "services"),
    "ServiceAccount": ("", "v1", "serviceaccounts"),
    "RoleBinding": ("rbac.authorization.k8s.io", "v1", "rolebindings"),
    coscheduling.KIND: (coscheduling.GROUP, coscheduling.VERSION, coscheduling.PLURAL),
}


def jobs_path(namespace: str | None) -> str:
    return collection(GROUP, VERSION, PLURAL, namespace)


def job_path(namespace: str, name: str) -> str:
    return f"{jobs_path(namespace)}/{name}"


def pods_path(namespace: str | None) -> str:
    return collection("", "v1", "pods", namespace)


class JobApi:
    """Reads and writes for FineTuneJobs and the objects they own."""

    def __init__(self, rest: Rest) -> None:
        self.rest = rest

    def credentials(self) -> kopf.ConnectionInfo:
        """What kopf logs in with: the credentials read afresh (kopf asks again on a 401), which this
        adapter's own requests use from now on too."""
        return self.rest.relogin()

    def job_source(self) -> Source:
        """How the job informer lists and watches FineTuneJobs."""
        return Source(PLURAL, self.rest, jobs_path)

    def pod_source(self) -> Source:
        """How the pod informer lists and watches workers: only pods with the job-name label, selected by
        the API server (a cluster's other pods never reach the operator)."""
        return Source("pods", self.rest, pods_path, names.LABEL_JOB_NAME)

    # --- reads ------------------------------------------------------------------------------------

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The job as stored now (a quorum read), or None once it is gone."""
        try:
            return self.rest.get(job_path(namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise classify(exc, f"read finetunejob {namespace}/{name}") from exc
        except Exception as exc:
            raise classify(exc, f"read finetunejob {namespace}/{name}") from exc

    def read_nodes(self, node_names: Iterable[str]) -> dict[str, NodeView | None]:
        """The readiness of these nodes (None: the node no longer exists). A node the operator may not read
        (RBAC without nodes/get) is left out, so its workers are never taken as lost on a guess."""
        found: dict[str, NodeView | None] = {}
        for name in node_names:
            try:
                found[name] = read_node(self.rest.get(f"{collection('', 'v1', 'nodes')}/{name}"))
            except ApiError as exc:
                if exc.status == 404:
                    found[name] = None
                elif exc.status == 403:
                    log.warning(
                        "cannot read node %s to tell whether it is lost: %s", name, server_refusal(exc)[1]
                    )
                else:
                    raise classify(exc, f"read node {name}") from exc
            except Exception as exc:
                raise classify(exc, f"read node {name}") from exc
        return found

    # --- writes -----------------------------------------------------------------------------------

    def write_status(self, job: Mapping[str, Any], status: FineTuneJobStatus) -> dict[str, Any]:
        """Replace the status, guarded by the resourceVersion the decision was made from (409 if stale)."""
        meta = job["metadata"]
        body = {
            "apiVersion": job["apiVersion"],
            "kind": job["kind"],
            "metadata": {
                "name": meta["name"],
                "namespace": meta["namespace"],
                "resourceVersion": meta["resourceVersion"],
            },
            "spec": job.get("spec", {}),
            "status": status.model_dump(mode="json", by_alias=True, exclude_none=True),
        }
        try:
            return document(
                self.rest.call("PUT", f"{job_path(meta['namespace'], meta['name'])}/status", body=body)
            )
        except Exception as exc:
            raise classify(exc, f"write status of {meta['namespace']}/{meta['name']}") from exc

    def ensure(self, obj: Mapping[str, Any]) -> None:
        """Create a ConfigMap, Service, ServiceAccount, RoleBinding or PodGroup; an existing ConfigMap is
        brought up to date, the others are left as they are (an account or binding someone else made wins;
        a PodGroup is one attempt's and never changes)."""
        kind, meta = obj["kind"], obj["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        what = f"create {kind.lower()} {namespace}/{name}"
        try:
            if kind not in ENSURED:
                raise ValueError(f"ensure does not handle {kind}")
            discard(self.rest.call("POST", collection(*ENSURED[kind], namespace), body=obj))
        except ApiError as exc:
            if exc.status == 404 and kind == coscheduling.KIND:
                raise kopf.PermanentError(
                    f"{what}: the PodGroup API ({coscheduling.GROUP}/{coscheduling.VERSION}) is not served: "
                    "install scheduler-plugins (its PodGroup CRD and a scheduler with Coscheduling), or set "
                    "runPolicy.gangScheduling: none"
                ) from exc
            if exc.status != 409:
                raise classify(exc, what) from exc
            if kind == "ConfigMap":
                self._update_configmap(obj)
        except ValueError:
            raise
        except Exception as exc:
            raise classify(exc, what) from exc

    def _update_configmap(self, obj: Mapping[str, Any]) -> None:
        meta = obj["metadata"]
        path = f"{collection('', 'v1', 'configmaps', meta['namespace'])}/{meta['name']}"
        try:
            current = self.rest.get(path)
            if (current.get("data") or {}) != obj.get("data", {}):
                patch = {"data": obj["data"]}
                discard(self.rest.call("PATCH", path, body=patch, content_type=MERGE_PATCH))
        except Exception as exc:
            raise classify(exc, f"update configmap {meta['namespace']}/{meta['name']}") from exc

    def create_pod(self, pod: Mapping[str, Any]) -> dict[str, Any] | None:
        """Create a worker and return it as created; None when it already exists (another reconcile, or
        before a restart)."""
        meta = pod["metadata"]
        try:
            return self.rest.create(pods_path(meta["namespace"]), pod)
        except ApiError as exc:
            if exc.status == 409:
                return None
            raise classify(exc, f"create pod {meta['namespace']}/{meta['name']}") from exc
        except Exception as exc:
            raise classify(exc, f"create pod {meta['namespace']}/{meta['name']}") from exc

    def delete_pod(self, namespace: str, name: str, force: bool = False) -> dict[str, Any] | None:
        """Delete gracefully (the worker gets SIGTERM and its grace period), or with `force` at once: for a
        pod on a lost node, whose kubelet will never confirm a graceful deletion. The pod as it now is
        (terminating), or None when it is gone already."""
        try:
            query = {"propagationPolicy": "Background", "gracePeriodSeconds": 0 if force else None}
            response = document(self.rest.call("DELETE", f"{pods_path(namespace)}/{name}", query=query))
            return response if response.get("kind") == "Pod" else None
        except ApiError as exc:
            if exc.status != 404:
                raise classify(exc, f"delete pod {namespace}/{name}") from exc
            return None
        except Exception as exc:
            raise classify(exc, f"delete pod {namespace}/{name}") from exc

    def delete_job(self, namespace: str, name: str) -> None:
        """Delete the job; its pods, ConfigMap and Service go with it through their owner references."""
        try:
            discard(
                self.rest.call("DELETE", job_path(namespace, name), query={"propagationPolicy": "Background"})
            )
        except ApiError as exc:
            if exc.status != 404:
                raise classify(exc, f"delete finetunejob {namespace}/{name}") from exc
        except Exception as exc:
            raise classify(exc, f"delete finetunejob {namespace}/{name}") from exc

    def apply(self, job: Mapping[str, Any], actions: Actions) -> Written:
        """Apply a decision: status first (so a crash after it repeats no counted step), then objects."""
        namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
        stored = self.write_status(job, actions.status) if actions.status_changed else None
        pods: list[dict[str, Any] | None] = []
        for obj in actions.ensure:
            self.ensure(obj)
        for pod_name in actions.delete_pods:
            pods.append(self.delete_pod(namespace, pod_name))
        for pod_name in actions.force_delete_pods:
            log.warning("force-deleting pod %s/%s: its node is lost", namespace, pod_name)
            pods.append(self.delete_pod(namespace, pod_name, force=True))
        for pod in actions.create_pods:
            created = self.create_pod(pod)
            if created is None:
                log.debug("pod %s/%s already exists", namespace, pod["metadata"]["name"])
            pods.append(created)
        if actions.delete_job:
            self.delete_job(namespace, name)
        return Written(stored, tuple(p for p in pods if p is not None))
