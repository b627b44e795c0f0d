"""What the operator e2e tests share: the operator as a process (`Operator`), the README example as a job
document, the example's volumes, and polling helpers for jobs and their worker pods. The fixtures built
on these (`operator`, `claims`, `api`, `core`) live in conftest.py."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from kubernetes.client import CoreV1Api, CustomObjectsApi

from .conftest import REPO, Cluster
from .kwok import finish_pod
from .processes import free_port, log_tail, start_logged, stop_process

GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"
EXAMPLE = REPO / "examples" / "llama2-7b-alpaca-lora.yaml"
TIMEOUT = 60.0
#: Fast loops for tests: a whole-gang restart waits 0.5 s, a missed event costs at most 1 s.
OPERATOR_ENV = {
    "FINETUNE_TIMING_RESYNC_SECONDS": "30",  # events and timed rules drive every test, not the resync
    "FINETUNE_TIMING_DEBOUNCE_SECONDS": "0.05",
    "FINETUNE_TIMING_ERROR_BACKOFF_SECONDS": "0.2",
    "FINETUNE_RESTARTS_BACKOFF_SECONDS": "0.5",
    "FINETUNE_RESTARTS_NODE_LOST_SECONDS": "5",
    "FINETUNE_TRAINER_IMAGE": "trainer:e2e",
    "PYTHONUNBUFFERED": "1",
}


class Operator:
    """One `python -m finetune_operator` process, its log, and its metrics port."""

    def __init__(
        self,
        cluster: Cluster,
        namespace: str,
        log: Path,
        *,
        kubeconfig: Path | None = None,
        args: tuple[str, ...] = ("--standalone",),
        env: dict[str, str] | None = None,
    ) -> None:
        self.cluster, self.namespace, self.log = cluster, namespace, log
        self.kubeconfig = kubeconfig or cluster.kubeconfig
        self.args, self.env = args, {**OPERATOR_ENV, **(env or {})}
        self.metrics_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Operator:
        command = [
            sys.executable, "-m", "finetune_operator",
            "--kubeconfig", str(self.kubeconfig),
            "--namespace", self.namespace,
            "--metrics-port", str(self.metrics_port),
            "--health-port", "0",
            *self.args,
        ]  # fmt: skip
        self.proc = start_logged(command, self.log, env={**os.environ, **self.env}, cwd=REPO)
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        stop_process(self.proc)

    def tail(self, lines: int = 40) -> str:
        return log_tail(self.log, lines)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return str(response.read().decode())


def eventually(check: Callable[[], bool], what: str, detail: Callable[[], str] = lambda: "") -> None:
    """Poll `check` until it holds; on timeout fail with `what` and `detail()` (a log tail, the state seen).

    Also for what the operator does just after it writes status (events are posted in the background,
    metrics updated after the patch), so a test that saw the status can wait for them."""
    deadline = time.monotonic() + TIMEOUT
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {TIMEOUT}s\n{detail()}")
        time.sleep(0.2)


#: The claims the README example reads and writes (pvc://datasets/…, pvc://models/…).
CLAIMS = ("datasets", "models")


def bound_claims(core: CoreV1Api, namespace: str) -> list[str]:
    """Create the example's PVCs, each pre-bound to its own PV, so the scheduler can place the workers."""
    volumes = []
    for claim in CLAIMS:
        volume = f"{namespace}-{claim}"
        core.create_persistent_volume(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": volume, "labels": {"finetune.dev/e2e": "true"}},
                "spec": {
                    "capacity": {"storage": "1Gi"},
                    "accessModes": ["ReadWriteMany"],
                    "storageClassName": "e2e-manual",
                    "persistentVolumeReclaimPolicy": "Retain",
                    "hostPath": {"path": f"/tmp/{volume}"},
                    "claimRef": {"namespace": namespace, "name": claim},
                },
            }
        )
        core.create_namespaced_persistent_volume_claim(
            namespace,
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": claim},
                "spec": {
                    "accessModes": ["ReadWriteMany"],
                    "storageClassName": "e2e-manual",
                    "volumeName": volume,
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            },
        )
        volumes.append(volume)
    wait_bound(core, namespace)
    return volumes


def wait_bound(core: CoreV1Api, namespace: str) -> None:
    """Wait for the PV controller to bind the claims: until then the scheduler reports an unbound
    claim instead of the reason a test is looking for (a CI run once saw exactly that)."""

    def phases() -> dict[str, str]:
        claims = core.list_namespaced_persistent_volume_claim(namespace).items
        return {c.metadata.name: c.status.phase for c in claims}

    eventually(lambda: all(phases().get(c) == "Bound" for c in CLAIMS), "Bound claims", lambda: str(phases()))


def example(name: str, **spec_updates: Any) -> dict[str, Any]:
    """The README example under another name, with top-level spec blocks merged in."""
    document = yaml.safe_load(EXAMPLE.read_text())
    document["metadata"] = {"name": name}
    for key, value in spec_updates.items():
        current = document["spec"].get(key)
        document["spec"][key] = {**current, **value} if isinstance(current, dict) else copy.deepcopy(value)
    return document


def two_nodes(name: str, **run_policy: Any) -> dict[str, Any]:
    """16 GPUs: two workers of 8, the smallest real gang."""
    return example(name, resources={"gpus": 16, "gpusPerNode": 8}, runPolicy=run_policy)


def create(api: CustomObjectsApi, namespace: str, document: dict[str, Any]) -> None:
    api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, document)


def delete(api: CustomObjectsApi, namespace: str, name: str) -> None:
    api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def set_run_policy(api: CustomObjectsApi, namespace: str, name: str, **run_policy: Any) -> None:
    """Patch the job's runPolicy fields (suspend=True, ...), as `kubectl patch` would."""
    api.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name, {"spec": {"runPolicy": run_policy}}
    )


def get(api: CustomObjectsApi, namespace: str, name: str) -> dict[str, Any]:
    body: dict[str, Any] = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    return body


def wait_job(
    api: CustomObjectsApi,
    operator: Operator,
    name: str,
    predicate: Callable[[dict[str, Any]], bool],
    what: str,
    timeout: float = TIMEOUT,
) -> dict[str, Any]:
    """Poll the job until `predicate(status)` holds; fail with its status and the operator's log."""
    deadline = time.monotonic() + timeout
    while True:
        status = get(api, operator.namespace, name).get("status") or {}
        if predicate(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{name}: no {what} after {timeout}s\nstatus: {status}\nlog:\n{operator.tail()}"
            )
        time.sleep(0.2)


def phase_is(phase: str) -> Callable[[dict[str, Any]], bool]:
    return lambda status: status.get("phase") == phase


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == kind), {})


def worker_pods(core: CoreV1Api, namespace: str, job: str) -> list[Any]:
    pods = core.list_namespaced_pod(namespace, label_selector=f"finetune.dev/job-name={job}").items
    return sorted(pods, key=lambda p: p.metadata.name)


def wait_pods(
    core: CoreV1Api,
    namespace: str,
    job: str,
    check: Callable[[list[Any]], bool],
    what: str,
    timeout: float = TIMEOUT,
) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        pods = worker_pods(core, namespace, job)
        if check(pods):
            return pods
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{job}: no {what}; pods: {[(p.metadata.name, p.status.phase) for p in pods]}"
            )
        time.sleep(0.2)


def all_running(count: int, attempt: int = 0) -> Callable[[list[Any]], bool]:
    def check(pods: list[Any]) -> bool:
        live = [p for p in pods if not p.metadata.deletion_timestamp]
        return (
            len(live) == count
            and all(p.status.phase == "Running" for p in live)
            and all(p.metadata.labels["finetune.dev/attempt"] == str(attempt) for p in live)
        )

    return check


def finish_all(core: CoreV1Api, namespace: str, job: str, code: int) -> None:
    for pod in worker_pods(core, namespace, job):
        finish_pod(core, namespace, pod.metadata.name, code)
