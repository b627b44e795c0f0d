"""The operator as a real process against the local control plane with KWOK GPU nodes.

Each test gets its own namespace and its own operator (`python -m finetune_operator --namespace NS
--standalone`), with short restart backoffs from the environment so a whole-gang restart
takes about a second. KWOK makes scheduled pods Running; `finish_pod` ends them with an exit code.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import urllib3
import yaml
from kubernetes import watch
from kubernetes.client import (
    CoreV1Api,
    CustomObjectsApi,
    SchedulingV1Api,
    V1Affinity,
    V1Container,
    V1Eviction,
    V1Namespace,
    V1NodeAffinity,
    V1NodeSelector,
    V1NodeSelectorRequirement,
    V1NodeSelectorTerm,
    V1ObjectMeta,
    V1Pod,
    V1PodSpec,
    V1PriorityClass,
    V1ResourceQuota,
    V1ResourceQuotaSpec,
    V1ResourceRequirements,
    V1ServiceAccount,
)
from kubernetes.client.exceptions import ApiException
from kubernetes.config import new_client_from_config
from pydantic import ValidationError

from finetune_operator.api.models import parse_job
from finetune_operator.api.trainer import PROGRESS_ANNOTATION, ProgressReport
from finetune_operator.cli import main as ftctl
from finetune_operator.client import DoesNotFit, FineTuneClient
from finetune_operator.controller import ACTING_MESSAGE
from finetune_operator.core.plan import plan
from finetune_trainer.progress import PodAnnotationReporter

from .conftest import BIN, REPO, Cluster, cluster_script
from .faults import Fault, FaultProxy, Request, Rule
from .harness import (
    GROUP,
    OPERATOR_ENV,
    PLURAL,
    TIMEOUT,
    VERSION,
    Operator,
    all_running,
    bound_claims,
    condition,
    create,
    delete,
    eventually,
    example,
    finish_all,
    get,
    phase_is,
    set_run_policy,
    two_nodes,
    wait_job,
    wait_pods,
    worker_pods,
)
from .kwok import finish_pod, wait_for_pod_gone
from .processes import free_port

pytestmark = pytest.mark.cluster

# --- the tests ----------------------------------------------------------------------------------------


def test_readme_example_is_planned_runs_and_succeeds(
    cluster: Cluster, api: CustomObjectsApi, core: CoreV1Api, operator: Operator
) -> None:
    ns, name = operator.namespace, "llama2-7b-alpaca-lora"
    create(api, ns, example(name))
    status = wait_job(api, operator, name, phase_is("Running"), "Running phase")
    assert status["plan"]["fits"] is True
    assert (status["plan"]["gpus"], status["plan"]["nodes"], status["plan"]["gpuType"]) == (1, 1, "A100-80GB")
    assert condition(status, "Planned")["status"] == "True"
    assert status["workers"] == {"total": 1, "pending": 0, "running": 1, "succeeded": 0, "failed": 0}

    (pod,) = worker_pods(core, ns, name)
    container = pod.spec.containers[0]
    env = {e.name: e.value for e in container.env}
    assert pod.metadata.name == f"{name}-worker-0"
    assert pod.metadata.labels["finetune.dev/job-name"] == name
    assert pod.metadata.labels["finetune.dev/replica-index"] == "0"
    assert pod.spec.node_name.startswith("a100-")
    assert (
        container.resources.requests["nvidia.com/gpu"] == container.resources.limits["nvidia.com/gpu"] == "1"
    )
    assert env["MASTER_ADDR"] == f"{name}-worker-0.{name}-workers"
    assert (env["NNODES"], env["NODE_RANK"], env["NPROC_PER_NODE"], env["WORLD_SIZE"]) == ("1", "0", "1", "1")
    assert pod.spec.hostname == f"{name}-worker-0" and pod.spec.subdomain == f"{name}-workers"
    assert pod.spec.service_account_name == "finetune-trainer"
    assert pod.spec.security_context.run_as_non_root is True
    assert container.security_context.capabilities.drop == ["ALL"]
    assert core.read_namespaced_service(f"{name}-workers", ns).spec.cluster_ip == "None"
    assert "trainer_config.yaml" in core.read_namespaced_config_map(f"{name}-config", ns).data

    table = cluster.kubectl("get", "ftj", name, "-n", ns, "--no-headers").stdout.split()
    assert table[:5] == [name, "Running", "lora", "1", "1"]

    finish_pod(core, ns, pod.metadata.name, 0)
    waited = cluster.kubectl(
        "wait", "--for=condition=Succeeded", f"ftj/{name}", "-n", ns, "--timeout=60s", check=False
    )
    assert waited.returncode == 0, waited.stderr + operator.tail()
    status = get(api, ns, name)["status"]
    assert status["phase"] == "Succeeded" and status["completionTime"]

    def reasons() -> set[str]:
        events = core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
        return {e.reason for e in events}

    expected = {"Pending", "CreatedWorkers", "Running", "Succeeded"}
    eventually(lambda: expected <= reasons(), "events", operator.tail)
    succeeded = f'finetune_job_phase{{job_name="{name}",namespace="{ns}",phase="Succeeded"}} 1.0'
    eventually(lambda: succeeded in operator.metrics(), "Succeeded in /metrics", operator.tail)
    assert f'finetune_job_planned_gpus{{job_name="{name}",namespace="{ns}"}} 1.0' in operator.metrics()


def contained(rendered: Any, served: Any, path: str = "") -> list[str]:
    """Where `rendered` differs from `served`, ignoring what the API server adds (defaults, uid, status)."""
    if isinstance(rendered, dict):
        if not isinstance(served, dict):
            return [f"{path}: {served!r} is not a mapping"]
        return [
            d for key, value in rendered.items() for d in contained(value, served.get(key), f"{path}.{key}")
        ]
    if isinstance(rendered, list):
        # The server appends to some lists (the service-account token volume and mount, default
        # tolerations): every rendered item must be there, in order, with additions between allowed.
        if not isinstance(served, list):
            return [f"{path}: {served!r} is not a list"]
        remaining = iter(served)
        missing = [item for item in rendered if not any(contained(item, other) == [] for other in remaining)]
        return [d for item in missing for d in _missing(item, served, path)]
    return [] if rendered == served else [f"{path}: served {served!r}, rendered {rendered!r}"]


def _missing(item: Any, served: list[Any], path: str) -> list[str]:
    """Why a rendered list item is not in the served list: its differences from the served item of the
    same name (containers, volumes, env), else the item itself."""
    name = item.get("name") if isinstance(item, dict) else None
    twin = next(
        (o for o in served if name is not None and isinstance(o, dict) and o.get("name") == name), None
    )
    if twin is None:
        return [f"{path}: {item!r} is missing"]
    return contained(item, twin, f"{path}[{name}]") or [f"{path}[{name}]: out of order"]


def test_ftctl_render_prints_what_the_operator_creates(
    cluster: Cluster,
    api: CustomObjectsApi,
    core: CoreV1Api,
    operator: Operator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ns, name = operator.namespace, "rendered"
    create(api, ns, two_nodes(name))
    wait_pods(core, ns, name, all_running(2), "2 running workers")
    served_job = get(api, ns, name)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(served_job))
    for key, value in OPERATOR_ENV.items():  # the operator's settings, as the operator has them
        monkeypatch.setenv(key, value)
    assert ftctl(["render", "-f", str(job_file)]) == 0
    rendered = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [o["kind"] for o in rendered] == ["ConfigMap", "Service", "Pod", "Pod"]
    for obj in rendered:
        kind, obj_name = obj["kind"], obj["metadata"]["name"]
        read = {
            "ConfigMap": core.read_namespaced_config_map,
            "Service": core.read_namespaced_service,
            "Pod": core.read_namespaced_pod,
        }[kind]
        served = cluster.api_client.sanitize_for_serialization(read(obj_name, ns))
        assert contained(obj, served) == [], f"{kind}/{obj_name}"


def test_a_failed_worker_restarts_the_whole_gang_which_then_succeeds(
    api: CustomObjectsApi, core: CoreV1Api, operator: Operator
) -> None:
    ns, name = operator.namespace, "gang"
    create(api, ns, two_nodes(name))
    first = wait_pods(core, ns, name, all_running(2), "two running workers")
    assert [p.spec.containers[0].resources.limits["nvidia.com/gpu"] for p in first] == ["8", "8"]
    assert len({p.spec.node_name for p in first}) == 2
    finish_pod(core, ns, "gang-worker-1", 1)

    second = wait_pods(core, ns, name, all_running(2, attempt=1), "a new gang (attempt 1)")
    assert {p.metadata.uid for p in second}.isdisjoint({p.metadata.uid for p in first})
    status = wait_job(api, operator, name, phase_is("Running"), "Running after the restart")
    assert status["restarts"] == 1
    assert condition(status, "Restarting")["status"] == "False"
    finish_all(core, ns, name, 0)
    status = wait_job(api, operator, name, phase_is("Succeeded"), "success after one restart")
    assert status["restarts"] == 1


def test_exhausted_backoff_fails_the_job_and_frees_the_gpus(
    api: CustomObjectsApi, core: CoreV1Api, operator: Operator
) -> None:
    ns, name = operator.namespace, "flaky"
    create(api, ns, two_nodes(name, backoffLimit=1))
    wait_pods(core, ns, name, all_running(2), "two running workers")
    finish_pod(core, ns, "flaky-worker-0", 1)
    wait_pods(core, ns, name, all_running(2, attempt=1), "the restarted gang")
    finish_pod(core, ns, "flaky-worker-0", 1)
    status = wait_job(api, operator, name, phase_is("Failed"), "Failed")
    assert condition(status, "Failed")["reason"] == "BackoffLimitExceeded"
    assert status["restarts"] == 1 and status["completionTime"]
    wait_for_pod_gone(core, ns, "flaky-worker-1")  # the healthy worker is removed, its GPUs freed


def test_a_config_error_exit_code_fails_at_once(
    api: CustomObjectsApi, core: CoreV1Api, operator: Operator
) -> None:
    ns, name = operator.namespace, "bad-config"
    create(api, ns, example(name))
    wait_pods(core, ns, name, all_running(1), "a running worker")
    finish_pod(core, ns, "bad-config-worker-0", 78)
    status = wait_job(api, operator, name, phase_is("Failed"), "Failed")
    assert condition(status, "Failed")["reason"] == "ConfigError"
    assert status["restarts"] == 0


def test_a_pod_the_api_server_refuses_fails_the_job_with_its_message(
    api: CustomObjectsApi, core: CoreV1Api, operator: Operator
) -> None:
    """The Priority admission plugin refuses a pod naming a missing PriorityClass (403, not a quota)."""
    ns, name = operator.namespace, "no-such-priority"
    create(api, ns, example(name, priorityClassName="does-not-exist"))
    status = wait_job(api, operator, name, phase_is("Failed"), "Failed")
    failed = condition(status, "Failed")
    assert failed["reason"] == "Rejected"
    assert "does-not-exist" in failed["message"]
    assert worker_pods(core, ns, name) == []


def test_not_enough_gpus_is_unschedulable_with_the_schedulers_message(
    api: CustomObjectsApi, core: CoreV1Api, operator: Operator
) -> None:
    ns, name = operator.namespace, "too-big"
    create(api, ns, example(name, resources={"gpus": 40, "gpusPerNode": 8}))  # 5 nodes; the cluster has 4

    def short_of_gpus(status: dict[str, Any]) -> bool:
        # The scheduler's message can name another cause first (its caches lag); the operator
        # follows it as it changes, so wait for the GPU shortage rather than the first reason.
        scheduled = condition(status, "Scheduled")
        return (
            scheduled.get("reason") == "Unschedulable"
            and "Insufficient nvidia.com/gpu" in scheduled["message"]
        )

    status = wait_job(api, operator, name, short_of_gpus, "Unschedulable for lack of GPUs")
    assert status["phase"] == "Scheduling"
    assert condition(status, "Scheduled")["status"] == "False"


def test_suspend_removes_the_workers_and_resume_brings_them_back(
    api: CustomObjectsApi, core: CoreV1Api, operator: Operator
) -> None:
    ns, name = operator.namespace, "pausable"
    create(api, ns, two_nodes(name))
    wait_pods(core, ns, name, all_running(2), "two running workers")
    set_run_policy(api, ns, name, suspend=True)
    wait_pods(core, ns, name, lambda pods: not pods, "no workers while suspended")
    status = wait_job(api, operator, name, phase_is("Suspended"), "Suspended")
    assert status["plan"]["nodes"] == 2 and status["restarts"] == 0
    set_run_policy(api, ns, name, suspend=False)
    wait_pods(core, ns, name, all_running(2, attempt=1), "the workers back, as a new attempt")
    status = wait_job(api, operator, name, phase_is("Running"), "Running again")
    assert condition(status, "Suspended")["reason"] == "Resumed"
    assert (status["restarts"], status.get("disruptions", 0), status["relaunches"]) == (0, 0, 1)


def test_deleting_the_job_garbage_collects_everything(
    api: CustomObjectsApi, core: CoreV1Api, operator: Operator
) -> None:
    ns, name = operator.namespace, "doomed"
    create(api, ns, two_nodes(name))
    wait_pods(core, ns, name, all_running(2), "two running workers")
    assert get(api, ns, name)["metadata"].get("finalizers") in (None, [])
    delete(api, ns, name)
    wait_pods(core, ns, name, lambda pods: not pods, "pods garbage-collected")

    def left() -> list[str]:
        selector = f"finetune.dev/job-name={name}"
        objects = core.list_namespaced_config_map(ns, label_selector=selector).items
        objects += core.list_namespaced_service(ns, label_selector=selector).items
        return [o.metadata.name for o in objects]

    eventually(lambda: not left(), "config map and service garbage-collected", lambda: str(left()))


def test_ttl_after_finished_deletes_the_job(
    api: CustomObjectsApi, core: CoreV1Api, operator: Operator
) -> None:
    ns, name = operator.namespace, "short-lived"
    create(api, ns, example(name, runPolicy={"ttlSecondsAfterFinished": 1}))
    wait_pods(core, ns, name, all_running(1), "a running worker")
    finish_pod(core, ns, f"{name}-worker-0", 0)
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            get(api, ns, name)
        except ApiException as exc:
            assert exc.status == 404
            break
        assert time.monotonic() < deadline, operator.tail()
        time.sleep(0.2)


def test_active_deadline_fails_a_job_that_runs_too_long(
    api: CustomObjectsApi, core: CoreV1Api, operator: Operator
) -> None:
    ns, name = operator.namespace, "slow"
    create(api, ns, example(name, runPolicy={"activeDeadlineSeconds": 3}))
    status = wait_job(api, operator, name, phase_is("Failed"), "Failed on the deadline")
    assert condition(status, "Failed")["reason"] == "DeadlineExceeded"
    wait_pods(core, ns, name, lambda pods: not pods, "the worker removed")


def test_operator_killed_mid_job_readopts_its_pods_without_duplicates(
    api: CustomObjectsApi, core: CoreV1Api, operator: Operator
) -> None:
    ns, name = operator.namespace, "survivor"
    create(api, ns, two_nodes(name))
    before = wait_pods(core, ns, name, all_running(2), "two running workers")
    wait_job(api, operator, name, phase_is("Running"), "Running")
    operator.kill9()
    operator.start()
    time.sleep(3)  # the new process has listed the job and its pods, and acted on them
    after = worker_pods(core, ns, name)
    assert [(p.metadata.name, p.metadata.uid) for p in after] == [
        (p.metadata.name, p.metadata.uid) for p in before
    ]
    finish_all(core, ns, name, 0)
    status = wait_job(api, operator, name, phase_is("Succeeded"), "success under the new operator")
    assert status["restarts"] == 0


def test_a_model_that_does_not_fit_fails_with_memory_fits_and_no_pods(
    api: CustomObjectsApi, core: CoreV1Api, operator: Operator
) -> None:
    ns, name = operator.namespace, "too-large"
    create(api, ns, misfit(name))
    status = wait_job(api, operator, name, phase_is("Failed"), "Failed")
    assert condition(status, "MemoryFits")["status"] == "False"
    assert condition(status, "Failed")["reason"] == "MemoryFits"
    assert "does not fit" in condition(status, "Failed")["message"]
    assert status["plan"]["fits"] is False
    assert worker_pods(core, ns, name) == []


def misfit(name: str) -> dict[str, Any]:
    """Full fine-tuning of a 70B model on one L4: no count fits it; the planner suggests cheaper variants."""
    document = example(name, model={"name": "meta-llama/Meta-Llama-3-70B"})
    document["spec"]["method"] = {"type": "full"}  # replaced, not merged: the lora block must go
    document["spec"]["resources"] = {"gpuType": "L4", "gpusPerNode": 1, "gpus": 1}
    return document


def registered_webhooks(cluster: Cluster) -> list[str]:
    listed = json.loads(cluster.kubectl("get", "validatingwebhookconfigurations", "-o", "json").stdout)
    return [hook["name"] for config in listed["items"] for hook in config.get("webhooks") or []]


def test_the_admission_webhook_answers_kubectl_apply_with_the_plan(
    cluster: Cluster, namespace: str, claims: None, api: CustomObjectsApi, tmp_path: Path
) -> None:
    """With the webhook, a misfit is refused at apply with exactly what `ftctl plan` says (suggestions
    included), a fitting job is admitted and planned, and a spec change into a misfit is refused. With
    the operator stopped (failurePolicy Ignore, the default) apply admits, and the operator fails the job
    as MemoryFits once it runs, as without a webhook."""
    port = free_port()
    webhook = Operator(
        cluster, namespace, tmp_path / "webhook.log", args=("--standalone", "--webhook-port", str(port))
    ).start()
    try:
        eventually(
            lambda: "plan.finetune-operator.finetune.dev" in registered_webhooks(cluster),
            "webhook registered",
            webhook.tail,
        )
        answer = plan(parse_job(misfit("too-large")).spec)
        assert not answer.fits and "would fit: " in answer.message
        with pytest.raises(ApiException) as refused:
            create(api, namespace, misfit("too-large"))
        assert refused.value.status == 422
        assert f"MemoryFits: {answer.message}" in str(refused.value.body)
        flash = example("flash")  # a kernel the trainer image lacks
        flash["spec"]["model"]["attentionImplementation"] = "flash_attention_2"
        with pytest.raises(ApiException) as lacking:
            create(api, namespace, flash)
        assert lacking.value.status == 422
        assert "attentionImplementation: the trainer image" in str(lacking.value.body)

        create(api, namespace, example("fits"))
        status = wait_job(api, webhook, "fits", lambda s: bool(s.get("plan")), "plan")
        assert status["plan"]["fits"] is True
        changed_job = get(api, namespace, "fits")  # onto one L4, with a batch that needs 4 GPUs' memory
        changed_job["spec"]["resources"] = {"gpuType": "L4", "gpusPerNode": 1, "gpus": 1}
        changed_job["spec"]["training"] |= {"microBatchSize": 64, "gradientCheckpointing": False}
        with pytest.raises(ApiException) as changed:
            api.replace_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "fits", changed_job)
        assert changed.value.status == 422 and "MemoryFits: does not fit" in str(changed.value.body)
    finally:
        webhook.stop()
        print(f"--- webhook operator log ---\n{webhook.tail(40)}")

    eventually(lambda: registered_webhooks(cluster) == [], "webhook withdrawn on stop")
    create(api, namespace, misfit("while-down"))
    plain = Operator(cluster, namespace, tmp_path / "operator.log").start()
    try:
        status = wait_job(api, plain, "while-down", phase_is("Failed"), "Failed")
        assert condition(status, "Failed")["reason"] == "MemoryFits"
    finally:
        plain.stop()


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda s: s["training"].update(learningRate=-1), "learningRate"),
        (lambda s: s["method"].update(type="sft"), "method.type"),
        (lambda s: s["resources"].update(memory="lots"), "resources.memory"),
        (lambda s: s.setdefault("runPolicy", {}).update(queueName="q" * 64), "runPolicy.queueName"),
    ],
    ids=["schema-bound", "schema-enum", "schema-quantity", "schema-label-value"],
)
def test_invalid_specs_are_rejected_at_apply(
    api: CustomObjectsApi, operator: Operator, mutate: Callable[[dict[str, Any]], None], fragment: str
) -> None:
    """The API server and the Python models (ftctl, the operator) refuse the same specs, alike: schema
    bounds and enums here; every CEL rule in tests/e2e/test_rules.py."""
    document = example("invalid")
    mutate(document["spec"])
    with pytest.raises(ApiException) as err:
        create(api, operator.namespace, document)
    assert err.value.status == 422
    assert fragment in str(err.value.body)
    with pytest.raises(ValidationError) as python_err:
        parse_job(document)
    assert fragment in str(python_err.value)


# --- the Helm chart's RBAC and kopf peering: two replicas, one acts ---------------------------------------

CHART = REPO / "charts" / "finetune-operator"


def install_chart(
    cluster: Cluster,
    namespace: str,
    release: str,
    *,
    watch: tuple[str, ...] = (),
    trainer_namespaces: bool = True,
) -> list[dict[str, Any]]:
    """`helm template` for this namespace, applied without the Deployment (the test runs the replicas as
    local processes, under the chart's service account): CRDs first, then the rest once established.
    `watch` defaults to the release namespace; `trainer_namespaces` has the chart make the trainer's
    account there too (else only the operator provides it)."""
    values = ["--set", f"watchNamespaces={{{','.join(watch or (namespace,))}}}"]
    if trainer_namespaces:
        values += ["--set", f"trainerNamespaces={{{namespace}}}"]
    rendered = subprocess.run(
        [str(BIN / "helm"), "template", release, str(CHART), "-n", namespace, "--kube-version", "1.37.2",
         *values,
         # The replicas run as local processes here, so no Service could reach their webhook.
         "--set", "webhook.enabled=false"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    documents = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] != "Deployment"]
    crds = [d for d in documents if d["kind"] == "CustomResourceDefinition"]
    rest = [d for d in documents if d["kind"] != "CustomResourceDefinition"]
    for batch in (crds, rest):
        applied = subprocess.run(
            [str(BIN / "kubectl"), "--kubeconfig", str(cluster.kubeconfig), "apply", "-f", "-"],
            input=yaml.safe_dump_all(batch), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert applied.returncode == 0, applied.stderr
        if batch is crds:
            names = [f"crd/{d['metadata']['name']}" for d in crds]
            cluster.kubectl("wait", "--for=condition=Established", *names, "--timeout=30s")
    return documents


def delete_cluster_scoped(cluster: Cluster, documents: list[dict[str, Any]]) -> None:
    """The chart's ClusterRoles and bindings outlive the test's namespace: delete them."""
    for document in documents:
        if document["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            cluster.kubectl("delete", document["kind"].lower(), document["metadata"]["name"], check=False)


def service_account_kubeconfig(cluster: Cluster, namespace: str, account: str, path: Path) -> Path:
    """A kubeconfig that authenticates as `account`, so RBAC is exactly what the chart grants."""
    token = cluster.kubectl("-n", namespace, "create", "token", account, "--duration=1h").stdout.strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": admin["clusters"][0]["cluster"]}],
                "users": [{"name": account, "user": {"token": token}}],
                "contexts": [{"name": "sa", "context": {"cluster": "c", "user": account}}],
                "current-context": "sa",
            }
        )
    )
    return path


def wait_for_peers(api: CustomObjectsApi, namespace: str, count: int) -> None:
    """Until `count` operators have registered in the namespace's KopfPeering (kopf writes one status
    entry per live peer)."""

    def peers() -> dict[str, Any]:
        peering = api.get_namespaced_custom_object(
            "kopf.dev", "v1", namespace, "kopfpeerings", "finetune-operator"
        )
        return dict(peering.get("status") or {})

    eventually(lambda: len(peers()) >= count, f"{count} peers in KopfPeering", lambda: str(peers()))


def test_rank0_progress_reaches_status_and_kubectl_get_under_the_charts_trainer_rbac(
    cluster: Cluster, api: CustomObjectsApi, core: CoreV1Api, operator: Operator, tmp_path: Path
) -> None:
    """The trainer's own reporter, authenticated as the chart's trainer service account, patches rank 0's
    pod; the operator copies the report into status; `kubectl get ftj` shows Progress, Loss and ETA."""
    ns, name = operator.namespace, "progress"
    install_chart(cluster, ns, "ft")
    create(api, ns, example(name))
    wait_job(api, operator, name, phase_is("Running"), "Running phase")
    (pod,) = worker_pods(core, ns, name)
    trainer_kubeconfig = service_account_kubeconfig(
        cluster, ns, "finetune-trainer", tmp_path / "trainer.kubeconfig"
    )
    as_trainer = CoreV1Api(new_client_from_config(str(trainer_kubeconfig)))
    report = ProgressReport(
        step=120,
        total_steps=1000,
        epoch=0.36,
        loss=1.234,
        learning_rate=2e-4,
        tokens_per_second=5000.0,
        elapsed_seconds=600.0,
        steps_this_attempt=120,
    )
    PodAnnotationReporter(pod.metadata.name, ns, api=as_trainer).report(report)
    annotations = core.read_namespaced_pod(pod.metadata.name, ns).metadata.annotations
    assert ProgressReport.from_json(annotations[PROGRESS_ANNOTATION]).step == 120  # the patch was allowed
    with pytest.raises(ApiException) as denied:  # and the trainer may patch pods, not delete them
        as_trainer.delete_namespaced_pod(pod.metadata.name, ns)
    assert denied.value.status == 403

    status = wait_job(api, operator, name, lambda s: (s.get("progress") or {}).get("step") == 120, "progress")
    progress = status["progress"]
    assert (progress["totalSteps"], progress["percent"], progress["loss"]) == (1000, 12, 1.234)
    assert progress["eta"] == "1h13m"  # 880 steps left at 120 steps per 600 s
    row = cluster.kubectl("get", "ftj", name, "-n", ns, "--no-headers").stdout.split()
    assert row[1:8] == ["Running", "lora", "1", "1", "12%", "(120/1000)", "1.234"]
    loss = f'finetune_job_loss{{job_name="{name}",namespace="{ns}"}} 1.234'
    eventually(lambda: loss in operator.metrics(), "the loss in /metrics", operator.tail)


def test_a_job_in_a_namespace_nobody_prepared_runs_under_the_charts_rbac(
    cluster: Cluster, namespace: str, api: CustomObjectsApi, core: CoreV1Api, tmp_path: Path
) -> None:
    """The chart's defaults: the operator creates the trainer's account in the job's namespace and binds
    it to the chart's trainer ClusterRole (the only role it may bind); the trainer may then patch its pod
    there, and nothing more."""
    other = f"{namespace[:56]}-other"
    core.create_namespace(V1Namespace(metadata=V1ObjectMeta(name=other, labels={"finetune.dev/e2e": "true"})))
    volumes = bound_claims(core, other)
    release = f"ft-{namespace[-6:]}"
    documents: list[dict[str, Any]] = []
    try:
        documents = install_chart(
            cluster, namespace, release, watch=(namespace, other), trainer_namespaces=False
        )
        kubeconfig = service_account_kubeconfig(cluster, namespace, release, tmp_path / "sa.kubeconfig")
        deployment = yaml.safe_load(
            subprocess.run(
                [str(BIN / "helm"), "template", release, str(CHART), "-n", namespace, "--kube-version", "1.37.2",
                 "--show-only", "templates/deployment.yaml"],
                capture_output=True, text=True, check=True, timeout=60,
            ).stdout
        )  # fmt: skip
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        chart_env = {e["name"]: e["value"] for e in container["env"] if "value" in e}  # not POD_NAME
        role = chart_env["FINETUNE_TRAINER_CLUSTER_ROLE"]
        operator = Operator(
            cluster,
            other,
            tmp_path / "operator.log",
            kubeconfig=kubeconfig,
            env={"FINETUNE_TRAINER_CLUSTER_ROLE": role},
        ).start()
        try:
            create(api, other, example("elsewhere"))
            wait_job(api, operator, "elsewhere", phase_is("Running"), "Running phase")
        finally:
            operator.stop()
        binding = cluster.kubectl("get", "rolebinding", "finetune-trainer", "-n", other, "-o", "json").stdout
        assert json.loads(binding)["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": role,
        }
        (pod,) = worker_pods(core, other, "elsewhere")
        assert pod.spec.service_account_name == "finetune-trainer"
        as_trainer = CoreV1Api(
            new_client_from_config(
                str(
                    service_account_kubeconfig(
                        cluster, other, "finetune-trainer", tmp_path / "trainer.kubeconfig"
                    )
                )
            )
        )
        as_trainer.patch_namespaced_pod(
            pod.metadata.name, other, {"metadata": {"annotations": {"probe": "1"}}}
        )
        with pytest.raises(ApiException) as denied:
            as_trainer.delete_namespaced_pod(pod.metadata.name, other)
        assert denied.value.status == 403
    finally:
        delete_cluster_scoped(cluster, documents)
        core.delete_namespace(other)
        for volume in volumes:
            core.delete_persistent_volume(volume)


def test_two_peered_replicas_under_the_charts_rbac_one_acts_and_the_other_takes_over(
    cluster: Cluster, namespace: str, claims: None, api: CustomObjectsApi, core: CoreV1Api, tmp_path: Path
) -> None:
    release = f"ft-{namespace[-6:]}"
    documents = install_chart(cluster, namespace, release)
    kubeconfig = service_account_kubeconfig(cluster, namespace, release, tmp_path / "sa.kubeconfig")
    fast_peering = {"FINETUNE_PEERING_LIFETIME_SECONDS": "3", "FINETUNE_PEERING_HANDOVER_SECONDS": "3"}
    active = Operator(
        cluster,
        namespace,
        tmp_path / "active.log",
        kubeconfig=kubeconfig,
        args=("--priority", "200"),
        env=fast_peering,
    )
    standby = Operator(
        cluster,
        namespace,
        tmp_path / "standby.log",
        kubeconfig=kubeconfig,
        args=("--priority", "100"),
        env=fast_peering,
    )
    try:
        active.start()
        wait_for_peers(api, namespace, 1)
        standby.start()
        wait_for_peers(api, namespace, 2)  # both registered: from now on only the higher priority acts
        name = "peered"
        create(api, namespace, two_nodes(name))
        first = wait_pods(core, namespace, name, all_running(2), "two running workers")
        wait_job(api, active, name, phase_is("Running"), "Running")
        assert "CreatedWorkers" in active.log.read_text()
        assert "CreatedWorkers" not in standby.log.read_text()  # paused by peering: it never acted

        active.kill9()
        finish_pod(core, namespace, f"{name}-worker-1", 1)
        second = wait_pods(
            core, namespace, name, all_running(2, attempt=1), "the gang restarted by the standby"
        )
        assert {p.metadata.uid for p in second}.isdisjoint({p.metadata.uid for p in first})
        status = wait_job(api, standby, name, phase_is("Running"), "Running under the standby")
        assert status["restarts"] == 1
        finish_all(core, namespace, name, 0)
        wait_job(api, standby, name, phase_is("Succeeded"), "success under the standby")
    finally:
        for process in (active, standby):
            process.stop()
            print(f"--- {process.log.name} ---\n{process.tail(40)}")
        delete_cluster_scoped(cluster, documents)


def test_the_sdk_and_ftctl_submit_follow_and_wait_for_jobs(
    cluster: Cluster, core: CoreV1Api, operator: Operator, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a notebook (FineTuneClient) and a terminal (ftctl submit/get/status/wait) do, end to end."""
    ns = operator.namespace
    client = FineTuneClient(namespace=ns, kubeconfig=str(cluster.kubeconfig))
    target = ["-n", ns, "--kubeconfig", str(cluster.kubeconfig)]
    with pytest.raises(DoesNotFit, match="does not fit on 1 GPU"):
        client.submit(misfit("too-large"))
    assert client.list_jobs() == []  # a misfit never reaches the cluster

    planned = client.submit(example("sdk"))
    assert (planned.gpus, planned.fits) == (1, True)
    running = client.wait("sdk", until=lambda s: s.phase == "Running", timeout=TIMEOUT, poll_seconds=0.5)
    assert running.workers is not None and running.workers.running == 1

    assert ftctl(["get", *target]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == [
        "NAME",
        "PHASE",
        "METHOD",
        "GPUS",
        "PROGRESS",
        "LOSS",
        "ETA",
        "RESTARTS",
        "AGE",
    ]
    assert table[1].split()[:4] == ["sdk", "Running", "lora", "1"]

    def status_text() -> str:
        assert ftctl(["status", "sdk", *target]) == 0
        return capsys.readouterr().out

    eventually(lambda: "CreatedWorkers" in status_text(), "events in ftctl status", operator.tail)
    text = status_text()
    assert text.startswith(f"FineTuneJob {ns}/sdk: Running, 1 worker running")
    assert "Plan:        1 GPU on 1 node, ZeRO-0" in text and "Conditions:" in text
    assert "finetune-operator" in text  # the events' source is the operator, not kopf
    assert ftctl(["status", "sdk", *target, "-o", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["kind"], data["job"]["metadata"]["name"]) == ("Status", "sdk")
    assert any(e["reason"] == "CreatedWorkers" for e in data["events"])

    finish_pod(core, ns, "sdk-worker-0", 0)
    assert client.wait("sdk", timeout=TIMEOUT, poll_seconds=0.5).phase == "Succeeded"
    assert ftctl(["wait", "sdk", "--timeout", "10", *target]) == 0
    assert capsys.readouterr().out.startswith("finetunejob.finetune.dev/sdk Succeeded")

    # ftctl submit, then a job that fails: wait exits 1 and says why
    manifest = Path(operator.log).with_name("broken.yaml")
    manifest.write_text(yaml.safe_dump(example("broken")))
    assert ftctl(["submit", "-f", str(manifest), *target]) == 0
    assert "finetunejob.finetune.dev/broken submitted to" in capsys.readouterr().out
    client.wait("broken", until=lambda s: s.phase == "Running", timeout=TIMEOUT, poll_seconds=0.5)
    finish_pod(core, ns, "broken-worker-0", 78)  # a configuration error: never retried
    assert ftctl(["wait", "broken", "--timeout", str(TIMEOUT), *target]) == 1
    assert "FineTuneJob broken failed: ConfigError" in capsys.readouterr().err
    assert ftctl(["status", "nobody", *target]) == 1
    assert "Error from server (NotFound)" in capsys.readouterr().err


def test_an_operator_that_cannot_act_says_why_in_its_log(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    """Without --standalone and without its peering object kopf would wait in silence."""
    process = Operator(
        cluster, namespace, tmp_path / "operator.log", args=("--peering-name", "nobody")
    ).start()
    try:
        expected = f"cannot act: no KopfPeering in namespace {namespace} named 'nobody'"
        eventually(lambda: expected in process.tail(200), "the preflight error", process.tail)
        assert "run a single replica with --standalone" in process.tail(200)
    finally:
        process.stop()


def test_a_deleted_worker_restarts_the_whole_gang(
    api: CustomObjectsApi, core: CoreV1Api, operator: Operator
) -> None:
    """A worker deleted from a running gang (kubectl delete, an eviction): a new rank could not join the
    formed rendezvous, so the gang is replaced rather than the one pod recreated alone."""
    ns, name = operator.namespace, "holed"
    create(api, ns, two_nodes(name))
    first = wait_pods(core, ns, name, all_running(2), "two running workers")
    wait_job(api, operator, name, phase_is("Running"), "Running")
    core.delete_namespaced_pod(f"{name}-worker-1", ns, grace_period_seconds=0)
    second = wait_pods(core, ns, name, all_running(2, attempt=1), "a new gang (attempt 1)")
    assert {p.metadata.uid for p in second}.isdisjoint({p.metadata.uid for p in first})
    status = wait_job(api, operator, name, phase_is("Running"), "Running after the restart")
    # not the trainer's failure: a disruption, which does not spend backoffLimit
    assert (status.get("restarts", 0), status["disruptions"]) == (0, 1) and status["lastRestartTime"]
    assert condition(status, "Restarting")["status"] == "False"

    def reasons() -> set[str]:
        return {
            e.reason
            for e in core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
        }

    eventually(lambda: "WorkerMissing" in reasons(), "a WorkerMissing event", operator.tail)


def test_evicted_workers_restart_the_gang_without_spending_the_backoff_limit(
    api: CustomObjectsApi, core: CoreV1Api, operator: Operator
) -> None:
    """Three evictions (a drain, a preemption) of a job whose backoffLimit is 1: each restarts the gang as
    a disruption, and the job still succeeds."""
    ns, name = operator.namespace, "evicted"
    create(api, ns, two_nodes(name, backoffLimit=1))
    for attempt in range(3):
        wait_pods(core, ns, name, all_running(2, attempt=attempt), f"a running gang (attempt {attempt})")
        wait_job(api, operator, name, phase_is("Running"), f"Running (attempt {attempt})")
        worker = f"{name}-worker-{attempt % 2}"
        core.create_namespaced_pod_eviction(
            worker, ns, V1Eviction(metadata=V1ObjectMeta(name=worker, namespace=ns))
        )
    wait_pods(core, ns, name, all_running(2, attempt=3), "the gang after three evictions")
    finish_all(core, ns, name, 0)
    status = wait_job(api, operator, name, phase_is("Succeeded"), "success after three evictions")
    assert (status.get("restarts", 0), status["disruptions"]) == (0, 3)


def test_preempted_five_times_by_the_scheduler_the_job_still_succeeds(
    api: CustomObjectsApi, core: CoreV1Api, operator: Operator
) -> None:
    """kube-scheduler's own preemption, five times, of a job whose backoffLimit is 1. Each time a pod of
    a higher PriorityClass needs a GPU of the node worker 0 fills (8 of 8), so the scheduler evicts that
    worker; each eviction restarts the gang as a disruption, and the job still succeeds."""
    ns, name, urgent = operator.namespace, "preempted", "finetune-e2e-urgent"
    scheduling = SchedulingV1Api(core.api_client)
    with contextlib.suppress(ApiException):  # left by an interrupted run
        scheduling.delete_priority_class(urgent)
    scheduling.create_priority_class(
        V1PriorityClass(
            metadata=V1ObjectMeta(name=urgent), value=1_000_000, preemption_policy="PreemptLowerPriority"
        )
    )
    try:
        create(api, ns, two_nodes(name, backoffLimit=1))
        for attempt in range(5):
            gang = wait_pods(
                core, ns, name, all_running(2, attempt=attempt), f"a running gang (attempt {attempt})"
            )
            wait_job(api, operator, name, phase_is("Running"), f"Running (attempt {attempt})")
            node = next(p.spec.node_name for p in gang if p.metadata.name.endswith("-worker-0"))
            pod = f"urgent-{attempt}"
            core.create_namespaced_pod(ns, urgent_pod(pod, urgent, node))
            eventually(
                lambda pod=pod: bool(core.read_namespaced_pod(pod, ns).spec.node_name),
                f"{pod} scheduled onto {node} by preempting worker 0",
                operator.tail,
            )
            core.delete_namespaced_pod(pod, ns, grace_period_seconds=0)  # the next gang needs that node
        wait_pods(core, ns, name, all_running(2, attempt=5), "the gang after five preemptions")
        finish_all(core, ns, name, 0)
        status = wait_job(api, operator, name, phase_is("Succeeded"), "success after five preemptions")
        assert (status.get("restarts", 0), status["disruptions"]) == (0, 5)
        events = core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
        reasons = {e.reason for e in events} & {"PreemptionByScheduler", "WorkerMissing"}
        # the DisruptionTarget condition, or the pod already gone when the operator looked (KWOK deletes
        # a fake pod at once; a real kubelet first runs its SIGTERM checkpoint)
        assert reasons, [e.reason for e in events]
        print(f"five scheduler preemptions restarted the gang as disruptions ({', '.join(sorted(reasons))})")
    finally:
        scheduling.delete_priority_class(urgent)


def urgent_pod(name: str, priority_class: str, node: str) -> V1Pod:
    """A pod of `priority_class` that needs one GPU of `node` and nothing else."""
    on_node = V1NodeSelectorTerm(
        match_fields=[V1NodeSelectorRequirement(key="metadata.name", operator="In", values=[node])]
    )
    return V1Pod(
        metadata=V1ObjectMeta(name=name),
        spec=V1PodSpec(
            priority_class_name=priority_class,
            containers=[
                V1Container(
                    name="urgent",
                    image="registry.example/urgent:1",
                    resources=V1ResourceRequirements(limits={"nvidia.com/gpu": "1"}),
                )
            ],
            affinity=V1Affinity(
                node_affinity=V1NodeAffinity(
                    required_during_scheduling_ignored_during_execution=V1NodeSelector(
                        node_selector_terms=[on_node]
                    )
                )
            ),
        ),
    )


#: tools/cluster/stages.yaml: a node annotated so reports Ready False (its kubelet stopped), and a pod
#: annotated so is never removed once deleted (no kubelet confirms it).
KWOK_LOST_NODE = "kwok.finetune.dev/lost"
KWOK_STUCK_POD = "kwok.finetune.dev/stuck"


def test_a_node_that_stops_reporting_restarts_the_gang_on_the_others(
    api: CustomObjectsApi, core: CoreV1Api, operator: Operator
) -> None:
    """One worker's node stops being Ready, as when its kubelet or the machine dies, and nothing will ever
    finish its pod's deletion. Kubernetes taints the node and evicts the worker after the operator's
    toleration (5 s here); the operator reads the node, takes the worker as lost, force-deletes it and
    restarts the gang, as a disruption, on the other nodes, instead of waiting forever on a pod stuck
    Terminating whose name the next attempt needs."""
    ns, name = operator.namespace, "stranded"
    create(api, ns, two_nodes(name, backoffLimit=0))
    first = wait_pods(core, ns, name, all_running(2), "two running workers")
    wait_job(api, operator, name, phase_is("Running"), "Running")
    lost, stuck = first[1].spec.node_name, first[1].metadata.name
    core.patch_namespaced_pod(stuck, ns, {"metadata": {"annotations": {KWOK_STUCK_POD: "true"}}})
    core.patch_node(lost, {"metadata": {"annotations": {KWOK_LOST_NODE: "true"}}})
    started = time.monotonic()
    try:
        second = wait_pods(core, ns, name, all_running(2, attempt=1), "a new gang")
        took = time.monotonic() - started
        assert lost not in {p.spec.node_name for p in second}
        assert first[1].metadata.uid not in {p.metadata.uid for p in second}  # force-deleted, replaced
        status = wait_job(api, operator, name, phase_is("Running"), "Running after the node loss")
        # backoffLimit 0: a restart that counted against it would have failed the job
        assert (status.get("restarts", 0), status["disruptions"]) == (0, 1)
        events = core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
        (event,) = [e for e in events if e.reason == "NodeLost"]
        assert f"is on node {lost}, which has not been Ready for 5s" in event.message
        print(f"node {lost} lost: the gang ran again on other nodes {took:.0f}s after it stopped")
    finally:
        with contextlib.suppress(ApiException):  # a pod left stuck would hold its namespace forever
            core.patch_namespaced_pod(stuck, ns, {"metadata": {"annotations": {KWOK_STUCK_POD: None}}})
        core.patch_node(lost, {"metadata": {"annotations": {KWOK_LOST_NODE: None}}})

        def ready_again() -> bool:
            node = core.read_node(lost)
            ready = [c for c in node.status.conditions or [] if c.type == "Ready"]
            tainted = [t for t in node.spec.taints or [] if t.key.startswith("node.kubernetes.io/")]
            return bool(ready) and ready[0].status == "True" and not tainted

        eventually(ready_again, f"node {lost} Ready and untainted again", operator.tail)


def test_a_quota_that_keeps_refusing_a_worker_is_an_event_then_clears(
    api: CustomObjectsApi, core: CoreV1Api, operator: Operator
) -> None:
    """A ResourceQuota that admits one pod: the second worker is refused (403, exceeded quota) on every
    try. That may clear by itself, so it is retried with backoff, and after three tries it is a Warning
    event on the job rather than only a log line; once the quota goes, the gang is created."""
    ns, name = operator.namespace, "over-quota"
    quota = V1ResourceQuota(
        metadata=V1ObjectMeta(name="one-pod"), spec=V1ResourceQuotaSpec(hard={"pods": "1"})
    )
    core.create_namespaced_resource_quota(ns, quota)
    eventually(
        lambda: (core.read_namespaced_resource_quota("one-pod", ns).status.hard or {}).get("pods") == "1",
        "the quota in force",
    )
    create(api, ns, two_nodes(name))

    def refusals() -> list[str]:
        events = core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
        return [e.message for e in events if e.reason == "RetryingApiError"]

    eventually(lambda: bool(refusals()), "a RetryingApiError event", operator.tail)
    (message,) = refusals()  # once per distinct error, not once per try
    assert "exceeded quota" in message and f"{name}-worker-1" in message and "tries" in message, message
    # and a condition, for `kubectl wait --for=condition=ApiError` and whatever reads conditions
    failing = wait_job(
        api, operator, name, lambda s: condition(s, "ApiError").get("status") == "True", "ApiError True"
    )
    assert condition(failing, "ApiError")["message"] == message
    core.delete_namespaced_resource_quota("one-pod", ns)
    wait_pods(core, ns, name, all_running(2), "both workers once the quota is gone")
    running = wait_job(
        api,
        operator,
        name,
        lambda s: phase_is("Running")(s) and condition(s, "ApiError").get("status") == "False",
        "Running, ApiError False",
    )
    assert condition(running, "ApiError")["reason"] == "Recovered"


# --- chaos ----------------------------------------------------------------------------------------------

#: Per kind of job in the chaos test: how many, and what it must end as (phase or None for deleted,
#: restarts counted, pod incarnations created).
CHAOS_JOBS = {
    "succeed": (5, "Succeeded", 0, 1),
    "retry": (5, "Succeeded", 1, 2),  # exit 1 once: one whole-gang restart, then success
    "config": (3, "Failed", 0, 1),  # exit 78: failed at once, never retried
    "suspend": (4, "Succeeded", 0, 2),  # suspended (workers deleted), resumed (recreated), then success
    "delete": (3, None, 0, 1),  # deleted while running: nothing of it is left
}
CHAOS_DISRUPTIONS = sum(
    n for n, *_ in CHAOS_JOBS.values()
)  # 20: before each job's creation but the first, and at the end


class PodLedger:
    """Every pod incarnation (uid) a watch of the namespace saw, by job: a restart counted twice, or a
    worker created twice, shows up as one too many. The watch resumes from its last resourceVersion
    after an error, and lists again when a restarted API server no longer has it (410): the test restarts
    the control plane synchronously, so nothing is created and deleted unseen in between."""

    def __init__(self, core: CoreV1Api, namespace: str) -> None:
        self.core, self.namespace = core, namespace
        self.uids: dict[str, set[str]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        version: str | None = None
        while not self.stop.is_set():
            try:
                if version is None:  # at first, and when the API server restarted and forgot older versions
                    listed = json.loads(
                        self.core.list_namespaced_pod(self.namespace, _preload_content=False).data
                    )
                    for pod in listed["items"]:
                        self._saw(pod)
                    version = listed["metadata"]["resourceVersion"]
                stream = watch.Watch().stream(
                    self.core.list_namespaced_pod,
                    self.namespace,
                    resource_version=version,
                    timeout_seconds=2,
                    _preload_content=False,
                )
                for event in stream:
                    version = event["raw_object"]["metadata"]["resourceVersion"]
                    self._saw(event["raw_object"])
            except ApiException as exc:
                if exc.status == 410:
                    version = None
                self.stop.wait(0.1)
            except (OSError, urllib3.exceptions.HTTPError):
                self.stop.wait(0.1)  # the API server is restarting: resume from `version`

    def _saw(self, pod: dict[str, Any]) -> None:
        job = (pod["metadata"].get("labels") or {}).get("finetune.dev/job-name")
        if job is not None:
            self.uids.setdefault(job, set()).add(pod["metadata"]["uid"])

    def __enter__(self) -> PodLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def chaos_step(api: CustomObjectsApi, core: CoreV1Api, ns: str, name: str, kind: str, done: set[str]) -> bool:
    """Move one job of the chaos test along from what the API server says now (idempotent: a step is
    keyed on what the pods and status show, so repeating it is harmless); True once it is where it
    should end."""
    try:
        status = get(api, ns, name).get("status") or {}
    except ApiException as exc:
        assert exc.status == 404, exc
        return kind == "delete" and not worker_pods(core, ns, name)
    live = [p for p in worker_pods(core, ns, name) if not p.metadata.deletion_timestamp]
    running = [p for p in live if p.status.phase == "Running"]
    attempt = running[0].metadata.labels["finetune.dev/attempt"] if running else None
    phase = status.get("phase")
    if kind == "delete":
        if running:
            delete(api, ns, name)
        return False
    if phase in ("Succeeded", "Failed"):
        return not [p for p in live if p.status.phase in ("Pending", "Running")]
    if kind == "suspend":
        suspended = (get(api, ns, name)["spec"].get("runPolicy") or {}).get("suspend", False)
        if running and "suspended" not in done:
            set_run_policy(api, ns, name, suspend=True)
            done.add("suspended")
        elif suspended and phase == "Suspended" and not live:
            set_run_policy(api, ns, name, suspend=False)
            done.add("resumed")
        elif running and "resumed" in done and not suspended:
            finish_pod(core, ns, running[0].metadata.name, 0)
        return False
    if running:
        code = {"succeed": 0, "config": 78, "retry": 1 if attempt == "0" else 0}[kind]
        finish_pod(core, ns, running[0].metadata.name, code)
    return False


def chaos(
    api: CustomObjectsApi,
    core: CoreV1Api,
    operators: Sequence[Operator],
    disrupt: Callable[[int], None],
    *,
    seed: int = 14,
    timeout: float = 300,
) -> None:
    """The chaos run: the 20 jobs of CHAOS_JOBS are created one at a time in a shuffled order, with
    `disrupt(n)` before each but the first (and once more at the end, with nothing left to do), at random
    moments, while every job is moved along its life a step now and then. Then every job must have ended
    as it should, with its restarts counted once, no worker created one time too many, and no pod left
    behind; and every operator (one, or the peered replicas) must be running."""
    ns = operators[0].namespace

    def tails() -> str:
        return "\n".join(f"--- {o.log.name} ---\n{o.tail()}" for o in operators)

    rng = random.Random(seed)
    jobs = {f"{kind}-{i}": kind for kind, (n, *_) in CHAOS_JOBS.items() for i in range(n)}
    waiting = rng.sample(sorted(jobs), len(jobs))
    created: list[str] = []
    finished: set[str] = set()
    steps: dict[str, set[str]] = {name: set() for name in jobs}
    disruptions = 0
    next_disruption = time.monotonic()
    deadline = time.monotonic() + timeout
    with PodLedger(core, ns) as ledger:
        while len(finished) < len(jobs):
            assert time.monotonic() < deadline, (
                f"not converged: {sorted(set(jobs) - finished)} ({disruptions} disruptions)\n{tails()}"
            )
            if waiting and time.monotonic() >= next_disruption:
                if created:
                    disrupt(disruptions)
                    disruptions += 1
                created.append(waiting.pop())
                create(api, ns, example(created[-1]))
                next_disruption = time.monotonic() + rng.uniform(1.0, 4.0)
            for name in created:
                # A step now and then, not at once: each job's life spans several disruptions.
                if name in finished or rng.random() > 0.15:
                    continue
                if chaos_step(api, core, ns, name, jobs[name], steps[name]):
                    finished.add(name)
            time.sleep(0.1)
        disrupt(disruptions)  # the last one, on an operator with nothing left to do
        disruptions += 1
        assert disruptions == CHAOS_DISRUPTIONS
        time.sleep(3)  # the operator has listed everything again: nothing more must happen
    for operator in operators:
        assert operator.proc is not None and operator.proc.poll() is None, (
            f"{operator.log.name} exited\n{tails()}"
        )
    for name, kind in jobs.items():
        _, phase, restarts, incarnations = CHAOS_JOBS[kind]
        if phase is None:
            with pytest.raises(ApiException) as gone:
                get(api, ns, name)
            assert gone.value.status == 404
        else:
            status = get(api, ns, name)["status"]
            assert (status["phase"], status.get("restarts", 0)) == (phase, restarts), (name, status)
            if kind == "config":
                assert condition(status, "Failed")["reason"] == "ConfigError"
        assert not [p for p in worker_pods(core, ns, name) if p.status.phase in ("Pending", "Running")]
        assert len(ledger.uids.get(name, ())) == incarnations, (name, ledger.uids.get(name))


def test_kill_9_twenty_times_while_jobs_run_fail_restart_suspend_and_go_every_job_ends_right(
    api: CustomObjectsApi, core: CoreV1Api, operator: Operator
) -> None:
    """Chaos: the operator is killed (SIGKILL) and restarted 20 times at random moments while 20 jobs
    are created, run, fail, restart, suspend, resume and are deleted."""

    def kill_and_restart(_: int) -> None:
        operator.kill9()
        operator.start()

    chaos(api, core, [operator], kill_and_restart)


#: The peered chaos run's replicas, highest priority first, and their peering timings (seconds).
PEERED = (("replica-a", 200), ("replica-b", 100))
PEERED_LIFETIME, PEERED_HANDOVER = 3, 3
#: kopf's log lines (kopf._core.engines.peering, 1.45) when it resumes or pauses a replica's loops.
RESUMED = "Resuming operations after the pause"
PAUSED = ("Pausing operations in favour of", "Pausing all operators, including self")
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def acting_intervals(
    log: Path, kills: Sequence[datetime], until: datetime
) -> list[tuple[datetime, datetime]]:
    """When a replica acted, from its log (every process it ran appends to it) and the times it was
    killed: from the later of kopf resuming its loops and its own line that its handover wait is over
    (`ACTING_MESSAGE`, once per process), until kopf paused it or it was killed."""
    timeline = [(when, "killed") for when in kills]
    for line in log.read_text(errors="replace").splitlines():
        stamp = LOG_TIME.match(line)
        if stamp is None:
            continue
        when = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f")
        if RESUMED in line:
            timeline.append((when, "resumed"))
        elif any(paused in line for paused in PAUSED):
            timeline.append((when, "paused"))
        elif ACTING_MESSAGE in line:
            timeline.append((when, "acting"))
    intervals, resumed, handed_over, since = [], False, False, until
    for when, what in sorted(timeline):
        was = resumed and handed_over
        resumed = what == "resumed" or (resumed and what not in ("paused", "killed"))
        handed_over = what == "acting" or (handed_over and what != "killed")
        if resumed and handed_over and not was:
            since = when
        elif was and not (resumed and handed_over):
            intervals.append((since, when))
    if resumed and handed_over:
        intervals.append((since, until))
    return intervals


def test_two_peered_replicas_under_the_chaos_killed_at_random_never_act_at_once(
    cluster: Cluster, namespace: str, claims: None, api: CustomObjectsApi, core: CoreV1Api, tmp_path: Path
) -> None:
    """The chaos run with two replicas under the chart's RBAC and peering (priorities 200 and 100). Each
    disruption kills -9 one of them at random, or starts the one that is down: the standby takes over
    from a dead active replica, and the active one takes back over when it returns. Beyond what the
    chaos run checks: from the replicas' logs, the two never acted at the same time, and from the
    events (reportingInstance), both made changes."""
    release = f"ft-{namespace[-6:]}"
    documents = install_chart(cluster, namespace, release)
    kubeconfig = service_account_kubeconfig(cluster, namespace, release, tmp_path / "sa.kubeconfig")
    timings = {
        "FINETUNE_PEERING_LIFETIME_SECONDS": str(PEERED_LIFETIME),
        "FINETUNE_PEERING_HANDOVER_SECONDS": str(PEERED_HANDOVER),
    }
    replicas = {
        name: Operator(
            cluster,
            namespace,
            tmp_path / f"{name}.log",
            kubeconfig=kubeconfig,
            args=("--priority", str(priority)),
            env={**timings, "POD_NAME": name},
        )
        for name, priority in PEERED
    }
    rng = random.Random(7)
    kills: dict[str, list[datetime]] = {name: [] for name in replicas}
    down: list[str] = []

    def kill_or_start(_: int) -> None:
        if down:
            replicas[down.pop()].start()
            return
        name = rng.choice(sorted(replicas))
        kills[name].append(datetime.now())  # local time, as the logs' timestamps
        replicas[name].kill9()
        down.append(name)
        if name == PEERED[0][0]:  # the active one: long enough for the standby to take over and act
            time.sleep(PEERED_LIFETIME + PEERED_HANDOVER + 1)

    try:
        for count, operator in enumerate(replicas.values(), start=1):
            operator.start()
            wait_for_peers(api, namespace, count)
        chaos(api, core, list(replicas.values()), kill_or_start, timeout=420)
        now = datetime.now()
        acted = {name: acting_intervals(o.log, kills[name], now) for name, o in replicas.items()}
        turns = sorted((since, name) for name, intervals in acted.items() for since, _ in intervals)
        print(f"kills: {kills}\nacting, in turn: {[(f'{since:%T}', name) for since, name in turns]}")
        (a, a_acted), (b, b_acted) = acted.items()
        at_once = [(x, y) for x in a_acted for y in b_acted if max(x[0], y[0]) < min(x[1], y[1])]
        assert not at_once, f"{a} and {b} both acted: {at_once}"
        # The standby took over, and the active replica took back over after it.
        names = [name for _, name in turns]
        assert b in names and a in names[names.index(b) :], turns
        reporters = {e.reporting_instance for e in core.list_namespaced_event(namespace).items}
        assert set(replicas) <= reporters, reporters
    finally:
        for operator in replicas.values():
            operator.stop()
            print(f"--- {operator.log.name} ---\n{operator.tail(40)}")
        delete_cluster_scoped(cluster, documents)


def test_the_control_plane_restarts_five_times_under_the_chaos_and_the_operator_recovers_by_itself(
    cluster: Cluster, api: CustomObjectsApi, core: CoreV1Api, operator: Operator
) -> None:
    """kube-apiserver (with etcd and the controllers) is stopped and started again 5 times while the 20
    chaos jobs run: the operator's watches break and its writes fail, and it must carry on by itself, the
    same process, with every job ending right."""
    restarts: list[float] = []

    def restart_control_plane(n: int) -> None:
        if n % 4 == 3:  # every 4th disruption of 20
            begun = time.monotonic()
            done = cluster_script("restart", "--name", cluster.name, "--kubeconfig", str(cluster.kubeconfig))
            assert done.returncode == 0, done.stderr
            restarts.append(time.monotonic() - begun)

    chaos(api, core, [operator], restart_control_plane)
    assert len(restarts) == 5, restarts


# --- API faults the real server does not give on demand -------------------------------------------------

#: Seconds the injected 429s ask clients to wait: longer than the e2e operator's 0.2 s error backoff, so a
#: retry that ignored the header would show.
RETRY_AFTER = 2


def _status_write(r: Request) -> bool:
    return (
        r.method in ("PUT", "PATCH")
        and r.path.startswith("/apis/finetune.dev/")
        and r.path.endswith("/status")
    )


#: The faults the chaos run goes through, one set after each job's creation (20 in all, each set 4 times):
#: 409 on status writes, 429 with Retry-After, 500s, watches ended with 410 Gone, and slow answers.
FAULT_SETS: list[list[Rule]] = [
    [Rule(_status_write, Fault("conflict", status=409), 0.5)],
    [Rule(lambda r: not r.watch, Fault("throttled", status=429, retry_after=RETRY_AFTER), 0.3)],
    [Rule(lambda r: not r.watch, Fault("error", status=500), 0.3)],
    [Rule(lambda r: r.watch, Fault("expired", status=410), 0.5)],
    [Rule(lambda r: True, Fault("slow", delay=0.8), 0.5)],
]


def test_api_faults_409_429_500_410_and_slow_answers_are_retried_and_every_job_ends_right(
    cluster: Cluster, namespace: str, claims: None, core: CoreV1Api, api: CustomObjectsApi, tmp_path: Path
) -> None:
    """The chaos jobs run while the operator reaches the API server only through a proxy that answers
    its requests (and kopf's) with conflicts, throttling with Retry-After, server errors, expired watches
    and delays, a different set after each job's creation. Every job must end right (no update lost or
    applied twice), the operator must not crash, and no throttled request may come again sooner than
    the server asked."""
    core.create_namespaced_service_account(
        namespace, V1ServiceAccount(metadata=V1ObjectMeta(name="finetune-trainer"))
    )
    with FaultProxy(cluster.api_client.configuration, seed=14) as proxy:
        operator = Operator(
            cluster,
            namespace,
            tmp_path / "operator.log",
            kubeconfig=proxy.kubeconfig(tmp_path / "proxy.kubeconfig"),
        ).start()
        try:
            chaos(api, core, [operator], lambda n: setattr(proxy, "rules", FAULT_SETS[n % len(FAULT_SETS)]))
        finally:
            operator.stop()
            print(f"--- operator log ({operator.log}) ---\n{operator.tail(80)}")
        seen = list(proxy.seen)
    given = {
        kind: len([s for s in seen if s.fault == kind])
        for kind in ("conflict", "throttled", "error", "expired", "slow")
    }
    assert all(given.values()), given  # every kind of fault was really given
    # No throttled request of ours came again sooner than Retry-After (and some did come again).
    gaps = []
    for i, refused in enumerate(seen):
        if refused.fault == "throttled" and refused.request.ours:
            again = next((s for s in seen[i + 1 :] if s.request.key == refused.request.key), None)
            if again is not None:
                gaps.append((again.at - refused.at, refused.request))
    assert gaps, "no throttled request of the operator's was sent again"
    assert min(gap for gap, _ in gaps) >= RETRY_AFTER - 0.05, min(gaps, key=lambda g: g[0])
    log = operator.log.read_text(errors="replace")
    assert "Traceback" not in log and "unexpected error" not in log, operator.tail(80)
