"""Start and stop the local Kubernetes control plane with fake GPU nodes.

    python tools/cluster/cluster.py up   [--name NAME] [--kubeconfig PATH] [--nodes FILE] [--crds DIR]
                                         [--real-nodes N] [--real-gpus G]
    python tools/cluster/cluster.py down [--name NAME] [--kubeconfig PATH]
    python tools/cluster/cluster.py restart [--name NAME] [--kubeconfig PATH]
    python tools/cluster/cluster.py pids [--name NAME]

`make cluster-up` / `make cluster-down` call this; so does the e2e test fixture, with its own
cluster name and kubeconfig. Every binary comes from `make tools` ($CACHE/bin, CACHE defaulting to
the repository's .cache): kwokctl runs etcd, kube-apiserver (authentication and RBAC on),
kube-controller-manager (all default controllers, so garbage collection), kube-scheduler and the
KWOK controller as local processes, with the KWOK stages in tools/cluster/stages.yaml. Then this
creates the fake GPU nodes described in tools/cluster/nodes.yaml and installs crds/*.yaml.

With --real-nodes N (root only), N real kubelet nodes join them, each advertising G fake GPUs: containers
really run there, from the images `make images` built (tools/cluster/realnode.py says how). KWOK manages
only the fake nodes (those annotated kwok.x-k8s.io/node=fake).

Nothing is downloaded. Cluster state lives under $CACHE/kwok/clusters/NAME.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import realnode
import yaml

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("CACHE", REPO / ".cache")).resolve()
BIN = CACHE / "bin"
WORKDIR = CACHE / "kwok"
DEFAULT_NAME = "finetune"
#: containerd roots of real nodes, kept across clusters (the images in them are large and slow to load) and,
#: like Go's and pip's caches and buildah's storage, across checkouts: a clean clone's CI run reuses them,
#: and the disk holds one copy (about 15 GB per node).
NODE_IMAGES = Path(
    os.environ.get("FINETUNE_NODE_IMAGES", Path.home() / ".cache" / "finetune-operator" / "containerd")
).resolve()
DEFAULT_KUBECONFIG = CACHE / "kube" / "kubeconfig"

# Which binary kwokctl gets for each of its --*-binary flags.
BINARIES = {
    "etcd": "etcd",
    "kube-apiserver": "kube-apiserver",
    "kube-controller-manager": "kube-controller-manager",
    "kube-scheduler": "kube-scheduler",
    "kwok-controller": "kwok",
}
# The GPU resource and the node labels NVIDIA GPU feature discovery sets on real nodes.
GPU_RESOURCE = "nvidia.com/gpu"
#: Fake nodes carry this annotation (value "fake"); the KWOK controller manages only those (kwokctl.yaml).
FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"
#: The `kubernetes` Service's address in the API server's default service range (10.0.0.0/24).
KUBERNETES_SERVICE_IP = "10.0.0.1"


class ClusterError(RuntimeError):
    """The cluster could not be brought up or down; the message says why."""


def log(msg: str) -> None:
    print(f"[cluster] {msg}", file=sys.stderr, flush=True)


def pinned_version(group: str, module: str) -> str:
    """The version of `module` that tools/<group>/go.mod pins, without the leading v."""
    for line in (HERE.parent / group / "go.mod").read_text().splitlines():
        words = line.replace("require ", "").split()
        if len(words) >= 2 and words[0] == module:
            return words[1].removeprefix("v")
    raise ClusterError(f"tools/{group}/go.mod does not pin {module}")


def tool_env() -> dict[str, str]:
    """Environment for kwokctl and kubectl: our builds first on PATH, state under $CACHE/kwok,
    and the versions we built, so kwokctl passes the flags those versions take."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["KWOK_WORKDIR"] = str(WORKDIR)
    env["KWOK_KUBE_VERSION"] = pinned_version("k8s", "k8s.io/kubernetes")
    env["KWOK_ETCD_VERSION"] = pinned_version("etcd", "go.etcd.io/etcd/server/v3")
    return env


def run(args: list[str], *, stdin: str | None = None, timeout: float = 300) -> str:
    """Run a tool; raise ClusterError with its output when it fails."""
    proc = subprocess.run(
        args,
        input=stdin,
        capture_output=True,
        text=True,
        env=tool_env(),
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise ClusterError(
            f"{' '.join(args[:4])} ... exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc.stdout


def cluster_dir(name: str) -> Path:
    return WORKDIR / "clusters" / name


def render_nodes(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Node objects for each pool in a nodes file (see tools/cluster/nodes.yaml)."""
    nodes = []
    for pool in spec["pools"]:
        gpus = int(pool["gpusPerNode"])
        resources = {
            "cpu": str(pool.get("cpu", "96")),
            "memory": str(pool.get("memory", "1Ti")),
            "pods": str(pool.get("pods", 110)),
            "ephemeral-storage": str(pool.get("ephemeralStorage", "10Ti")),
        }
        labels = {"type": "kwok", "finetune.dev/pool": pool["name"]}
        if gpus:
            resources[GPU_RESOURCE] = str(gpus)
            labels |= {
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": pool["product"],
                "nvidia.com/gpu.memory": str(int(pool["memoryMiB"])),
                "nvidia.com/gpu.count": str(gpus),
            }
        for i in range(int(pool["count"])):
            name = f"{pool['name']}-{i}"
            nodes.append(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "annotations": {FAKE_NODE_ANNOTATION: "fake"},
                        "labels": labels
                        | {
                            "kubernetes.io/hostname": name,
                            "kubernetes.io/os": "linux",
                            "kubernetes.io/arch": "amd64",
                        },
                    },
                    "spec": {},
                    "status": {"capacity": resources, "allocatable": resources},
                }
            )
    return nodes


def alive(pid: int) -> bool:
    """Whether the process exists and has not finished exiting (a zombie or dead task is done)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def cluster_pids(name: str, under: str = "") -> list[int]:
    """Live processes of this cluster: kwokctl's pid files, and any process whose command line
    names the cluster's state directory (kwokctl starts every component that way, and so does
    realnode.py, under `nodes/`); with `under`, only those naming that subdirectory."""
    marker = f"{cluster_dir(name)}/{under}".encode()
    pids = set()
    for pidfile in (cluster_dir(name) / "pids").glob("*.pid"):
        try:
            pid = int(pidfile.read_text().strip())
            if marker in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.add(pid)
        except (OSError, ValueError):
            continue
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker in (proc / "cmdline").read_bytes():
                pids.add(int(proc.name))
        except OSError:
            continue
    return sorted(pid for pid in pids if alive(pid))


def kubectl(kubeconfig: Path, *args: str, stdin: str | None = None, timeout: float = 120) -> str:
    return run([str(BIN / "kubectl"), "--kubeconfig", str(kubeconfig), *args], stdin=stdin, timeout=timeout)


def kwokctl_config(name: str, net: realnode.Network | None) -> Path:
    """kwokctl's options for this cluster: tools/cluster/kwokctl.yaml, or with real nodes an API server
    whose certificate also names the `kubernetes` Service's ClusterIP and the address nodes reach it at
    (realnode.py forwards that address to the loopback one)."""
    if net is None:
        return HERE / "kwokctl.yaml"
    conf = yaml.safe_load((HERE / "kwokctl.yaml").read_text())
    conf["options"]["kubeApiserverCertSANs"] = [KUBERNETES_SERVICE_IP, net.api_address]
    # The `kubernetes` Service's endpoint, which pods reach through kube-proxy.
    apiserver = next(p for p in conf["componentsPatches"] if p["name"] == "kube-apiserver")
    apiserver["extraArgs"].append({"key": "advertise-address", "value": net.api_address})
    path = CACHE / "kube" / f"{name}.kwokctl.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(conf))
    return path


def up(
    name: str,
    kubeconfig: Path,
    nodes_file: Path,
    crds_dir: Path,
    real_nodes: int = 0,
    real_gpus: int = 2,
    audit_policy: Path | None = None,
) -> None:
    binaries = [*BINARIES.values(), "kwokctl", "kubectl"]
    if real_nodes:
        binaries += ["kubelet", "kube-proxy", "coredns"]
    missing = [b for b in binaries if not (BIN / b).exists()]
    if missing:
        raise ClusterError(f"missing {', '.join(missing)} in {BIN}: run `make tools` first")
    nodes = render_nodes(yaml.safe_load(nodes_file.read_text()))
    if cluster_dir(name).exists():
        log(f"cluster {name} exists; deleting it to start fresh")
        down(name, kubeconfig)
    kubeconfig.parent.mkdir(parents=True, exist_ok=True)
    kubeconfig.unlink(missing_ok=True)

    start = time.monotonic()
    net = realnode.Network.for_cluster(name) if real_nodes else None
    log(f"starting control plane {name} (state in {cluster_dir(name)})")
    args = [str(BIN / "kwokctl"), "--name", name, "--config", str(kwokctl_config(name, net))]
    args += ["--config", str(HERE / "stages.yaml")]
    args += ["create", "cluster", "--runtime", "binary", "--quiet-pull"]
    args += [f"--{flag}-binary={BIN / binary}" for flag, binary in BINARIES.items()]
    args += ["--secure-port=true", "--kube-authorization=true", "--kube-admission=true"]
    args += ["--kubeconfig", str(kubeconfig), "--wait", "120s", "--timeout", "180s"]
    if audit_policy is not None:  # the API server's audit log: logs/audit.log in the cluster's directory
        args += ["--kube-audit-policy", str(audit_policy.resolve())]
    try:
        if net is not None:
            realnode.prepare_network(net, log)
        run(args, timeout=240)
    except (ClusterError, realnode.NodeError, subprocess.TimeoutExpired) as err:
        logs = cluster_dir(name) / "logs"
        tails = (
            "".join(
                f"\n--- {f.name} (tail)\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:])
                for f in sorted(logs.glob("*.log"))
            )
            if logs.exists()
            else ""
        )
        down(name, kubeconfig)
        raise ClusterError(f"kwokctl could not start cluster {name}: {err}{tails}") from err

    try:
        populate(name, kubeconfig, nodes, nodes_file, crds_dir, net, real_nodes, real_gpus)
    except BaseException as err:  # a known failure, a bug or ^C: never a half-made cluster left running
        down(name, kubeconfig)
        if isinstance(err, (ClusterError, realnode.NodeError, subprocess.TimeoutExpired)):
            raise ClusterError(f"cluster {name} did not come up: {err}") from err
        raise
    log(f"cluster {name} ready in {time.monotonic() - start:.1f}s with {len(nodes)} nodes")
    print(f"export KUBECONFIG={kubeconfig}")


def populate(
    name: str,
    kubeconfig: Path,
    nodes: list[dict[str, Any]],
    nodes_file: Path,
    crds_dir: Path,
    net: realnode.Network | None,
    real_nodes: int,
    real_gpus: int,
) -> None:
    """The nodes, CRDs and real nodes of a started control plane; returns once every node is schedulable.
    Raises ClusterError, realnode.NodeError or TimeoutExpired, which `up` reports as one ClusterError."""
    log(f"creating {len(nodes)} fake nodes from {nodes_file}")
    kubectl(
        kubeconfig, "apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": nodes})
    )
    crds = sorted(crds_dir.glob("*.yaml"))
    if crds:
        log(f"installing {len(crds)} CRD file(s) from {crds_dir}")
        kubectl(kubeconfig, "apply", "--server-side", *[a for c in crds for a in ("-f", str(c))])
        wait_established(kubeconfig)
    if net is not None:
        names = realnode.start(
            cluster_dir(name),
            net,
            count=real_nodes,
            gpus=real_gpus,
            kubeconfig=kubeconfig,
            bin_dir=BIN,
            kubectl=lambda *a: kubectl(kubeconfig, *a),
            log=log,
            images_dir=NODE_IMAGES,
        )
        log(f"real nodes {', '.join(names)} joined ({real_gpus} fake GPUs each, {realnode.GPU_PRODUCT})")
    wait_schedulable(kubeconfig, len(nodes) + real_nodes)

    def has_default_account() -> bool:  # pods can be created only once the controller made it
        try:
            kubectl(kubeconfig, "get", "serviceaccount", "default", "-n", "default", "-o", "name")
        except ClusterError:
            return False
        return True

    realnode.wait_for("the default service account", has_default_account, 60, interval=0.5)


def wait_established(kubeconfig: Path, timeout: float = 60) -> None:
    """Until every CRD is Established. (`kubectl wait --for=condition=Established` fails at once on a CRD
    the API server has not given a status yet, a race a busy control plane loses.)"""
    waiting: list[str] = []

    def established() -> bool:
        crds = json.loads(kubectl(kubeconfig, "get", "crd", "-o", "json"))["items"]
        waiting[:] = [c["metadata"]["name"] for c in crds if not has_condition(c, "Established")]
        return not waiting

    realnode.wait_for(lambda: f"CRDs {', '.join(waiting)}", established, timeout, interval=0.5)


def has_condition(obj: dict[str, Any], kind: str) -> bool:
    """Whether `obj` has condition `kind` with status True."""
    return any(
        c.get("type") == kind and c.get("status") == "True"
        for c in (obj.get("status") or {}).get("conditions") or []  # null until the server first sets it
    )


#: Taints the node lifecycle controller keeps on a node until it has seen it Ready: the scheduler places
#: nothing there yet, so "Ready" alone is not "ready for pods".
NOT_YET_SCHEDULABLE = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")


def wait_schedulable(kubeconfig: Path, count: int) -> None:
    """Until `count` nodes are Ready and none carries a not-ready or unreachable taint; the time allowed
    grows with the node count (the node controller untaints a node with two requests; see kwokctl.yaml)."""
    listed: list[dict[str, Any]] = []
    waiting: list[str] = []

    def all_schedulable() -> bool:
        listed[:] = json.loads(kubectl(kubeconfig, "get", "nodes", "-o", "json", timeout=120))["items"]
        waiting[:] = [n["metadata"]["name"] for n in listed if not schedulable(n)]
        return len(listed) >= count and not waiting

    def unschedulable() -> str:
        return (
            f"{len(waiting)} of {len(listed)} listed nodes (e.g. {', '.join(waiting[:5])}; {count} expected)"
        )

    realnode.wait_for(unschedulable, all_schedulable, 120 + count / 10, interval=1)


def schedulable(node: dict[str, Any]) -> bool:
    taints = {t.get("key") for t in node.get("spec", {}).get("taints", [])}
    return has_condition(node, "Ready") and not taints & set(NOT_YET_SCHEDULABLE)


def down(name: str, kubeconfig: Path) -> None:
    """Delete the cluster and wait until none of its processes is left; with real nodes, first their
    containers, then mounts, cgroups and the network namespace."""
    net = realnode.Network.for_cluster(name)
    if net.netns_path.exists() or realnode.node_cgroups(name):
        realnode.stop(
            cluster_dir(name), net, NODE_IMAGES, lambda: stop_pids(name, set(cluster_pids(name, "nodes/")))
        )
    pids = set(cluster_pids(name))
    if cluster_dir(name).exists():
        try:
            run(
                [str(BIN / "kwokctl"), "--name", name, "delete", "cluster", "--kubeconfig", str(kubeconfig)],
                timeout=120,
            )
        except (ClusterError, subprocess.TimeoutExpired) as err:
            log(f"kwokctl delete failed, stopping the processes ourselves: {err}")
    stop_pids(name, pids)
    if cluster_dir(name).exists():
        subprocess.run(["rm", "-rf", str(cluster_dir(name))], check=False)
    kubeconfig.unlink(missing_ok=True)
    log(f"cluster {name} is down")


def restart(name: str, kubeconfig: Path) -> None:
    """Stop the control plane (etcd, kube-apiserver, the controllers, the KWOK controller) and start it
    again on the same state, then wait until the API server is ready: what a control-plane upgrade or a
    crashed API server does to clients. The e2e tests restart it under a running operator."""
    if not cluster_dir(name).exists():
        raise ClusterError(f"cluster {name} does not exist")
    start = time.monotonic()
    plane = {
        int(f.read_text().strip())
        for f in (cluster_dir(name) / "pids").glob("*.pid")
        if f.read_text().strip()
    }
    run([str(BIN / "kwokctl"), "--name", name, "stop", "cluster"], timeout=60)
    deadline = time.monotonic() + 15  # kwokctl signals the processes and does not wait for them
    while [p for p in plane if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.05)
    run([str(BIN / "kwokctl"), "--name", name, "start", "cluster"], timeout=120)
    deadline = time.monotonic() + 60
    while True:
        try:
            kubectl(kubeconfig, "get", "--raw", "/readyz", timeout=10)
            break
        except (ClusterError, subprocess.TimeoutExpired):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    log(f"control plane of {name} restarted in {time.monotonic() - start:.1f}s")


def stop_pids(name: str, pids: set[int]) -> None:
    """Wait for the processes to end (SIGTERM first if kwokctl did not stop them), then SIGKILL."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    # kwokctl sends SIGKILL and does not wait; a process is gone once it is no longer alive
    # (while exiting, its command line is already empty, so wait on the pids seen before).
    deadline = time.monotonic() + 15
    while (left := [p for p in pids if alive(p)] + cluster_pids(name)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in sorted(set(left)):
        log(f"process {pid} of cluster {name} still running; killing it")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while (left := [p for p in pids if alive(p)] + cluster_pids(name)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        raise ClusterError(f"processes {sorted(set(left))} of cluster {name} did not exit")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["up", "down", "restart", "pids"])
    parser.add_argument("--name", default=DEFAULT_NAME, help="cluster name (default: %(default)s)")
    parser.add_argument("--kubeconfig", type=Path, default=DEFAULT_KUBECONFIG, help="kubeconfig to write")
    parser.add_argument("--nodes", type=Path, default=HERE / "nodes.yaml", help="fake node pools")
    parser.add_argument("--crds", type=Path, default=REPO / "crds", help="directory of CRD YAML files")
    parser.add_argument("--real-nodes", type=int, default=0, help="real kubelet nodes (default: %(default)s)")
    parser.add_argument(
        "--real-gpus", type=int, default=2, help="fake GPUs per real node (default: %(default)s)"
    )
    parser.add_argument(
        "--audit-policy", type=Path, help="audit policy file: the API server logs requests to logs/audit.log"
    )
    opts = parser.parse_args(argv)
    try:
        if opts.command == "up":
            up(
                opts.name,
                opts.kubeconfig.resolve(),
                opts.nodes,
                opts.crds,
                opts.real_nodes,
                opts.real_gpus,
                opts.audit_policy,
            )
        elif opts.command == "down":
            down(opts.name, opts.kubeconfig.resolve())
        elif opts.command == "restart":
            restart(opts.name, opts.kubeconfig.resolve())
        else:
            print(" ".join(map(str, cluster_pids(opts.name))))
    except (ClusterError, realnode.NodeError) as err:
        print(f"[cluster] error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
