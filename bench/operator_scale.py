"""Operator scale benchmark: ours and the Kubeflow Training Operator, side by side on one local cluster.

Run: `make bench-operator` (python bench/operator_scale.py --jobs 50 200 1000 --write bench/results/operator-scale.json)

One control plane (tools/cluster/cluster.py, with an audit log) with 2 fake 8-GPU nodes per job of the
largest N, so every job's gang can run. For each N, each operator in turn runs alone, freshly started,
out of cluster, watching all namespaces: N jobs of 2 × 8-GPU workers are created at once (16 client
threads) in a fresh namespace, and this records, per run:

- pods_created_p50_s / p99_s: from a job's create call returning to both its pods being seen by a watch;
- running_p99_s: to both being Running (KWOK plays the kubelets);
- cpu_s: the operator's CPU time from the first create to every job running;
- peak_rss_mib, idle_rss_mib: the operator process's peak resident memory (VmHWM), and what it holds
  once the N jobs run (VmRSS at the end of the idle window);
- idle_cpu_pct: its CPU over IDLE_SECONDS afterwards, with the N jobs running and nothing changing;
- api_requests_per_job: the requests the API server's audit log attributes to it (by user agent), from
  the first create to every job running, per job.

Kubeflow runs "tuned" (client QPS/burst raised from 20/30 to 1000/1000, as its defaults throttle it
to tens of seconds at 200 jobs) with PyTorchJobs of one Master and one Worker of 8 GPUs each; ours
runs FineTuneJobs of a LoRA on a 7B model with `gpus: 16`, which plans 2 workers of 8.

BENCH_PROFILE=PATH runs ours under bench/profile_threads.py (cProfile in every thread, on each thread's CPU
clock) and writes the merged profile to PATH. BENCH_MEMORY=PATH runs ours under bench/memory_holders.py
and, once its jobs have settled, writes what holds its memory to PATH.ours-N (tracing inflates RSS and
CPU: neither run's figures are the benchmark's).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import config as kube_config
from kubernetes.client import AdmissionregistrationV1Api, ApiClient, CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("CACHE", REPO / ".cache")).resolve()
BIN = CACHE / "bin"
CLUSTER = "finetune-bench"
KUBECONFIG = CACHE / "kube" / f"{CLUSTER}.kubeconfig"
CLUSTER_SCRIPT = REPO / "tools" / "cluster" / "cluster.py"
AUDIT_LOG = CACHE / "kwok" / "clusters" / CLUSTER / "logs" / "audit.log"
HEALTH_PORT = 18081
IDLE_SECONDS = 30.0
SETTLE_SECONDS = 5.0
BENCH_AGENT = "finetune-bench"
#: The user agents of each operator's requests in the audit log.
AGENTS = {"ours": ("finetune-operator/", "kopf/"), "kubeflow": ("training-operator",)}
JOB_LABEL = {"ours": "finetune.dev/job-name", "kubeflow": "training.kubeflow.org/job-name"}


@dataclass
class Run:
    operator: str
    jobs: int
    pods_created_p50_s: float
    pods_created_p99_s: float
    running_p99_s: float
    cpu_s: float
    peak_rss_mib: float
    idle_rss_mib: float
    idle_cpu_pct: float
    api_requests_per_job: float
    settings: str


@dataclass
class PodClock:
    """When a watch first saw each job's pods, and saw them Running (seconds, time.monotonic)."""

    label: str
    seen: dict[str, dict[str, float]] = field(default_factory=dict)
    running: dict[str, dict[str, float]] = field(default_factory=dict)

    def record(self, pod: dict[str, Any], at: float) -> None:
        job = (pod["metadata"].get("labels") or {}).get(self.label)
        if job is None:
            return
        name = pod["metadata"]["name"]
        self.seen.setdefault(job, {}).setdefault(name, at)
        if (pod.get("status") or {}).get("phase") == "Running":
            self.running.setdefault(job, {}).setdefault(name, at)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mib(pid: int, field: str = "VmHWM") -> float:
    """The process's peak (VmHWM) or current (VmRSS) resident memory."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for {pid}")


def cluster(*args: str) -> None:
    subprocess.run([sys.executable, str(CLUSTER_SCRIPT), *args], check=True, timeout=1800)


def provenance(script: str, argv: list[str] | None) -> dict[str, object]:
    """The command that made a result and the machine it ran on, as every committed result records them."""
    return {
        "command": " ".join(["python", script, *(argv if argv is not None else sys.argv[1:])]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
    }


def kubeflow_module_dir() -> Path:
    out = subprocess.run(
        ["go", "list", "-m", "-f", "{{.Dir}}", "github.com/kubeflow/training-operator"],
        cwd=REPO / "tools" / "kubeflow",
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip())


@contextlib.contextmanager
def bench_cluster(nodes: int, kubeflow: bool = True) -> Iterator[ApiClient]:
    """The control plane with `nodes` fake 8-GPU nodes, our CRD and (`kubeflow`) Kubeflow's PyTorchJob CRD."""
    with tempfile.TemporaryDirectory() as tmp:
        crds = Path(tmp) / "crds"
        crds.mkdir()
        for crd in (REPO / "crds").glob("*.yaml"):
            shutil.copy(crd, crds)
        if kubeflow:
            shutil.copy(kubeflow_module_dir() / "manifests/base/crds/kubeflow.org_pytorchjobs.yaml", crds)
        pools = {
            "pools": [
                {
                    "name": "a100",
                    "count": nodes,
                    "gpusPerNode": 8,
                    "product": "NVIDIA-A100-SXM4-80GB",
                    "memoryMiB": 81920,
                    "cpu": "96",
                    "memory": "1Ti",
                }
            ]
        }
        nodes_file = Path(tmp) / "nodes.yaml"
        nodes_file.write_text(yaml.safe_dump(pools))
        names = ["--name", CLUSTER, "--kubeconfig", str(KUBECONFIG)]
        cluster(
            "up",
            *names,
            "--nodes",
            str(nodes_file),
            "--crds",
            str(crds),
            "--audit-policy",
            str(REPO / "bench" / "audit-policy.yaml"),
        )
        api_client: ApiClient = kube_config.new_client_from_config(config_file=str(KUBECONFIG))  # type: ignore[no-untyped-call]
        api_client.user_agent = BENCH_AGENT
        api_client.configuration.connection_pool_maxsize = 32
        try:
            yield api_client
        finally:
            api_client.close()  # type: ignore[no-untyped-call]
            cluster("down", *names)


def prepare_namespace(core: CoreV1Api, namespace: str, operator: str) -> None:
    core.create_namespace({"metadata": {"name": namespace}})
    deadline = time.monotonic() + 60
    while True:
        try:
            core.read_namespaced_service_account("default", namespace)
            break
        except ApiException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    if operator == "ours":  # the output claim, pre-bound, and the trainer's account
        volume = f"{namespace}-models"
        core.create_persistent_volume(
            {
                "metadata": {"name": volume},
                "spec": {
                    "capacity": {"storage": "1Gi"},
                    "accessModes": ["ReadWriteMany"],
                    "storageClassName": "bench",
                    "hostPath": {"path": f"/tmp/{volume}"},
                    "claimRef": {"namespace": namespace, "name": "models"},
                },
            }
        )
        core.create_namespaced_persistent_volume_claim(
            namespace,
            {
                "metadata": {"name": "models"},
                "spec": {
                    "accessModes": ["ReadWriteMany"],
                    "storageClassName": "bench",
                    "volumeName": volume,
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            },
        )
        core.create_namespaced_service_account(namespace, {"metadata": {"name": "finetune-trainer"}})
        while core.read_namespaced_persistent_volume_claim("models", namespace).status.phase != "Bound":
            time.sleep(0.2)


def prepare_kubeflow(api_client: ApiClient) -> None:
    """What Kubeflow's manifests give it in a cluster and its cert rotator waits for before it starts its
    controllers: its namespace, the webhook's Secret and ValidatingWebhookConfiguration. The webhook
    selects no object (no Service reaches an out-of-cluster process), so it costs no job a call."""
    core = CoreV1Api(api_client)
    core.create_namespace({"metadata": {"name": "kubeflow"}})
    core.create_namespaced_secret("kubeflow", {"metadata": {"name": "training-operator-webhook-cert"}})
    AdmissionregistrationV1Api(api_client).create_validating_webhook_configuration(
        {
            "metadata": {"name": "validator.training-operator.kubeflow.org"},
            "webhooks": [
                {
                    "name": "validator.pytorchjob.training-operator.kubeflow.org",
                    "admissionReviewVersions": ["v1"],
                    "sideEffects": "None",
                    "failurePolicy": "Ignore",
                    "clientConfig": {
                        "service": {
                            "name": "training-operator",
                            "namespace": "kubeflow",
                            "path": "/validate-kubeflow-org-v1-pytorchjob",
                        }
                    },
                    "objectSelector": {"matchLabels": {"bench.finetune.dev/never": "true"}},
                    "rules": [
                        {
                            "apiGroups": ["kubeflow.org"],
                            "apiVersions": ["v1"],
                            "operations": ["CREATE", "UPDATE"],
                            "resources": ["pytorchjobs"],
                        }
                    ],
                }
            ],
        }
    )


def job_body(operator: str, namespace: str, i: int) -> dict[str, Any]:
    name = f"job-{i}"
    if operator == "ours":
        return {
            "apiVersion": "finetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "model": {"name": "meta-llama/Llama-2-7b-hf"},
                "dataset": {"uri": "hf://tatsu-lab/alpaca", "format": "alpaca"},
                "method": {"type": "lora"},
                "resources": {"gpuType": "A100-80GB", "gpusPerNode": 8, "gpus": 16},
                "output": {"uri": "pvc://models/out"},
            },
        }
    replica = {
        "replicas": 1,
        "restartPolicy": "OnFailure",
        "template": {
            "spec": {
                "containers": [
                    {
                        "name": "pytorch",
                        "image": "pytorch/pytorch:2.4.0-cuda12.1-cudnn9-runtime",
                        "command": ["torchrun", "train.py"],
                        "resources": {"limits": {"nvidia.com/gpu": 8}},
                    }
                ]
            }
        },
    }
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"pytorchReplicaSpecs": {"Master": replica, "Worker": replica}},
    }


def create(custom: CustomObjectsApi, body: dict[str, Any]) -> float:
    group, version = body["apiVersion"].split("/")
    plural = "finetunejobs" if body["kind"] == "FineTuneJob" else "pytorchjobs"
    custom.create_namespaced_custom_object(group, version, body["metadata"]["namespace"], plural, body)
    return time.monotonic()


#: Where Kubeflow's webhook server reads its certificate (in a cluster, the Secret mounted by the kubelet).
KUBEFLOW_CERT_DIR = Path("/tmp/k8s-webhook-server/serving-certs")


def mount_kubeflow_certs(core: CoreV1Api) -> bool:
    """Play the kubelet's part for the out-of-cluster Kubeflow: write its webhook Secret, once its cert
    rotator has filled it, where the rotator waits to see it mounted (it starts no controller before)."""
    data = core.read_namespaced_secret("training-operator-webhook-cert", "kubeflow").data or {}
    if "tls.crt" not in data:
        return False
    KUBEFLOW_CERT_DIR.mkdir(parents=True, exist_ok=True)
    for key, value in data.items():
        (KUBEFLOW_CERT_DIR / key).write_bytes(base64.b64decode(value))
    return True


def memory_report(log: Path) -> str:
    """Where a BENCH_MEMORY run's report goes: PATH.ours-N, from the run's log file ours-N.log."""
    return f"{os.environ['BENCH_MEMORY']}.{log.stem}"


def write_memory_report(proc: subprocess.Popen[bytes], report: Path) -> None:
    """Ask bench/memory_holders.py for its report (SIGUSR1) and wait until it is written whole."""
    report.unlink(missing_ok=True)
    proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 600
    while not report.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"no memory report at {report}")
        time.sleep(1.0)


def start_operator(operator: str, log: Path, core: CoreV1Api) -> subprocess.Popen[bytes]:
    if operator == "ours":
        profile = (
            [str(REPO / "bench" / "profile_threads.py"), os.environ["BENCH_PROFILE"]]
            if "BENCH_PROFILE" in os.environ
            else [str(REPO / "bench" / "memory_holders.py"), memory_report(log)]
            if "BENCH_MEMORY" in os.environ
            else []
        )
        command = [
            sys.executable, *profile, "-m", "finetune_operator", "--kubeconfig", str(KUBECONFIG), "--standalone",
            "--metrics-port", "0", "--health-port", str(HEALTH_PORT),
        ]  # fmt: skip
        env = {**os.environ}
    else:
        command = [
            str(BIN / "training-operator.v1"), "--kubeconfig", str(KUBECONFIG), "--enable-scheme=pytorchjob",
            "--metrics-bind-address=0", f"--health-probe-bind-address=:{HEALTH_PORT}", "--webhook-server-port=19443",
            "--kube-api-qps=1000", "--kube-api-burst=1000", "--zap-log-level=info",
        ]  # fmt: skip
        env = {**os.environ, "MY_POD_NAMESPACE": "kubeflow"}
    with log.open("ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    path = "/healthz" if operator == "ours" else "/readyz"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{operator} exited; see {log}")
        if operator == "kubeflow":
            mount_kubeflow_certs(core)
        url = f"http://127.0.0.1:{HEALTH_PORT}{path}"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                time.sleep(3.0)  # informers listed, controllers' workers started
                return proc
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{operator} not ready in 120 s; see {log}")


def audit_mark() -> tuple[int, int]:
    """Where the audit log stands now: its file (inode) and size."""
    stat = AUDIT_LOG.stat()
    return stat.st_ino, stat.st_size


def audit_count(mark: tuple[int, int], agents: tuple[str, ...]) -> int:
    """Requests from `agents` logged since `mark`. The API server rotates its audit log at 100 MB (renamed
    to audit-TIME.log, same inode), which a run at N = 1000 can cross: the count reads on from the marked
    file, wherever it now is, through every newer one."""
    inode, offset = mark
    logs = sorted(AUDIT_LOG.parent.glob("audit*.log"), key=lambda p: p.stat().st_mtime)
    first = next(i for i, path in enumerate(logs) if path.stat().st_ino == inode)
    count = 0
    for path in logs[first:]:
        with path.open("rb") as log:
            log.seek(offset if path.stat().st_ino == inode else 0)
            for line in log:
                with contextlib.suppress(ValueError):
                    if json.loads(line).get("userAgent", "").startswith(agents):
                        count += 1
    return count


def watch_pods(core: CoreV1Api, namespace: str, clock: PodClock, stop: threading.Event) -> None:
    from kubernetes import watch

    version = core.list_namespaced_pod(namespace, _preload_content=False)
    rv = json.loads(version.data)["metadata"]["resourceVersion"]
    while not stop.is_set():
        w = watch.Watch()
        for event in w.stream(
            core.list_namespaced_pod,
            namespace,
            resource_version=rv,
            timeout_seconds=5,
            _preload_content=False,
        ):
            raw = event["raw_object"]
            rv = raw["metadata"]["resourceVersion"]
            clock.record(raw, time.monotonic())
            if stop.is_set():
                break


def one_run(api_client: ApiClient, operator: str, jobs: int, logs: Path) -> Run:
    core, custom = CoreV1Api(api_client), CustomObjectsApi(api_client)
    namespace = f"{operator}-{jobs}"
    prepare_namespace(core, namespace, operator)
    proc = start_operator(operator, logs / f"{namespace}.log", core)
    clock, stop = PodClock(JOB_LABEL[operator]), threading.Event()
    watcher = threading.Thread(target=watch_pods, args=(core, namespace, clock, stop), daemon=True)
    watcher.start()
    time.sleep(1.0)
    try:
        mark = audit_mark()
        cpu0 = proc_cpu_seconds(proc.pid)
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            created = dict(
                zip(
                    (f"job-{i}" for i in range(jobs)),
                    pool.map(lambda i: create(custom, job_body(operator, namespace, i)), range(jobs)),
                    strict=True,
                )
            )
        deadline = time.monotonic() + 600
        while sum(len(clock.running.get(j, {})) >= 2 for j in created) < jobs:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{operator} N={jobs}: not all running; see {logs}")
            time.sleep(0.2)
        cpu_busy = proc_cpu_seconds(proc.pid) - cpu0
        time.sleep(SETTLE_SECONDS)
        requests = audit_count(mark, AGENTS[operator])
        idle0, t0 = proc_cpu_seconds(proc.pid), time.monotonic()
        time.sleep(IDLE_SECONDS)
        idle = (proc_cpu_seconds(proc.pid) - idle0) / (time.monotonic() - t0) * 100
        if operator == "ours" and "BENCH_MEMORY" in os.environ:
            write_memory_report(proc, Path(memory_report(logs / f"{namespace}.log")))
        pods_created = [max(clock.seen[j].values()) - created[j] for j in created]
        running = [max(clock.running[j].values()) - created[j] for j in created]
        return Run(
            operator=operator,
            jobs=jobs,
            pods_created_p50_s=round(percentile(pods_created, 0.5), 3),
            pods_created_p99_s=round(percentile(pods_created, 0.99), 3),
            running_p99_s=round(percentile(running, 0.99), 3),
            cpu_s=round(cpu_busy, 2),
            peak_rss_mib=round(proc_rss_mib(proc.pid), 1),
            idle_rss_mib=round(proc_rss_mib(proc.pid, "VmRSS"), 1),
            idle_cpu_pct=round(idle, 2),
            api_requests_per_job=round(requests / jobs, 1),
            settings="tuned: --kube-api-qps=1000 --kube-api-burst=1000"
            if operator == "kubeflow"
            else "defaults",
        )
    finally:
        stop.set()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        subprocess.run(
            [
                str(BIN / "kubectl"),
                "--kubeconfig",
                str(KUBECONFIG),
                "delete",
                "namespace",
                namespace,
                "--timeout=600s",
            ],
            check=False,
            capture_output=True,
        )
        watcher.join(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--jobs", type=int, nargs="+", default=[50, 200, 1000], help="values of N (default: 50 200 1000)"
    )
    parser.add_argument("--operators", nargs="+", default=["kubeflow", "ours"], choices=["kubeflow", "ours"])
    parser.add_argument("--write", type=Path, help="write the results as JSON here")
    opts = parser.parse_args(argv)
    if "kubeflow" in opts.operators and not (BIN / "training-operator.v1").exists():
        parser.error(
            f"no {BIN / 'training-operator.v1'}: run `tools/build.sh {BIN} kubeflow` (make bench-operator does)"
        )
    logs = CACHE / "bench-logs"
    logs.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    with bench_cluster(2 * max(opts.jobs)) as api_client:
        prepare_kubeflow(api_client)
        for jobs in opts.jobs:
            for operator in opts.operators:
                run = one_run(api_client, operator, jobs, logs)
                print(json.dumps(asdict(run)), flush=True)
                runs.append(run)
    result = {
        "benchmark": "operator scale: apply N jobs of 2 x 8-GPU workers at once, each operator alone",
        **provenance("bench/operator_scale.py", argv),
        "nodes": 2 * max(opts.jobs),
        "runs": [asdict(r) for r in runs],
    }
    if opts.write:
        opts.write.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
