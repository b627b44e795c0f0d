"""Kueue, built from its Go module (`make tools`: tools/kueue), running against the local cluster.

The controller runs as a process beside the control plane, the way the API server here runs, and is
reached the way it is in a real cluster: its webhook configurations (from the same module version,
`.cache/bin/kueue-config`) name the Service `kueue-webhook-service`, whose EndpointSlice points at this
machine's address (the API server runs with --enable-aggregator-routing, so it dials endpoints, not the
ClusterIP), and Kueue's own certificate manager issues the serving certificate and injects its CA. Only the
`pod` integration is on, which is what `runPolicy.queueName` uses. Its pod webhooks are narrowed to pods
that carry a queue name, so the other tests' pods never pass through Kueue (nor fail while it is down);
the webhook configurations and the Service are deleted when it stops, its CRDs stay.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from kubernetes.client import AdmissionregistrationV1Api, CoreV1Api, CustomObjectsApi, DiscoveryV1Api
from kubernetes.client.exceptions import ApiException

from finetune_operator.core.status import KUEUE_GATE
from finetune_operator.scheduling.kueue import QUEUE_NAME

from .conftest import BIN, Cluster
from .processes import LocalProcess, free_port, start_logged

CONFIG = BIN / "kueue-config"
NAMESPACE = "kueue-system"  # Kueue's own namespace (its Configuration's default)
SERVICE = "kueue-webhook-service"  # the names Kueue's kustomization gives, which its cert manager looks for
SECRET = "kueue-webhook-server-cert"
WEBHOOK_CONFIGURATIONS = {
    "MutatingWebhookConfiguration": "kueue-mutating-webhook-configuration",
    "ValidatingWebhookConfiguration": "kueue-validating-webhook-configuration",
}
KUEUE_GROUP, KUEUE_VERSION = "kueue.x-k8s.io", "v1beta2"
#: The webhooks kept: Kueue's own objects and plain pods (the others serve integrations not turned on).
KEPT_GROUPS = frozenset({"", KUEUE_GROUP})


def host_address() -> str:
    """This machine's address on its default route (an EndpointSlice may not hold a loopback address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("10.255.255.255", 9))  # a UDP connect sends nothing; it only picks the route
        return str(sock.getsockname()[0])


def custom_resource_definitions() -> list[dict[str, Any]]:
    """Kueue's CRDs with the conversion webhooks its kustomization patches in (its cert manager will not
    report ready until it has injected its CA into each)."""
    crds = {}
    for path in sorted(CONFIG.glob("kueue.x-k8s.io_*.yaml")):
        crd = yaml.safe_load(path.read_text())
        crds[crd["metadata"]["name"]] = crd
    kustomization = yaml.safe_load((CONFIG / "crd" / "kustomization.yaml").read_text())
    for entry in kustomization.get("patches") or []:
        patch = yaml.safe_load((CONFIG / "crd" / entry["path"]).read_text())
        conversion = patch["spec"]["conversion"]
        conversion["webhook"]["clientConfig"]["service"].update(name=SERVICE, namespace=NAMESPACE, port=443)
        crds[patch["metadata"]["name"]]["spec"]["conversion"] = conversion
    return list(crds.values())


def webhook_configurations() -> list[dict[str, Any]]:
    """Kueue's webhook configurations for pods and Kueue's own kinds, under the names its kustomization
    gives them; pod webhooks only see pods that name a queue."""
    documents = [d for d in yaml.safe_load_all((CONFIG / "manifests.yaml").read_text()) if d]
    for document in documents:
        document["metadata"]["name"] = WEBHOOK_CONFIGURATIONS[document["kind"]]
        kept = []
        for hook in document["webhooks"]:
            if not all(group in KEPT_GROUPS for rule in hook["rules"] for group in rule["apiGroups"]):
                continue
            hook["clientConfig"]["service"].update(name=SERVICE, namespace=NAMESPACE, port=443)
            if any("pods" in rule["resources"] for rule in hook["rules"]):
                hook["objectSelector"] = {"matchExpressions": [{"key": QUEUE_NAME, "operator": "Exists"}]}
            kept.append(hook)
        document["webhooks"] = kept
    return documents


class Kueue(LocalProcess):
    """`with Kueue(cluster, workdir) as kueue:` runs the controller until the block ends."""

    def __init__(self, cluster: Cluster, workdir: Path) -> None:
        self.cluster, self.workdir = cluster, workdir
        self.log = workdir / "kueue.log"
        self.address, self.webhook_port, self.health_port = host_address(), free_port(), free_port()
        self.core = CoreV1Api(cluster.api_client)

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cluster.install_crds(custom_resource_definitions())
        self._expose()
        config = self.workdir / "config.yaml"
        config.write_text(yaml.safe_dump(self._configuration()))
        command = [str(BIN / "kueue"), "--config", str(config), "--kubeconfig", str(self.cluster.kubeconfig)]
        self.proc = start_logged(command, self.log)

    def _configuration(self) -> dict[str, Any]:
        return {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2",
            "kind": "Configuration",
            "namespace": NAMESPACE,
            "health": {"healthProbeBindAddress": f"127.0.0.1:{self.health_port}"},
            "metrics": {"bindAddress": "0"},
            "webhook": {
                "port": self.webhook_port,
                "host": self.address,
                "certDir": str(self.workdir / "certs"),
            },
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {
                "enable": True,
                "webhookServiceName": SERVICE,
                "webhookSecretName": SECRET,
            },
            "manageJobsWithoutQueueName": False,
            "integrations": {"frameworks": ["pod"]},
        }

    def _expose(self) -> None:
        """The namespace, the certificate's Secret, the webhook Service with its endpoint on this machine,
        the webhook configurations."""
        with contextlib.suppress(ApiException):
            self.core.create_namespace({"metadata": {"name": NAMESPACE}})
        self.cluster.kubectl(
            "apply",
            "-f",
            "-",
            stdin=yaml.safe_dump_all(
                [
                    {  # Kueue's cert manager fills it in; it must exist (Kueue's kustomization ships it empty)
                        "apiVersion": "v1",
                        "kind": "Secret",
                        "metadata": {"name": SECRET, "namespace": NAMESPACE},
                    },
                    {
                        "apiVersion": "v1",
                        "kind": "Service",
                        "metadata": {"name": SERVICE, "namespace": NAMESPACE},
                        "spec": {"ports": [{"port": 443, "targetPort": self.webhook_port}]},
                    },
                    {
                        "apiVersion": "discovery.k8s.io/v1",
                        "kind": "EndpointSlice",
                        "metadata": {
                            "name": SERVICE,
                            "namespace": NAMESPACE,
                            "labels": {"kubernetes.io/service-name": SERVICE},
                        },
                        "addressType": "IPv4",
                        "endpoints": [{"addresses": [self.address], "conditions": {"ready": True}}],
                        "ports": [{"name": "", "port": self.webhook_port, "protocol": "TCP"}],
                    },
                    *webhook_configurations(),
                ]
            ),
        )

    def __exit__(self, *exc: object) -> None:
        admission = AdmissionregistrationV1Api(self.cluster.api_client)
        with contextlib.suppress(ApiException):
            admission.delete_mutating_webhook_configuration(
                WEBHOOK_CONFIGURATIONS["MutatingWebhookConfiguration"]
            )
        with contextlib.suppress(ApiException):
            admission.delete_validating_webhook_configuration(
                WEBHOOK_CONFIGURATIONS["ValidatingWebhookConfiguration"]
            )
        with contextlib.suppress(ApiException):
            DiscoveryV1Api(self.cluster.api_client).delete_namespaced_endpoint_slice(SERVICE, NAMESPACE)
        with contextlib.suppress(ApiException):
            self.core.delete_namespaced_service(SERVICE, NAMESPACE)
        super().__exit__()

    def _wait_ready(self, timeout: float = 90) -> None:
        """Until its readiness probe answers and the API server, through the webhook, gates a queued pod
        (a server-side dry run: nothing is stored)."""
        probe = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "kueue-probe", "labels": {QUEUE_NAME: "probe"}},
            "spec": {"containers": [{"name": "probe", "image": "probe"}]},
        }
        deadline = time.monotonic() + timeout
        problem = ""
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"kueue exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                self._mount_certificate()
                with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/readyz", timeout=2):
                    pass
                pod = self.core.create_namespaced_pod("default", probe, dry_run="All")
                gates = [g.name for g in pod.spec.scheduling_gates or []]
                if KUEUE_GATE in gates:
                    return
                problem = f"the probe pod was not gated: {gates}"
            except (OSError, ApiException) as exc:
                problem = str(exc)
            time.sleep(0.5)
        raise RuntimeError(f"kueue not ready after {timeout}s ({problem}):\n{self.tail()}")

    def _mount_certificate(self) -> None:
        """Copy the serving certificate Kueue's cert manager wrote into its Secret to the webhook's certDir,
        as the kubelet's secret volume does in a cluster (Kueue waits for the files to appear)."""
        certs = self.workdir / "certs"
        if (certs / "tls.crt").exists():
            return
        data = self.core.read_namespaced_secret(SECRET, NAMESPACE).data or {}
        if not {"tls.crt", "tls.key"} <= data.keys():
            return
        certs.mkdir(exist_ok=True)
        for name in ("tls.key", "ca.crt", "tls.crt"):  # tls.crt last: its presence means all are there
            if name in data:
                (certs / name).write_bytes(base64.b64decode(data[name]))

    def workloads(self, namespace: str) -> str:
        """Kueue's Workloads in `namespace`, a line each (priority, pod sets, conditions): what a failing
        test prints to say what Kueue decided."""
        listed = CustomObjectsApi(self.cluster.api_client).list_namespaced_custom_object(
            KUEUE_GROUP, KUEUE_VERSION, namespace, "workloads"
        )
        lines = []
        for workload in listed["items"]:
            spec, status = workload["spec"], workload.get("status") or {}
            conditions = [
                f"{c['type']}={c['status']}({c.get('reason', '')}: {c.get('message', '')})"
                for c in status.get("conditions") or []
            ]
            pods = [(p["name"], p["count"]) for p in spec.get("podSets") or []]
            lines.append(
                f"{workload['metadata']['name']} priority={spec.get('priority')} {pods} {conditions}"
            )
        return "\n".join(lines)
