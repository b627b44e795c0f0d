"""`FineTuneClient`: submit, follow and wait for FineTuneJobs from Python (a notebook, a pipeline step),
as Kubeflow Trainer's SDK offers; `ftctl submit/get/status/logs/wait` are built on it.

    from finetune_operator.client import FineTuneClient

    client = FineTuneClient(namespace="team-a")           # kubeconfig as kubectl finds it, or in-cluster
    client.submit("job.yaml")                              # planned here first: a misfit never reaches the cluster
    for line in client.logs("my-job", follow=True):        # rank 0's log, as it is written
        print(line)
    status = client.wait("my-job", timeout=3600)           # Succeeded, or JobFailed with the reason

Plain synchronous calls through the official kubernetes client; nothing here keeps state between calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from finetune_operator import USER_AGENT
from finetune_operator.api.enums import Phase
from finetune_operator.api.models import GROUP, PLURAL, VERSION, FineTuneJob, FineTuneJobStatus, parse_job
from finetune_operator.core import names
from finetune_operator.core.plan import Plan, plan
from finetune_operator.manifests import load_job

#: Phases after which nothing changes.
FINISHED = (Phase.SUCCEEDED, Phase.FAILED)


class JobFailed(RuntimeError):
    """The job ended Failed; `status` has the conditions, `str()` the reason."""

    def __init__(self, name: str, status: FineTuneJobStatus) -> None:
        failed = next((c for c in status.conditions if c.type == "Failed"), None)
        reason = f"{failed.reason}: {failed.message}" if failed is not None else status.message or "failed"
        super().__init__(f"FineTuneJob {name} failed: {reason}")
        self.status = status


class DoesNotFit(ValueError):
    """The planner found no layout for the job: submitting it would only fail in the cluster."""


def connect(kubeconfig: str | None = None) -> client.ApiClient:
    """An API client: an explicit kubeconfig, else the pod's service account, else $KUBECONFIG or
    ~/.kube/config (the order the operator's own login follows, adapters/login.py)."""
    configuration = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        try:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    api_client = client.ApiClient(configuration)
    api_client.user_agent = USER_AGENT
    return api_client


def default_namespace(kubeconfig: str | None = None) -> str:
    """The current context's namespace, as kubectl uses it; `default` when it names none."""
    try:
        _, current = config.list_kube_config_contexts(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    except (config.ConfigException, OSError, TypeError):
        return "default"
    return str((current or {}).get("context", {}).get("namespace") or "default")


class FineTuneClient:
    """FineTuneJobs in one namespace (each call may name another)."""

    def __init__(
        self,
        namespace: str | None = None,
        kubeconfig: str | None = None,
        api_client: client.ApiClient | None = None,
    ) -> None:
        self.api_client = api_client or connect(kubeconfig)
        self.namespace = namespace or default_namespace(kubeconfig)
        self.jobs = client.CustomObjectsApi(self.api_client)
        self.core = client.CoreV1Api(self.api_client)

    # --- jobs -------------------------------------------------------------------------------------------

    def submit(self, job: FineTuneJob | Mapping[str, Any] | str | Path, namespace: str | None = None) -> Plan:
        """Plan the job here (raising DoesNotFit with the planner's answer), then create it, or update the
        spec of the job of that name. Returns the plan the operator will make."""
        if isinstance(job, FineTuneJob):
            parsed = job
        elif isinstance(job, Mapping):
            parsed = parse_job(dict(job))
        else:
            parsed = load_job(str(job), "FineTuneClient.submit")
        result = plan(parsed.spec)
        if not result.fits:
            raise DoesNotFit(f"FineTuneJob {parsed.metadata.name}: {result.message}")
        ns = namespace or parsed.metadata.namespace or self.namespace
        body = parsed.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"status"})
        body["metadata"] = {"name": parsed.metadata.name, "namespace": ns}
        try:
            self.jobs.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            patch = {"spec": body["spec"]}
            self.jobs.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, parsed.metadata.name, patch)
        return result

    def get(self, name: str, namespace: str | None = None) -> dict[str, Any]:
        """The job as the API server has it."""
        found = self.jobs.get_namespaced_custom_object(
            GROUP, VERSION, namespace or self.namespace, PLURAL, name
        )
        return cast(dict[str, Any], found)

    def list_jobs(self, namespace: str | None = None, all_namespaces: bool = False) -> list[dict[str, Any]]:
        """The jobs of the namespace, or of every namespace."""
        if all_namespaces:
            found = self.jobs.list_cluster_custom_object(GROUP, VERSION, PLURAL)
        else:
            found = self.jobs.list_namespaced_custom_object(
                GROUP, VERSION, namespace or self.namespace, PLURAL
            )
        return cast(list[dict[str, Any]], cast(dict[str, Any], found).get("items", []))

    def status(self, name: str, namespace: str | None = None) -> FineTuneJobStatus:
        return FineTuneJobStatus.model_validate(self.get(name, namespace).get("status") or {})

    def delete(self, name: str, namespace: str | None = None) -> None:
        self.jobs.delete_namespaced_custom_object(GROUP, VERSION, namespace or self.namespace, PLURAL, name)

    def wait(
        self,
        name: str,
        namespace: str | None = None,
        timeout: float = 3600.0,
        until: Callable[[FineTuneJobStatus], bool] | None = None,
        poll_seconds: float = 2.0,
    ) -> FineTuneJobStatus:
        """Until the job finishes (or `until(status)`): the status when it Succeeded (or matched); raises
        JobFailed when it failed, TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(name, namespace)
            if until is not None and until(status):
                return status
            if status.phase == Phase.FAILED:
                raise JobFailed(name, status)
            if until is None and status.phase == Phase.SUCCEEDED:
                return status
            if time.monotonic() >= deadline:
                raise TimeoutError(f"FineTuneJob {name} is {status.phase or 'Pending'} after {timeout:.0f}s")
            time.sleep(poll_seconds)

    def events(self, name: str, namespace: str | None = None, limit: int = 10) -> list[dict[str, Any]]:
        """The job's newest events, oldest first: type, reason, message, time, count, from."""
        ns = namespace or self.namespace
        found = self.core.list_namespaced_event(
            ns, field_selector=f"involvedObject.name={name},involvedObject.kind=FineTuneJob"
        ).items

        def when(event: Any) -> datetime:
            moment = event.last_timestamp or event.event_time or event.first_timestamp
            return cast(datetime, moment or datetime.min.replace(tzinfo=UTC))

        newest = sorted(found, key=when)[-limit:]
        return [
            {
                "type": e.type,
                "reason": e.reason,
                "message": e.message,
                "time": when(e),
                "count": e.count or 1,
                "from": e.reporting_component or (e.source.component if e.source else None),
            }
            for e in newest
        ]

    # --- workers ----------------------------------------------------------------------------------------

    def logs(
        self,
        name: str,
        namespace: str | None = None,
        rank: int = 0,
        follow: bool = False,
        tail: int | None = None,
    ) -> Iterator[str]:
        """Lines of one worker's log (rank 0 by default); with `follow`, as they are written, until the
        worker ends."""
        ns = namespace or self.namespace
        pod = names.worker_name(name, rank)
        extra: dict[str, Any] = {"tail_lines": tail} if tail is not None else {}
        if not follow:
            text = self.core.read_namespaced_pod_log(pod, ns, container=names.CONTAINER_NAME, **extra)
            yield from str(text).splitlines()
            return
        response: Any = self.core.read_namespaced_pod_log(
            pod, ns, container=names.CONTAINER_NAME, follow=True, _preload_content=False, **extra
        )
        pending = b""
        try:
            for chunk in response.stream(4096):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.decode(errors="replace")
            if pending:
                yield pending.decode(errors="replace")
        finally:
            response.release_conn()
