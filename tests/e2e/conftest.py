"""Fixtures for tests against the real local control plane (tools/cluster/cluster.py).

`cluster` (session scope) brings up one cluster for the whole test run with the same script
`make cluster-up` runs, under its own name and kubeconfig (E2E_CLUSTER_NAME, default
finetune-e2e) so it never touches a cluster started by hand, and tears it down at the end,
checking that none of its processes is left. The binaries come from `make tools` (`make test`
builds them first). If the cluster cannot start, every test that needs it fails with the reason.
`running_cluster` is that lifecycle for any cluster: test_real_pods.py starts one with real nodes.

`namespace` gives each test a fresh namespace and deletes it (and waits for that) afterwards;
`operator` a standalone operator process watching it (harness.py holds what the tests share).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from kubernetes import config as kube_config
from kubernetes.client import (
    ApiClient,
    CoreV1Api,
    CustomObjectsApi,
    V1Namespace,
    V1ObjectMeta,
    V1ServiceAccount,
)
from kubernetes.client.exceptions import ApiException

if TYPE_CHECKING:  # harness.py imports this module; the fixtures below import it when they run
    from .harness import Operator

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO / "tools" / "cluster" / "cluster.py"
CACHE = Path(os.environ.get("CACHE", REPO / ".cache")).resolve()
BIN = CACHE / "bin"
E2E_CLUSTER_NAME = os.environ.get("E2E_CLUSTER_NAME", "finetune-e2e")
UP_TIMEOUT_S = 600  # the control plane starts in well under a minute; this only bounds a hang


@dataclass(frozen=True)
class Cluster:
    """A running local cluster: its name, kubeconfig and an API client authenticated as admin."""

    name: str
    kubeconfig: Path
    api_client: ApiClient

    def kubectl(
        self, *args: str, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run our kubectl build against this cluster."""
        return subprocess.run(
            [str(BIN / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=check,
        )

    def install_crds(self, crds: list[dict[str, Any]]) -> None:
        """Apply CustomResourceDefinitions (server-side: some are too big for the last-applied
        annotation) and wait until the API server serves them."""
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=yaml.safe_dump_all(crds))
        names = [f"crd/{crd['metadata']['name']}" for crd in crds]
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s", *names)


def cluster_script(*args: str, timeout: float = UP_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run tools/cluster/cluster.py with this interpreter."""
    return subprocess.run(
        [sys.executable, str(CLUSTER_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@contextlib.contextmanager
def running_cluster(name: str, *up_args: str, hint: str, timeout: float = UP_TIMEOUT_S) -> Iterator[Cluster]:
    """`cluster.py up NAME UP_ARGS`, the cluster while the block runs, then `down`, checking that none of
    its processes is left. If it cannot start, the test fails with the reason (and `hint`)."""
    kubeconfig = CACHE / "kube" / f"{name}.kubeconfig"
    names = ["--name", name, "--kubeconfig", str(kubeconfig)]
    up = cluster_script("up", *names, *up_args, timeout=timeout)
    if up.returncode != 0:
        cluster_script("down", *names, timeout=300)
        pytest.fail(f"the local cluster {name} did not start ({hint}):\n{up.stderr}", pytrace=False)
    api_client: ApiClient = kube_config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
    try:
        yield Cluster(name, kubeconfig, api_client)
    finally:
        api_client.close()  # type: ignore[no-untyped-call]
        down = cluster_script("down", *names, timeout=300)
        left = cluster_script("pids", "--name", name, timeout=30).stdout.split()
        assert down.returncode == 0, f"cluster-down failed:\n{down.stderr}"
        assert not left, f"processes of cluster {name} left after down: {left}"


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """One local cluster (4 fake nodes x 8 nvidia.com/gpu, CRDs installed) for the test session."""
    with running_cluster(E2E_CLUSTER_NAME, hint="make tools first?") as up:
        yield up


def wait_for_default_service_account(core: CoreV1Api, namespace: str, timeout: float = 60) -> None:
    """Pods can be created only once the service-account controller made `default`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            core.read_namespaced_service_account("default", namespace)
            return
        except ApiException as err:
            if err.status != 404 or time.monotonic() > deadline:
                raise
        time.sleep(0.2)


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test, deleted (and gone) afterwards."""
    core = CoreV1Api(cluster.api_client)
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{slug}-{uuid.uuid4().hex[:6]}"
    core.create_namespace(V1Namespace(metadata=V1ObjectMeta(name=name, labels={"finetune.dev/e2e": "true"})))
    wait_for_default_service_account(core, name)
    yield name
    core.delete_namespace(name)
    # Wait, so that pods of this test do not hold GPUs while the next test runs.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            core.read_namespace(name)
        except ApiException as err:
            if err.status == 404:
                return
            raise
        time.sleep(0.25)
    raise AssertionError(f"namespace {name} was not deleted within 120s")


@pytest.fixture
def claims(cluster: Cluster, namespace: str) -> Iterator[None]:
    """The claims the README example reads and writes, bound, in this test's namespace."""
    from .harness import bound_claims

    core = CoreV1Api(cluster.api_client)
    volumes = bound_claims(core, namespace)
    yield
    for volume in volumes:
        try:
            core.delete_persistent_volume(volume)
        except ApiException as exc:
            if exc.status != 404:
                raise


@pytest.fixture
def operator_env() -> dict[str, str]:
    """Settings the `operator` fixture's process gets on top of the harness's; a test module overrides
    this fixture to run every test's operator with other defaults."""
    return {}


@pytest.fixture
def operator(
    cluster: Cluster, namespace: str, claims: None, tmp_path: Path, operator_env: dict[str, str]
) -> Iterator[Operator]:
    """A standalone operator watching this test's namespace, with the trainer service account."""
    from .harness import Operator

    core = CoreV1Api(cluster.api_client)
    core.create_namespaced_service_account(
        namespace, V1ServiceAccount(metadata=V1ObjectMeta(name="finetune-trainer"))
    )
    process = Operator(cluster, namespace, tmp_path / "operator.log", env=operator_env).start()
    yield process
    process.stop()
    print(f"--- operator log ({process.log}) ---\n{process.tail(80)}")


@pytest.fixture
def api(cluster: Cluster) -> CustomObjectsApi:
    return CustomObjectsApi(cluster.api_client)


@pytest.fixture
def core(cluster: Cluster) -> CoreV1Api:
    return CoreV1Api(cluster.api_client)
