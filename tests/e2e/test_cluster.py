"""The local control plane does what the operator's e2e tests rely on.

Real kube-apiserver, kube-controller-manager and kube-scheduler built from tools/k8s, fake GPU
nodes and pod lifecycles from KWOK (tools/cluster/stages.yaml).
"""

from __future__ import annotations

import copy
import os
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import (
    ApiextensionsV1Api,
    CoreV1Api,
    CustomObjectsApi,
    V1ConfigMap,
    V1Container,
    V1ObjectMeta,
    V1OwnerReference,
    V1Pod,
    V1PodSpec,
    V1ResourceRequirements,
    VersionApi,
)
from kubernetes.client.exceptions import ApiException

from .conftest import BIN, CACHE, REPO, Cluster, cluster_script
from .kwok import finish_pod, is_running, wait_for_pod, wait_for_pod_gone

pytestmark = pytest.mark.cluster

GPU = "nvidia.com/gpu"
NODES_FILE = REPO / "tools" / "cluster" / "nodes.yaml"
CRD_FILE = REPO / "crds" / "finetunejobs.finetune.dev.yaml"


def pod(name: str, *, gpus: int = 0, owner: V1OwnerReference | None = None) -> V1Pod:
    resources = V1ResourceRequirements(limits={GPU: str(gpus)}) if gpus else None
    return V1Pod(
        metadata=V1ObjectMeta(name=name, owner_references=[owner] if owner else None),
        spec=V1PodSpec(
            containers=[V1Container(name="worker", image="trainer:test", resources=resources)],
            restart_policy="Never",
        ),
    )


def expected_nodes() -> dict[str, dict[str, Any]]:
    """Node name -> pool, from the declarative nodes file."""
    pools = yaml.safe_load(NODES_FILE.read_text())["pools"]
    return {f"{p['name']}-{i}": p for p in pools for i in range(int(p["count"]))}


def test_version_is_the_pinned_kubernetes(cluster: Cluster) -> None:
    pinned = next(
        line.split()[-1]
        for line in (REPO / "tools" / "k8s" / "go.mod").read_text().splitlines()
        if line.startswith("require k8s.io/kubernetes ")
    )
    info = VersionApi(cluster.api_client).get_code()
    assert info.git_version == pinned
    assert (info.major, info.minor) == tuple(pinned.lstrip("v").split(".")[:2])


def test_nodes_are_ready_gpu_nodes_from_the_nodes_file(cluster: Cluster) -> None:
    want = expected_nodes()
    nodes = {n.metadata.name: n for n in CoreV1Api(cluster.api_client).list_node().items}
    assert set(nodes) == set(want)
    for name, pool in want.items():
        node = nodes[name]
        gpus = str(pool["gpusPerNode"])
        assert node.status.capacity[GPU] == gpus
        assert node.status.allocatable[GPU] == gpus
        labels = node.metadata.labels
        assert labels["nvidia.com/gpu.product"] == pool["product"]
        assert labels["nvidia.com/gpu.memory"] == str(pool["memoryMiB"])
        assert labels["nvidia.com/gpu.count"] == gpus
        ready = {c.type: c.status for c in node.status.conditions}
        assert ready["Ready"] == "True"
        # schedulable, not only Ready: cluster-up waits for the node controller to lift its taint
        assert not [t.key for t in node.spec.taints or [] if t.key.startswith("node.kubernetes.io/")]


def test_kubectl_get_nodes_shows_the_gpu_nodes(cluster: Cluster) -> None:
    out = cluster.kubectl("get", "nodes", "-L", "nvidia.com/gpu.product", "--no-headers").stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines()}
    assert set(rows) == set(expected_nodes())
    for name, pool in expected_nodes().items():
        assert rows[name][1] == "Ready"
        assert rows[name][-1] == pool["product"]


def test_authentication_and_rbac_are_enforced(cluster: Cluster) -> None:
    # Anonymous requests are not allowed to list anything.
    server = cluster.api_client.configuration.host
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{server}/api/v1/namespaces/default/pods", context=insecure, timeout=10)
    assert err.value.code in (401, 403)
    # A service account has only what RBAC grants it; the admin kubeconfig can do everything.
    sa = cluster.kubectl(
        "auth", "can-i", "list", "pods", "--as=system:serviceaccount:default:default", check=False
    )
    assert (sa.returncode, sa.stdout.strip()) == (1, "no")
    admin = cluster.kubectl("auth", "can-i", "*", "*")
    assert admin.stdout.strip() == "yes"


def test_crds_are_installed_and_explained(cluster: Cluster) -> None:
    crd_files = sorted((REPO / "crds").glob("*.yaml"))
    assert crd_files, "crds/ holds no CRD"
    names = [yaml.safe_load(f.read_text())["metadata"]["name"] for f in crd_files]
    extensions = ApiextensionsV1Api(cluster.api_client)
    for name in names:
        conditions = extensions.read_custom_resource_definition(name).status.conditions
        assert {c.type: c.status for c in conditions}["Established"] == "True", name

    # The API server publishes a CRD's schema to OpenAPI some time after it is Established (seconds on
    # a loaded machine), and `kubectl explain` fails until then.
    deadline = time.monotonic() + 60
    while (result := cluster.kubectl("explain", "finetunejob.spec", check=False)).returncode != 0:
        assert time.monotonic() < deadline, f"kubectl explain failed for 60 s: {result.stderr}"
        time.sleep(1)
    explain = result.stdout
    assert "KIND:       FineTuneJob" in explain
    assert "GROUP:      finetune.dev" in explain
    for field in ("method", "model", "dataset", "resources", "output"):
        assert f"\n  {field}\t" in explain, f"{field} missing from kubectl explain:\n{explain}"
    short = cluster.kubectl("get", "ftj", "-A").stderr
    assert "No resources found" in short


def finetunejob_example() -> dict[str, Any]:
    example = sorted((REPO / "examples").glob("*.yaml"))[0]
    obj = yaml.safe_load(example.read_text())
    assert obj["kind"] == "FineTuneJob"
    return obj


def test_invalid_finetunejob_is_rejected_by_the_schema(cluster: Cluster, namespace: str) -> None:
    api = CustomObjectsApi(cluster.api_client)
    good = finetunejob_example()
    good["metadata"] = {"name": "good"}
    group, version = good["apiVersion"].split("/")
    created = api.create_namespaced_custom_object(group, version, namespace, "finetunejobs", good)
    assert created["spec"]["method"]["type"] == good["spec"]["method"]["type"]

    bad = copy.deepcopy(good)
    bad["metadata"] = {"name": "bad"}
    bad["spec"]["method"]["type"] = "banana"
    with pytest.raises(ApiException) as err:
        api.create_namespaced_custom_object(group, version, namespace, "finetunejobs", bad)
    assert err.value.status == 422
    message = err.value.body
    allowed = yaml.safe_load(CRD_FILE.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    allowed = allowed["properties"]["spec"]["properties"]["method"]["properties"]["type"]["enum"]
    assert "spec.method.type" in message
    assert 'Unsupported value: \\"banana\\"' in message
    for value in allowed:
        assert f'\\"{value}\\"' in message, f"{value} missing from {message}"


def test_gpu_pods_land_only_on_nodes_with_free_gpus(cluster: Cluster, namespace: str) -> None:
    core = CoreV1Api(cluster.api_client)
    nodes = {n.metadata.name: int(n.status.allocatable[GPU]) for n in core.list_node().items}
    # One pod per node that takes all of a node's GPUs: the scheduler must spread them.
    per_pod = min(nodes.values())
    assert per_pod > 0 and all(g == per_pod for g in nodes.values()), "test expects uniform GPU nodes"
    names = [f"full-{i}" for i in range(len(nodes))]
    for name in names:
        core.create_namespaced_pod(namespace, pod(name, gpus=per_pod))
    placed = {
        name: wait_for_pod(core, namespace, name, is_running, what="Running").spec.node_name for name in names
    }
    assert sorted(placed.values()) == sorted(nodes), f"not one full pod per node: {placed}"

    # No GPU is free now: one more GPU pod stays Pending, Unschedulable for lack of GPUs.
    core.create_namespaced_pod(namespace, pod("waiting", gpus=1))

    def unschedulable(p: V1Pod) -> bool:
        cond = {c.type: c for c in p.status.conditions or []}.get("PodScheduled")
        return cond is not None and cond.status == "False" and cond.reason == "Unschedulable"

    waiting = wait_for_pod(core, namespace, "waiting", unschedulable, what="Unschedulable")
    assert waiting.status.phase == "Pending"
    assert waiting.spec.node_name is None
    message = next(c.message for c in waiting.status.conditions if c.type == "PodScheduled")
    assert f"Insufficient {GPU}" in message

    # A pod without GPUs still fits (CPU and memory are free).
    core.create_namespaced_pod(namespace, pod("cpu-only"))
    assert wait_for_pod(core, namespace, "cpu-only", is_running, what="Running").spec.node_name in nodes

    # Freeing a node's GPUs lets the waiting pod in, on exactly that node.
    core.delete_namespaced_pod(names[0], namespace)
    freed = placed[names[0]]
    running = wait_for_pod(core, namespace, "waiting", is_running, timeout=120, what="Running")
    assert running.spec.node_name == freed


def test_deleting_an_owner_garbage_collects_its_pods(cluster: Cluster, namespace: str) -> None:
    core = CoreV1Api(cluster.api_client)
    owner = core.create_namespaced_config_map(namespace, V1ConfigMap(metadata=V1ObjectMeta(name="owner")))
    ref = V1OwnerReference(api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid)
    owned = ["owned-0", "owned-1"]
    for name in owned:
        core.create_namespaced_pod(namespace, pod(name, owner=ref))
    core.create_namespaced_pod(namespace, pod("bystander"))
    for name in [*owned, "bystander"]:
        wait_for_pod(core, namespace, name, is_running, what="Running")

    core.delete_namespaced_config_map("owner", namespace, propagation_policy="Background")
    for name in owned:
        wait_for_pod_gone(core, namespace, name, timeout=90)
    assert core.read_namespaced_pod("bystander", namespace).status.phase == "Running"


@pytest.mark.parametrize(
    ("exit_code", "reason", "phase", "want_reason"),
    [
        (0, None, "Succeeded", "Completed"),
        (1, None, "Failed", "Error"),
        (137, "OOMKilled", "Failed", "OOMKilled"),
    ],
)
def test_a_running_pod_is_driven_to_its_end(
    cluster: Cluster, namespace: str, exit_code: int, reason: str | None, phase: str, want_reason: str
) -> None:
    core = CoreV1Api(cluster.api_client)
    core.create_namespaced_pod(namespace, pod("worker", gpus=1))
    running = wait_for_pod(core, namespace, "worker", is_running, what="Running")
    assert running.status.container_statuses[0].state.running is not None

    finish_pod(core, namespace, "worker", exit_code, reason)
    done = wait_for_pod(core, namespace, "worker", lambda p: p.status.phase == phase, what=phase)
    terminated = done.status.container_statuses[0].state.terminated
    assert terminated is not None
    assert terminated.exit_code == exit_code
    assert terminated.reason == want_reason
    # The pod stays finished: nothing moves it on by itself.
    time.sleep(2)
    assert core.read_namespaced_pod("worker", namespace).status.phase == phase


def test_graceful_pod_deletion_completes(cluster: Cluster, namespace: str) -> None:
    core = CoreV1Api(cluster.api_client)
    core.create_namespaced_pod(namespace, pod("worker", gpus=2))
    wait_for_pod(core, namespace, "worker", is_running, what="Running")
    start = time.monotonic()
    core.delete_namespaced_pod("worker", namespace)  # default 30 s grace period
    wait_for_pod_gone(core, namespace, "worker", timeout=30)
    assert time.monotonic() - start < 30


def live(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_make_cluster_up_and_down_leave_nothing_behind(cluster: Cluster, tmp_path: Path) -> None:
    """`make cluster-up`, `kubectl get nodes`, `make cluster-down` as a user runs them.

    Uses its own cluster name and kubeconfig; `-o` keeps make from re-running setup/tools
    (the session fixture already needs both); fake nodes only (REAL_NODES=0, so no images): the same
    script with real nodes is test_real_pods.py's cluster.
    """
    name = f"finetune-make-{uuid.uuid4().hex[:4]}"
    kubeconfig = tmp_path / "kubeconfig"
    make = ["make", "-o", "setup", "-o", "tools", "-o", "images", "REAL_NODES=0"]
    make += [f"CLUSTER_NAME={name}", f"CLUSTER_KUBECONFIG={kubeconfig}"]
    env = {**os.environ, "CACHE": str(CACHE)}
    pids: list[int] = []
    try:
        up = subprocess.run(
            [*make, "cluster-up"], cwd=REPO, capture_output=True, text=True, timeout=600, env=env, check=False
        )
        assert up.returncode == 0, up.stderr
        assert f"export KUBECONFIG={kubeconfig}" in up.stdout
        nodes = subprocess.run(
            [str(BIN / "kubectl"), "get", "nodes", "--no-headers"],
            env={**env, "KUBECONFIG": str(kubeconfig)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert sorted(line.split()[0] for line in nodes.splitlines()) == sorted(expected_nodes())

        pids = [int(p) for p in cluster_script("pids", "--name", name).stdout.split()]
        comms = sorted(Path(f"/proc/{p}/comm").read_text().strip() for p in pids)
        for component in ("etcd", "kube-apiserver", "kube-controller", "kube-scheduler", "kwok"):
            assert any(c.startswith(component) for c in comms), f"{component} not among {comms}"
    finally:
        down = subprocess.run(
            [*make, "cluster-down"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            check=False,
        )
    assert down.returncode == 0, down.stderr
    assert [p for p in pids if live(p)] == []
    assert cluster_script("pids", "--name", name).stdout.split() == []
    assert not kubeconfig.exists()
    # The session cluster is untouched by another cluster's down.
    assert CoreV1Api(cluster.api_client).list_node().items
