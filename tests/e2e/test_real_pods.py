"""FineTuneJobs trained by real pods: the chart's operator image as a pod, the trainer image on real kubelet
nodes (tools/cluster/realnode.py), a tiny Llama on hostPath volumes, CPU and gloo.

One cluster for this module (`finetune-real`, two real nodes with two fake GPUs each, next to the fake
ones), the operator installed by the chart from the images `make images` built, watching two namespaces
that nothing prepares but their volumes: the chart's defaults must make the trainer's ServiceAccount there.
Each test's job is the demo's (examples/demo.yaml): two workers, one per real node, rendezvous over the
headless Service's DNS names. A real Prometheus (tests/e2e/prometheus.py) scrapes the operator pod and
every worker from the first job on, with the chart's alert rules loaded; the last tests read it.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import CoreV1Api, CustomObjectsApi, V1Namespace, V1ObjectMeta

from finetune_operator.api.exit_codes import ExitCode, describe
from finetune_operator.api.models import GROUP, PLURAL, VERSION
from finetune_operator.api.trainer import LOSS_PLOT_FILE, SUMMARY_FILE
from monitoring.dashboards import panels
from trainer.tiny_models import build_tiny_llama, write_text_data
from trainer.tokenizer import build_tiny_tokenizer

from .conftest import BIN, CACHE, REPO, Cluster, running_cluster
from .prometheus import Prometheus, running_prometheus, scrape_config

pytestmark = [pytest.mark.cluster, pytest.mark.real_nodes]

NAME = os.environ.get("E2E_REAL_CLUSTER_NAME", "finetune-real")
RELEASE_NAMESPACE = "finetune-system"
NAMESPACES = ("team-a", "team-b")
#: The trainer image built here, as tools/cluster/realnode.py loads it into each real node.
TRAINER_IMAGE = "localhost/finetune/trainer:dev"
TRAINER_UID = 10001
DEMO = yaml.safe_load((REPO / "examples" / "demo.yaml").read_text())
#: Two CPU workers on two cores: start-up (torch, DeepSpeed, the tiny model) is most of a run.
JOB_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def real_cluster() -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("real nodes need root (network namespaces, mounts, cgroups)")
    with running_cluster(
        NAME, "--real-nodes", "2", "--real-gpus", "2", hint="make images first?", timeout=1800
    ) as up:
        yield up


@pytest.fixture(scope="module")
def volumes(real_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per namespace, `models` (the tiny Llama, and outputs) and `datasets` claims on hostPath volumes:
    both real nodes are this machine, so a hostPath is shared storage here."""
    root = tmp_path_factory.mktemp("real-volumes")
    root.chmod(0o755)
    build_tiny_tokenizer(root / "tokenizer")
    core = CoreV1Api(real_cluster.api_client)
    dirs = {}
    for ns in NAMESPACES:
        core.create_namespace(V1Namespace(metadata=V1ObjectMeta(name=ns)))
        base = root / ns
        build_tiny_llama(base / "models" / "tiny-llama", root / "tokenizer")
        (base / "datasets").mkdir(parents=True)
        write_text_data(base / "datasets" / "sentences.jsonl", repeats=64)
        for dirpath, _, files in os.walk(base):
            os.chown(dirpath, TRAINER_UID, TRAINER_UID)
            for name in files:
                os.chown(os.path.join(dirpath, name), TRAINER_UID, TRAINER_UID)
        for claim in ("models", "datasets"):
            pv = {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": f"{ns}-{claim}"},
                "spec": {
                    "capacity": {"storage": "1Gi"},
                    "accessModes": ["ReadWriteMany"],
                    "storageClassName": "local",
                    "hostPath": {"path": str(base / claim)},
                    "claimRef": {"namespace": ns, "name": claim},
                },
            }
            pvc = {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": claim, "namespace": ns},
                "spec": {
                    "accessModes": ["ReadWriteMany"],
                    "storageClassName": "local",
                    "volumeName": f"{ns}-{claim}",
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            }
            real_cluster.kubectl(
                "apply", "-f", "-", stdin=json.dumps({"kind": "List", "apiVersion": "v1", "items": [pv, pvc]})
            )
        dirs[ns] = base
    return dirs


@pytest.fixture(scope="module")
def operator(real_cluster: Cluster, volumes: dict[str, Path]) -> Iterator[None]:
    """The chart, installed as a user would, with the images built here and fast restarts."""
    namespaces = ",".join(NAMESPACES)
    helm = [str(BIN / "helm"), "--kubeconfig", str(real_cluster.kubeconfig)]
    args = ["upgrade", "--install", "finetune", str(REPO / "charts" / "finetune-operator")]
    args += ["-n", RELEASE_NAMESPACE, "--create-namespace", "--wait", "--timeout", "300s"]
    for key, value in {
        "image.repository": "localhost/finetune/operator",
        "image.tag": "dev",
        "image.pullPolicy": "Never",
        "trainerImage": TRAINER_IMAGE,
        "replicaCount": "1",
        "watchNamespaces": "{" + namespaces + "}",
        "settings.resyncSeconds": "2",
        "settings.restartBackoffSeconds": "1",
    }.items():
        args += ["--set", f"{key}={value}"]
    done = subprocess.run([*helm, *args], capture_output=True, text=True, timeout=400, check=False)
    if done.returncode != 0:
        pods = real_cluster.kubectl("-n", RELEASE_NAMESPACE, "describe", "pods", check=False).stdout
        pytest.fail(f"helm install failed: {done.stderr}\n{pods[-3000:]}", pytrace=False)
    # NOTES.txt tells a new user what to do next, with the names of this install
    assert "kubectl -n finetune-system rollout status deployment/finetune" in done.stdout, done.stdout
    assert "kubectl get finetunejobs -w" in done.stdout and "watching team-a, team-b" in done.stdout
    yield
    subprocess.run(
        [*helm, "uninstall", "finetune", "-n", RELEASE_NAMESPACE], capture_output=True, timeout=120
    )


def job_manifest(name: str, **changes: Any) -> dict[str, Any]:
    """examples/demo.yaml under another name, with top-level spec blocks merged from `changes`."""
    job = copy.deepcopy(DEMO)
    job["metadata"] = {"name": name}
    for block, value in changes.items():
        if isinstance(value, dict):
            job["spec"].setdefault(block, {}).update(value)
        else:
            job["spec"][block] = value
    job["spec"]["output"] = {"uri": f"pvc://models/{name}"}
    return job


class Jobs:
    def __init__(self, cluster: Cluster, namespace: str, root: Path) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.root = root
        self.api = CustomObjectsApi(cluster.api_client)
        self.core = CoreV1Api(cluster.api_client)

    def apply(self, job: dict[str, Any]) -> None:
        self.cluster.kubectl("-n", self.namespace, "apply", "-f", "-", stdin=json.dumps(job))

    def get(self, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = self.api.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name
        )
        return obj

    def patch(self, name: str, spec: dict[str, Any]) -> None:
        self.api.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name, {"spec": spec})

    def wait(
        self, name: str, what: str, done: Callable[[dict[str, Any]], bool], timeout: float = JOB_TIMEOUT_S
    ) -> dict[str, Any]:
        """Poll the job until `done(job)`; on timeout, fail with its status and the workers' log tails."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(name)
            if done(job):
                return job
            if time.monotonic() > deadline:
                logs = self.cluster.kubectl(
                    "-n",
                    self.namespace,
                    "logs",
                    "-l",
                    f"finetune.dev/job-name={name}",
                    "--tail=25",
                    check=False,
                )
                raise AssertionError(
                    f"{name}: not {what} in {timeout:.0f}s; status:\n{json.dumps(job.get('status'), indent=1)}\n"
                    f"logs:\n{logs.stdout}{logs.stderr}"
                )
            time.sleep(0.5)

    def output(self, name: str) -> Path:
        return self.root / "models" / name


def phase(job: dict[str, Any]) -> str | None:
    return job.get("status", {}).get("phase")


def step(job: dict[str, Any]) -> int:
    return int(job.get("status", {}).get("progress", {}).get("step", 0))


def condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in job.get("status", {}).get("conditions", []) if c["type"] == kind), None)


@pytest.fixture(scope="module")
def prometheus(
    real_cluster: Cluster, operator: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    """A real Prometheus scraping the operator pod and every worker from the module's first job on."""
    config = scrape_config(real_cluster.kubeconfig, RELEASE_NAMESPACE, NAMESPACES)
    with running_prometheus(config, tmp_path_factory.mktemp("prometheus")) as server:
        yield server


@pytest.fixture
def team_a(real_cluster: Cluster, volumes: dict[str, Path], prometheus: Prometheus) -> Jobs:
    return Jobs(real_cluster, NAMESPACES[0], volumes[NAMESPACES[0]])


@pytest.fixture
def team_b(real_cluster: Cluster, volumes: dict[str, Path], prometheus: Prometheus) -> Jobs:
    return Jobs(real_cluster, NAMESPACES[1], volumes[NAMESPACES[1]])


def summary(jobs: Jobs, name: str) -> dict[str, Any]:
    """The trainer's training_summary.json in the job's output directory (on the hostPath volume)."""
    result: dict[str, Any] = json.loads((jobs.output(name) / SUMMARY_FILE).read_text())
    return result


def signal_trainer(jobs: Jobs, pod: str, signal: str = "SIGKILL") -> None:
    """Send `signal` to the training process inside a worker: SIGKILL as the kernel's OOM killer or a crash
    would, SIGSTOP to freeze it as a hung collective does."""
    script = (
        "import os, signal\n"
        "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    cmd = open(f'/proc/{pid}/cmdline', 'rb').read()\n"
        "    if b'finetune-train' in cmd and b'finetune-launch' not in cmd:\n"
        f"        os.kill(int(pid), signal.{signal})\n"
    )
    jobs.cluster.kubectl("-n", jobs.namespace, "exec", pod, "--", "python", "-c", script)


def test_the_demo_job_trains_in_real_pods_to_succeeded(team_a: Jobs) -> None:
    """Progress moves while it runs, the loss falls, both workers ran on real nodes on CPU, the adapter is
    saved; the trainer's ServiceAccount was made by the operator in a namespace nobody prepared."""
    team_a.apply(job_manifest("demo"))
    running = team_a.wait("demo", "training", lambda j: phase(j) == "Running" and step(j) > 0)
    # `ftctl logs -f` streams rank 0's log as it is written and returns when the worker ends
    follow = subprocess.Popen(
        [str(REPO / ".venv" / "bin" / "ftctl"), "logs", "demo", "-f", "-n", team_a.namespace,
         "--kubeconfig", str(team_a.cluster.kubeconfig)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    job = team_a.wait("demo", "Succeeded", lambda j: phase(j) in ("Succeeded", "Failed"))
    assert phase(job) == "Succeeded", job["status"]
    streamed, errors = follow.communicate(timeout=60)
    assert follow.returncode == 0, errors
    assert "training on CPU, gloo" in streamed and "checkpoint" in streamed, streamed[-2000:]
    assert step(job) == DEMO["spec"]["training"]["maxSteps"] > step(running)

    pods = team_a.core.list_namespaced_pod(
        team_a.namespace, label_selector="finetune.dev/job-name=demo"
    ).items
    assert sorted(p.spec.node_name for p in pods) == ["real-1", "real-2"]
    assert all(p.status.phase == "Succeeded" for p in pods)
    team_a.core.read_namespaced_service_account("finetune-trainer", team_a.namespace)

    losses = [loss for _, loss in summary(team_a, "demo")["lossHistory"]]
    assert len(losses) >= 4 and losses[-1] < 0.95 * losses[0], losses
    out = team_a.output("demo")
    assert (out / "adapter_model.safetensors").stat().st_size > 0
    assert (out / LOSS_PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert DEMO["spec"]["training"]["reportTo"] == ["tensorboard"]
    assert list((out / "runs").glob("**/events.out.tfevents.*")), sorted(out.rglob("*"))
    log = team_a.core.read_namespaced_pod_log("demo-worker-0", team_a.namespace)
    assert "training on CPU, gloo" in log, log[-2000:]


def test_a_killed_worker_restarts_the_gang_from_the_newest_checkpoint(team_b: Jobs) -> None:
    team_b.apply(job_manifest("killed", training={"maxSteps": 100}, checkpointing={"saveSteps": 20}))

    def checkpointed(job: dict[str, Any]) -> bool:
        return int((job.get("status", {}).get("lastCheckpoint") or {}).get("step", 0)) >= 20

    before = team_b.wait("killed", "past a checkpoint", checkpointed)
    signal_trainer(team_b, "killed-worker-1")
    done = team_b.wait("killed", "finished", lambda j: phase(j) in ("Succeeded", "Failed"))
    assert phase(done) == "Succeeded", done["status"]
    assert done["status"]["restarts"] == 1
    # The second attempt started from a checkpoint at or after the one seen before the kill, not from 0.
    resumed = summary(team_b, "killed")["resumedFromStep"]
    assert resumed is not None and resumed >= before["status"]["lastCheckpoint"]["step"], summary(
        team_b, "killed"
    )


def test_suspend_saves_a_checkpoint_on_sigterm_and_resume_continues_from_it(team_a: Jobs) -> None:
    """saveSteps is past the end: the only checkpoint is the one SIGTERM made when the job was suspended."""
    # long enough that the suspension lands mid-run: the trainer does several steps a second here
    steps = 400
    team_a.apply(job_manifest("paused", training={"maxSteps": steps}, checkpointing={"saveSteps": 10_000}))
    team_a.wait("paused", "training", lambda j: phase(j) == "Running" and step(j) >= 20)
    team_a.patch("paused", {"runPolicy": {"suspend": True}})
    team_a.wait("paused", "Suspended", lambda j: phase(j) == "Suspended", timeout=180)
    # The workers are deleted at once and save their checkpoint while they terminate.
    deadline = time.monotonic() + 180
    while team_a.core.list_namespaced_pod(
        team_a.namespace, label_selector="finetune.dev/job-name=paused"
    ).items:
        assert time.monotonic() < deadline, "suspended workers did not exit within 180s"
        time.sleep(0.5)
    saved = sorted(
        int(p.name.split("-")[-1]) for p in (team_a.output("paused") / "checkpoints").glob("checkpoint-*")
    )
    assert saved and 20 <= saved[-1] < steps, saved

    team_a.patch("paused", {"runPolicy": {"suspend": False}})
    done = team_a.wait("paused", "finished", lambda j: phase(j) in ("Succeeded", "Failed"))
    assert phase(done) == "Succeeded", done["status"]
    result = summary(team_a, "paused")
    assert result["resumedFromStep"] == saved[-1], result
    assert result["stepsThisAttempt"] == steps - saved[-1], result


def test_a_node_keeps_the_trainer_unpacked_without_its_layer_blobs(real_cluster: Cluster) -> None:
    """The trainer is 7 GB: each node keeps its unpacked snapshots and not a second copy as layer blobs
    (tools/cluster/realnode.py, discard_layers); the jobs here run from those snapshots."""
    for node in ("real-1", "real-2"):
        socket = CACHE / "kwok" / "clusters" / NAME / "nodes" / node / "containerd.sock"

        def ctr(*args: str, socket: Path = socket) -> str:
            command = ["ctr", "--address", str(socket), "-n", "k8s.io", *args]
            return subprocess.run(command, check=True, capture_output=True, text=True).stdout

        (row,) = [
            line.split()
            for line in ctr("images", "check").splitlines()
            if line.startswith(f"{TRAINER_IMAGE} ")
        ]
        assert row[-1] == "true", row  # unpacked
        layers = {layer["digest"] for layer in json.loads(ctr("content", "get", row[2]))["layers"]}
        assert len(layers) > 5
        assert not layers & set(ctr("content", "ls", "-q").split()), f"{node} still holds trainer layer blobs"


def test_a_configuration_error_fails_at_once_without_a_retry(team_b: Jobs) -> None:
    team_b.apply(job_manifest("no-model", model={"uri": "pvc://models/not-there"}))
    job = team_b.wait("no-model", "finished", lambda j: phase(j) in ("Succeeded", "Failed"), timeout=240)
    assert phase(job) == "Failed"
    failed = condition(job, "Failed")
    assert failed is not None and failed["reason"] == describe(ExitCode.CONFIG_ERROR), job["status"]
    # the trainer's own line, through the pod's termination message
    assert "CONFIG_ERROR: " in failed["message"] and "/mnt/pvc/models/not-there" in failed["message"], failed
    assert job["status"].get("restarts", 0) == 0


def test_a_tracker_the_image_lacks_fails_at_once_naming_the_package(team_a: Jobs) -> None:
    team_a.apply(job_manifest("no-wandb", training={"reportTo": ["tensorboard", "wandb"]}))
    job = team_a.wait("no-wandb", "finished", lambda j: phase(j) in ("Succeeded", "Failed"), timeout=240)
    failed = condition(job, "Failed")
    assert failed is not None and failed["reason"] == describe(ExitCode.CONFIG_ERROR), job["status"]
    assert "training.reportTo wandb: this image lacks the wandb package" in failed["message"], failed
    assert job["status"].get("restarts", 0) == 0


# --- observed from a real Prometheus ------------------------------------------------------------------


def delete_job(jobs: Jobs, name: str) -> None:
    """Delete the job and wait until its workers are gone (they hold the nodes' GPUs)."""
    jobs.cluster.kubectl("-n", jobs.namespace, "delete", "finetunejob", name, "--wait=false")
    deadline = time.monotonic() + 180
    while jobs.core.list_namespaced_pod(jobs.namespace, label_selector=f"finetune.dev/job-name={name}").items:
        assert time.monotonic() < deadline, f"the workers of {name} did not go within 180s"
        time.sleep(0.5)


def test_a_job_whose_step_stops_is_stalled_and_the_alert_fires(team_a: Jobs, prometheus: Prometheus) -> None:
    """A frozen rank 0 (SIGSTOP, as a hung collective): the pods still run, the step stops."""
    team_a.apply(job_manifest("hung", training={"maxSteps": 5000}, runPolicy={"progressDeadlineSeconds": 15}))
    try:
        team_a.wait("hung", "training", lambda j: phase(j) == "Running" and step(j) > 0)
        signal_trainer(team_a, "hung-worker-0", "SIGSTOP")
        job = team_a.wait(
            "hung", "Stalled", lambda j: (condition(j, "Stalled") or {}).get("status") == "True", timeout=120
        )
        stalled = condition(job, "Stalled")
        assert stalled is not None and stalled["reason"] == "NoProgress", stalled
        assert phase(job) == "Running"  # a warning, not a failure
        events = team_a.cluster.kubectl(
            "-n", "team-a", "get", "events", "--field-selector", "involvedObject.name=hung,reason=Stalled"
        ).stdout
        assert "has not moved since" in events, events
        firing = (
            'ALERTS{alertname="FineTuneJobStalled",alertstate="firing",namespace="team-a",job_name="hung"}'
        )
        prometheus.wait_for(firing, "the FineTuneJobStalled alert firing", timeout=60)
    finally:
        signal_trainer(team_a, "hung-worker-0", "SIGKILL")
        delete_job(team_a, "hung")


def test_prometheus_follows_a_real_job_and_every_dashboard_query_returns_data(
    team_b: Jobs, prometheus: Prometheus
) -> None:
    team_b.apply(job_manifest("watched", training={"maxSteps": 300}))
    team_b.wait("watched", "training", lambda j: phase(j) == "Running" and step(j) > 0)
    job = 'namespace="team-b",job_name="watched"'
    ranks = prometheus.wait_for(
        f"finetune_trainer_step{{{job}}}", "both workers' steps", lambda v: len(v) == 2
    )
    assert all(value >= 0 for value in ranks)
    prometheus.wait_for(f"finetune_job_step{{{job}}}", "the operator's step", lambda v: bool(v) and v[0] > 0)
    gpu_seconds = f"finetune_job_gpu_seconds_total{{{job}}}"
    first = prometheus.wait_for(gpu_seconds, "GPU-seconds", lambda v: bool(v) and v[0] > 0)
    prometheus.wait_for(gpu_seconds, "GPU-seconds growing", lambda v: bool(v) and v[0] > first[0], timeout=30)

    # Every panel of every dashboard returns data while a job runs, after the module's earlier jobs
    # succeeded, failed, restarted and stalled; panels that need GPU measurements only have to parse.
    needs_gpu = ("finetune_job_gpu_memory_peak", "DCGM_")
    empty = []
    for dashboard, title, queries in panels(
        {"$namespace": "team-b", "$job_name": "watched", "$__range": "1h"}
    ):
        if all(any(name in q for name in needs_gpu) for q in queries):
            for query in queries:
                prometheus.query(query)  # raises unless it parses
            continue
        deadline = time.monotonic() + 60
        while not any(prometheus.query(q) for q in queries):
            if time.monotonic() > deadline:
                empty.append(f"{dashboard}: {title}: {queries}")
                break
            time.sleep(2)
    assert not empty, "panels without data:\n" + "\n".join(empty)
    rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
    assert len(rules) == 7, rules  # the chart's alert rules, all loaded
    unhealthy = [(rule["name"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"]
    assert not unhealthy, unhealthy

    done = team_b.wait("watched", "Succeeded", lambda j: phase(j) in ("Succeeded", "Failed"))
    assert phase(done) == "Succeeded", done["status"]
    time.sleep(6)  # three scrapes after the last status write
    settled = prometheus.values(gpu_seconds)
    time.sleep(6)
    assert prometheus.values(gpu_seconds) == settled and settled[0] > first[0]  # stopped when the pods ended
    finished = prometheus.values('finetune_jobs_finished_total{namespace="team-b",outcome="Succeeded"}')
    assert finished and finished[0] >= 1
