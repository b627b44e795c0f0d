"""Drive fake pods on the local cluster (see tools/cluster/stages.yaml).

KWOK makes every scheduled pod Running and leaves it there. `finish_pod` annotates a Running pod
so that KWOK's `pod-finish` stage terminates its containers with the given exit code: the pod
becomes Succeeded for 0 and Failed otherwise, which lets tests play out training success, crashes
and OOM kills.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kubernetes.client import CoreV1Api, V1Pod
from kubernetes.client.exceptions import ApiException

EXIT_CODE_ANNOTATION = "kwok.finetune.dev/exit-code"
REASON_ANNOTATION = "kwok.finetune.dev/reason"


def finish_pod(
    core_v1: CoreV1Api, namespace: str, name: str, exit_code: int, reason: str | None = None
) -> None:
    """Make a Running pod's containers terminate with `exit_code` (and `reason`, e.g. OOMKilled)."""
    annotations = {EXIT_CODE_ANNOTATION: str(int(exit_code))}
    if reason is not None:
        annotations[REASON_ANNOTATION] = reason
    core_v1.patch_namespaced_pod(name, namespace, {"metadata": {"annotations": annotations}})


def wait_for_pod(
    core_v1: CoreV1Api,
    namespace: str,
    name: str,
    condition: Callable[[V1Pod], bool],
    *,
    timeout: float = 60,
    what: str = "condition",
) -> V1Pod:
    """Poll the pod until `condition` holds; fail with the pod's last status otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        pod = core_v1.read_namespaced_pod(name, namespace)
        if condition(pod):
            return pod
        if time.monotonic() > deadline:
            raise AssertionError(f"pod {namespace}/{name}: no {what} after {timeout}s: {pod.status}")
        time.sleep(0.25)


def wait_for_pod_gone(core_v1: CoreV1Api, namespace: str, name: str, *, timeout: float = 60) -> None:
    """Poll until the pod no longer exists."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            pod = core_v1.read_namespaced_pod(name, namespace)
        except ApiException as err:
            if err.status == 404:
                return
            raise
        if time.monotonic() > deadline:
            raise AssertionError(f"pod {namespace}/{name} still exists after {timeout}s: {pod.metadata}")
        time.sleep(0.25)


def is_running(pod: V1Pod) -> bool:
    return pod.status is not None and pod.status.phase == "Running"
