"""Real kubelet nodes for the local cluster: containers really run, next to the KWOK fake GPU nodes.

`cluster.py up --real-nodes N` calls `prepare_network` before the control plane starts (the API server
must serve on an address the nodes can reach, with that address in its certificate) and `start` after.
Every part runs as a local process in one network namespace made for the cluster:

    host netns                            cluster netns  finetune-<cluster>
    kube-apiserver on 127.0.0.1,
      forwarded from 10.K.255.1   <-veth->  10.K.255.2 uplink
    route 10.K.0.0/16 via the veth          lo: 10.K.0.10 (CoreDNS), 10.K.0.1i (node i)
                                            bridge ftK-i 10.K.i.0/24 per node: its pods
                                            kube-proxy (iptables: ClusterIP Services such as
                                            kubernetes.default), CoreDNS, and per node a kubelet
                                            with its own containerd (root, state, socket, runc root,
                                            cgroup root), as two kubelets on one containerd would
                                            delete each other's pods.

The API server reaches kubelets (logs, exec) and admission webhooks in pods (it routes to a Service's
endpoints, --enable-aggregator-routing) through the host route. Nodes advertise `nvidia.com/gpu`
(a status patch, the documented way to advertise an extended resource) and the labels GPU feature
discovery sets, so the operator's pods land on them; no device plugin runs, so no GPU is visible inside.
Nothing is pulled: the sandbox (pause) image and the project's images come from buildah's storage
(`make images`). `stop` ends every process by cgroup and PID, unmounts, and removes cgroups and netns.

For a development machine only: kubelets, kube-proxy and CoreDNS use the admin kubeconfig, and a kubelet
serves anyone who reaches its address (only this host and the cluster's pods can).

Settings that were hard failures until set are marked "required" (../shared/reference/real-nodes.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

CNI_BIN = Path("/usr/lib/cni")
NETNS_DIR = Path("/var/run/netns")
CGROUP_V1 = Path("/sys/fs/cgroup")
#: Images the nodes get from buildah's storage when they exist (tools/images/build.sh names them).
PAUSE_IMAGE = "localhost/finetune/pause:local"
TRAINER_IMAGE = "localhost/finetune/trainer:dev"
PROJECT_IMAGES = (TRAINER_IMAGE, "localhost/finetune/operator:dev")
#: What a real node advertises: fake GPUs of a product no fake pool has, so a job asking for it lands here.
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT = "NVIDIA-L4"
GPU_MEMORY_MIB = 23034
#: Host tools a real node needs, and the Debian package of each (tools/cluster/install-node-deps.sh).
HOST_TOOLS = {
    "containerd": "containerd",
    "containerd-shim-runc-v2": "containerd",
    "ctr": "containerd",
    "runc": "runc",
    "nsenter": "util-linux",
    "iptables": "iptables",
    "buildah": "buildah",
    "socat": "socat",
}

Log = Callable[[str], None]


class NodeError(RuntimeError):
    """A real node could not be started or stopped; the message says why."""


@dataclass(frozen=True)
class Network:
    """The cluster's addresses: 10.K.0.0/16 with K from the cluster's name, so two clusters coexist."""

    cluster: str
    octet: int

    @classmethod
    def for_cluster(cls, cluster: str) -> Network:
        return cls(cluster, 200 + zlib.crc32(cluster.encode()) % 50)

    @property
    def netns(self) -> str:
        return f"finetune-{self.cluster}"

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns

    @property
    def host_veth(self) -> str:
        return f"ft{self.octet}host"

    @property
    def api_address(self) -> str:
        """The host end of the veth: the API server's advertised address, forwarded to its loopback one
        (kwokctl's components reach it at 127.0.0.1; etcd and the rest stay on loopback)."""
        return f"10.{self.octet}.255.1"

    @property
    def uplink_address(self) -> str:
        return f"10.{self.octet}.255.2"

    @property
    def dns_address(self) -> str:
        return f"10.{self.octet}.0.10"

    @property
    def pod_cidr(self) -> str:
        return f"10.{self.octet}.0.0/16"

    def node_address(self, index: int) -> str:
        return f"10.{self.octet}.0.{10 + index}"

    def node_subnet(self, index: int) -> str:
        return f"10.{self.octet}.{index}.0/24"

    def bridge(self, index: int) -> str:
        return f"ft{self.octet}br{index}"


def node_name(index: int) -> str:
    return f"real-{index}"


def sh(args: list[str], *, netns: Network | None = None, check: bool = True, **kw: object) -> str:
    """Run a command (inside the cluster's netns with `netns`); raise NodeError with its output."""
    if netns is not None:
        args = ["nsenter", f"--net={netns.netns_path}", "--", *args]
    proc = subprocess.run(args, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        raise NodeError(
            f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}"
        )
    return str(proc.stdout)


def missing_tools() -> list[str]:
    """Debian packages to install before real nodes can run (empty when all are there)."""
    packages = {pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None}
    if not (CNI_BIN / "bridge").exists():
        packages.add("containernetworking-plugins")
    return sorted(packages)


def prepare_network(net: Network, log: Log) -> None:
    """The netns, the veth to the host, and the host's route to the cluster's pods and nodes. Made before
    the control plane so that its certificate names the API address and it can bind there."""
    if os.geteuid() != 0:
        raise NodeError("real nodes need root (network namespaces, mounts, cgroups)")
    if missing := missing_tools():
        raise NodeError(f"missing host packages {', '.join(missing)}: run tools/cluster/install-node-deps.sh")
    teardown_network(net)
    others = [ns.name for ns in NETNS_DIR.glob("finetune-*")] if NETNS_DIR.exists() else []
    if others:
        # The nodes' containerd roots (the images) are shared by every cluster on this machine.
        raise NodeError(f"another cluster with real nodes is running ({', '.join(others)}): stop it first")
    taken = sh(["ip", "-4", "route", "show", "root", net.pod_cidr])
    if taken.strip():
        raise NodeError(
            f"{net.pod_cidr} is already routed on this host ({taken.strip()}); pick another --name"
        )
    log(f"network namespace {net.netns}: API at {net.api_address}, pods in {net.pod_cidr}")
    sh(["ip", "netns", "add", net.netns])
    sh(["ip", "link", "add", net.host_veth, "type", "veth", "peer", "name", "uplink", "netns", net.netns])
    sh(["ip", "addr", "add", f"{net.api_address}/30", "dev", net.host_veth])
    sh(["ip", "link", "set", net.host_veth, "up"])
    sh(["ip", "route", "add", net.pod_cidr, "via", net.uplink_address])
    sh(["ip", "link", "set", "lo", "up"], netns=net)
    sh(["ip", "addr", "add", f"{net.uplink_address}/30", "dev", "uplink"], netns=net)
    sh(["ip", "link", "set", "uplink", "up"], netns=net)
    # Node and DNS addresses are /32s on lo (a node IP may not be loopback, and there is no dummy netdev).
    sh(["ip", "addr", "add", f"{net.dns_address}/32", "dev", "lo"], netns=net)
    sh(["sysctl", "-qw", "net.ipv4.ip_forward=1"], netns=net)


def teardown_network(net: Network) -> None:
    """Delete the netns (its veth end, bridges and iptables go with it) and the host end of the veth."""
    sh(["ip", "link", "del", net.host_veth], check=False)
    if net.netns_path.exists():
        sh(["ip", "netns", "del", net.netns], check=False)


@dataclass(frozen=True)
class Node:
    """One real node's files and addresses. Everything lives under the cluster's state directory but
    containerd's root (images and snapshots): that stays across clusters (cluster.py's NODE_IMAGES), so
    the trainer image (gigabytes) is loaded again only when it changed."""

    net: Network
    index: int
    gpus: int
    root: Path
    images: Path

    @property
    def name(self) -> str:
        return node_name(self.index)

    @property
    def address(self) -> str:
        return self.net.node_address(self.index)

    @property
    def socket(self) -> Path:
        return self.root / "containerd.sock"

    @property
    def cgroup_root(self) -> str:
        return f"finetune-{self.net.cluster}-{self.name}"


def containerd_config(node: Node) -> str:
    """containerd 1.6 (config version 2) for one node: its own root, state, socket and runc root."""
    r = node.root
    return f"""version = 2
root = "{node.images}"
state = "{r}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{node.socket}"
[ttrpc]
  address = "{r}/containerd-ttrpc.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{r}/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # required: the sandbox's root lacks CAP_SYS_RESOURCE; without this runc fails every pod sandbox
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{r}/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{r}/runc"
        SystemdCgroup = false
"""


def cni_config(node: Node) -> dict[str, object]:
    """A bridge per node with its own subnet; pods route everything through it (gateway) to the netns."""
    return {
        "cniVersion": "1.0.0",
        "name": f"finetune-{node.name}",
        "plugins": [
            {
                "type": "bridge",
                "bridge": node.net.bridge(node.index),
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(node.root / "ipam"),
                    "ranges": [[{"subnet": node.net.node_subnet(node.index)}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "loopback"},
        ],
    }


def kubelet_config(node: Node) -> dict[str, object]:
    r = node.root
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "failCgroupV1": False,  # required on this machine's cgroup v1 from Kubernetes 1.35
        "cgroupDriver": "cgroupfs",  # required: no systemd
        "failSwapOn": False,  # required
        "cgroupRoot": f"/{node.cgroup_root}",  # required with two kubelets on one machine
        "address": node.address,
        "healthzBindAddress": node.address,
        "readOnlyPort": 0,
        "containerRuntimeEndpoint": f"unix://{node.socket}",
        "podLogsDir": str(r / "pod-logs"),
        "volumePluginDir": str(r / "volume-plugins"),
        "clusterDNS": [node.net.dns_address],
        "clusterDomain": "cluster.local",
        "resolvConf": str(r / "resolv.conf"),
        # Local use: the API server's kubelet client presents no certificate the kubelet could check.
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        # A development disk is often fuller than a node's: never evict or delete the project's images.
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "runtimeRequestTimeout": "15m",
        "serializeImagePulls": False,
        "maxPods": 110,
    }


def node_labels(node: Node) -> dict[str, str]:
    """The labels NVIDIA GPU feature discovery puts on a GPU node (what the placement presets select)."""
    return {
        "finetune.dev/pool": "real",
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": GPU_PRODUCT,
        "nvidia.com/gpu.memory": str(GPU_MEMORY_MIB),
        "nvidia.com/gpu.count": str(node.gpus),
    }


def corefile(net: Network, kubeconfig: Path) -> str:
    return f""".:53 {{
    bind {net.dns_address}
    errors
    cache 30
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
}}
"""


def kube_proxy_config(net: Network, kubeconfig: Path) -> dict[str, object]:
    address = net.node_address(1)
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": node_name(1),
        "clusterCIDR": net.pod_cidr,
        "bindAddress": address,
        "healthzBindAddress": f"{address}:10256",
        "metricsBindAddress": f"{address}:10249",
        # The netns shares the host's conntrack table size; leave the host's sysctls alone.
        "conntrack": {"maxPerCore": 0, "min": 0},
    }


class Processes:
    """Processes started for the cluster: detached, logged under logs/, pid files under pids/ (which
    cluster.py's `cluster_pids` reads), each command line naming the cluster's directory."""

    def __init__(self, cluster_dir: Path, net: Network) -> None:
        self.cluster_dir = cluster_dir
        self.net = net
        (self.cluster_dir / "logs").mkdir(parents=True, exist_ok=True)
        (self.cluster_dir / "pids").mkdir(parents=True, exist_ok=True)

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        with open(self.cluster_dir / "logs" / f"{name}.log", "ab") as out:
            # required: nsenter, not `ip netns exec`, which remounts /sys and hides the cgroups
            proc = subprocess.Popen(
                ["nsenter", f"--net={self.net.netns_path}", "--", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        (self.cluster_dir / "pids" / f"{name}.pid").write_text(str(proc.pid))
        return proc


def wait_for(
    what: str | Callable[[], str],
    ready: Callable[[], bool],
    timeout: float,
    log_file: Path | None = None,
    interval: float = 0.2,
) -> None:
    """Poll `ready` until it holds; past `timeout`, a NodeError naming `what` (a callable when the name
    depends on what the last poll saw, such as the objects still waited on) and the log's tail."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            tail = ""
            if log_file is not None and log_file.exists():
                tail = "\n" + "\n".join(log_file.read_text(errors="replace").splitlines()[-20:])
            name = what() if callable(what) else what
            raise NodeError(f"{name} not ready after {timeout:.0f}s{tail}")
        time.sleep(interval)


def buildah_has(image: str) -> bool:
    return (
        subprocess.run(["buildah", "inspect", "--type", "image", image], capture_output=True).returncode == 0
    )


def ctr(node: Node, *args: str, check: bool = True) -> str:
    return sh(["ctr", "--address", str(node.socket), "-n", "k8s.io", *args], check=check)


def has_image(node: Node, image: str) -> bool:
    return image in ctr(node, "images", "ls", "-q").split()


def load_image(nodes: list[Node], image: str, image_id: str) -> list[Node]:
    """Stream an image from buildah's storage into the nodes' containerd (no archive on disk; one push
    feeds every node), skipping nodes that loaded the same image ID before; the nodes it loaded."""
    todo = [node for node in nodes if loaded_id(node, image) != image_id or not has_image(node, image)]
    if not todo:
        return []
    for node in todo:  # an older build under the same name: its content and snapshots go first
        if has_image(node, image):
            ctr(node, "images", "rm", "--sync", image)
    push = subprocess.Popen(
        ["buildah", "push", "--quiet", image, f"docker-archive:/dev/stdout:{image}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    loads = [
        subprocess.Popen(
            ["ctr", "--address", str(node.socket), "-n", "k8s.io", "images", "import", "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for node in todo
    ]
    assert push.stdout is not None
    while chunk := push.stdout.read(1 << 20):
        for load in loads:
            assert load.stdin is not None
            load.stdin.write(chunk)
    errors = [push.communicate()[1].decode(errors="replace").strip()] if push.wait() else []
    for node, load in zip(todo, loads, strict=True):
        out = load.communicate()[0].decode(errors="replace").strip()
        if load.returncode:
            errors.append(f"{node.name}: {out}")
        else:
            loaded_marker(node, image).parent.mkdir(parents=True, exist_ok=True)
            loaded_marker(node, image).write_text(image_id)
    if errors:
        raise NodeError(f"loading {image} failed: {'; '.join(errors)}")
    return todo


def loaded_marker(node: Node, image: str) -> Path:
    """Where a node records the ID of the image it loaded under that name."""
    return node.images / "loaded" / image.replace("/", "_").replace(":", "_")


def loaded_id(node: Node, image: str) -> str | None:
    marker = loaded_marker(node, image)
    return marker.read_text() if marker.exists() else None


def project_images() -> dict[str, str]:
    """Image name -> ID of the sandbox image and the project images buildah has."""
    if not buildah_has(PAUSE_IMAGE):
        raise NodeError(f"no {PAUSE_IMAGE} in buildah's storage: run `make images` first")
    return {
        image: sh(["buildah", "inspect", "--type", "image", "--format", "{{.FromImageID}}", image]).strip()
        for image in [PAUSE_IMAGE, *PROJECT_IMAGES]
        if buildah_has(image)
    }


def drop_stale_images(node: Node, images: dict[str, str], log: Log) -> None:
    """Start a node's containerd root afresh when the trainer image it holds was rebuilt: it is loaded
    whole anyway (a few minutes), and containerd did not reliably give back the old trainer's snapshots
    (two generations of it filled this machine's disk). Any other rebuilt image (the operator, with every
    operator change) is replaced in place by `load_image`, so the trainer is not streamed in again."""
    built = images.get(TRAINER_IMAGE)
    if built and loaded_id(node, TRAINER_IMAGE) not in (None, built) and node.images.exists():
        log(f"{node.name}: {TRAINER_IMAGE} changed; starting its image store afresh")
        shutil.rmtree(node.images)


def load_images(nodes: list[Node], images: dict[str, str], log: Log) -> None:
    """The sandbox image and whichever project images buildah has, into every node that lacks them; then
    each node keeps only their unpacked snapshots (`discard_layers`), loaded now or before."""
    for image, image_id in images.items():
        started = time.monotonic()
        if loaded := load_image(nodes, image, image_id):
            names = ", ".join(node.name for node in loaded)
            log(f"loaded {image} into {names} in {time.monotonic() - started:.0f}s")
    for node in nodes:
        if freed := discard_layers(node, list(images)):
            log(f"{node.name}: discarded {freed / 2**30:.1f} GiB of unpacked layer blobs")


def discard_layers(node: Node, images: list[str]) -> int:
    """Remove the layer blobs of `images` from the node's content store once they are unpacked: containers
    run from the snapshots, and the blobs were a second copy of every image (7 GB of the trainer's, per
    node). What containerd's CRI does for pulls with `discard_unpacked_layers`; the manifest and config
    stay, so the kubelet still lists the image. A blob goes only where its image is unpacked; the bytes freed."""
    # `images check` columns: REF TYPE DIGEST STATUS SIZE UNPACKED (STATUS and SIZE hold spaces)
    checked = [line.split() for line in ctr(node, "images", "check").splitlines()[1:]]
    manifests = {row[0]: row[2] for row in checked if row[-1] == "true"}
    blobs = set(ctr(node, "content", "ls", "-q").split())
    layers: dict[str, int] = {}
    for image in images:
        if image not in manifests:
            continue
        manifest = json.loads(ctr(node, "content", "get", manifests[image]))
        layers.update(
            (layer["digest"], layer["size"]) for layer in manifest["layers"] if layer["digest"] in blobs
        )
    if layers:
        ctr(node, "content", "rm", *layers)
    return sum(layers.values())


def make_cgroup_root(node: Node) -> None:
    """The kubelet's cgroupRoot must exist in every hierarchy (a v1 cpuset starts empty: copy the parent's)."""
    for hierarchy in CGROUP_V1.iterdir():
        if not (hierarchy / "cgroup.procs").exists():
            continue
        path = hierarchy / node.cgroup_root
        path.mkdir(exist_ok=True)
        for name in ("cpuset.cpus", "cpuset.mems"):
            if (path / name).exists() and not (path / name).read_text().strip():
                (path / name).write_text((hierarchy / name).read_text())


def forward_api(procs: Processes, kubeconfig: Path, nodes_dir: Path) -> Path:
    """Forward the API address on the veth to the API server's loopback port; return a kubeconfig for the
    nodes' processes that uses it."""
    conf = yaml.safe_load(kubeconfig.read_text())
    server = conf["clusters"][0]["cluster"]["server"]
    port = int(server.rsplit(":", 1)[1])
    lock = nodes_dir / "api-forward.lock"
    lock.unlink(missing_ok=True)
    out = open(procs.cluster_dir / "logs" / "api-forward.log", "ab")  # noqa: SIM115 (the child keeps it)
    proxy = subprocess.Popen(
        # -L: the lock file's path names the cluster's directory, as cluster.py's process search needs
        [
            "socat",
            "-L",
            str(lock),
            f"TCP-LISTEN:{port},bind={procs.net.api_address},fork,reuseaddr",
            f"TCP:127.0.0.1:{port}",
        ],
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    out.close()
    (procs.cluster_dir / "pids" / "api-forward.pid").write_text(str(proxy.pid))
    for cluster in conf["clusters"]:
        cluster["cluster"]["server"] = f"https://{procs.net.api_address}:{port}"
    path = nodes_dir / "kubeconfig"
    path.write_text(yaml.safe_dump(conf))
    return path


def start(
    cluster_dir: Path,
    net: Network,
    *,
    count: int,
    gpus: int,
    kubeconfig: Path,
    bin_dir: Path,
    kubectl: Callable[..., str],
    log: Log,
    images_dir: Path,
) -> list[str]:
    """Start CoreDNS, kube-proxy and `count` real nodes; wait until they are Ready with their GPUs."""
    procs = Processes(cluster_dir, net)
    nodes_dir = cluster_dir / "nodes"
    dns_dir = nodes_dir / "dns"
    dns_dir.mkdir(parents=True, exist_ok=True)
    kubeconfig = forward_api(procs, kubeconfig, nodes_dir)
    (dns_dir / "Corefile").write_text(corefile(net, kubeconfig))
    procs.start("coredns", [str(bin_dir / "coredns"), "-conf", str(dns_dir / "Corefile")])
    (dns_dir / "kube-proxy.yaml").write_text(yaml.safe_dump(kube_proxy_config(net, kubeconfig)))
    sh(["ip", "addr", "add", f"{net.node_address(1)}/32", "dev", "lo"], netns=net, check=False)
    procs.start("kube-proxy", [str(bin_dir / "kube-proxy"), "--config", str(dns_dir / "kube-proxy.yaml")])

    nodes = all_nodes(cluster_dir, net, images_dir, count, gpus)
    images = project_images()
    for node in nodes:
        drop_stale_images(node, images, log)
    for node in nodes:
        for sub in ("net.d", "ipam", "pod-logs", "volume-plugins", "kubelet"):
            (node.root / sub).mkdir(parents=True, exist_ok=True)
        (node.root / "containerd.toml").write_text(containerd_config(node))
        (node.root / "net.d" / "10-bridge.conflist").write_text(json.dumps(cni_config(node), indent=2))
        (node.root / "kubelet.yaml").write_text(yaml.safe_dump(kubelet_config(node)))
        (node.root / "resolv.conf").write_text("")
        sh(["ip", "addr", "add", f"{node.address}/32", "dev", "lo"], netns=net, check=False)
        procs.start(f"containerd-{node.name}", ["containerd", "--config", str(node.root / "containerd.toml")])
    for node in nodes:
        wait_for(
            f"containerd of {node.name}",
            node.socket.exists,
            30,
            cluster_dir / "logs" / f"containerd-{node.name}.log",
        )
    load_images(nodes, images, log)
    for node in nodes:
        make_cgroup_root(node)
        labels = ",".join(f"{k}={v}" for k, v in node_labels(node).items())
        procs.start(
            f"kubelet-{node.name}",
            [
                str(bin_dir / "kubelet"),
                f"--config={node.root / 'kubelet.yaml'}",
                f"--kubeconfig={kubeconfig}",
                f"--root-dir={node.root / 'kubelet'}",
                f"--hostname-override={node.name}",
                f"--node-ip={node.address}",
                f"--node-labels={labels}",
            ],
        )
    for node in nodes:

        def registered(name: str = node.name) -> bool:
            try:
                kubectl("get", "node", name, "-o", "name")
            except Exception:
                return False
            return True

        wait_for(f"node {node.name}", registered, 60, cluster_dir / "logs" / f"kubelet-{node.name}.log")
        capacity = {"status": {"capacity": {GPU_RESOURCE: str(node.gpus)}}}
        kubectl(
            "patch", "node", node.name, "--subresource=status", "--type=merge", "-p", json.dumps(capacity)
        )
    for node in nodes:
        # The kubelet copies capacity to allocatable at its next status update (about 10 s).
        def advertised(name: str = node.name, gpus: str = str(node.gpus)) -> bool:
            query = "jsonpath={.status.allocatable.nvidia\\.com/gpu}"
            return kubectl("get", "node", name, "-o", query).strip() == gpus

        wait_for(f"{GPU_RESOURCE} on {node.name}", advertised, 60)
    return [node.name for node in nodes]


def all_nodes(cluster_dir: Path, net: Network, images_dir: Path, count: int = 9, gpus: int = 0) -> list[Node]:
    return [
        Node(net, i, gpus, cluster_dir / "nodes" / node_name(i), images_dir / node_name(i))
        for i in range(1, count + 1)
    ]


def forget_containers(node: Node) -> None:
    """Delete the node's containers from containerd while it still runs (their processes are already
    killed), so the images the cache keeps come back without last run's pods."""
    for task in ctr(node, "tasks", "ls", "-q", check=False).split():
        ctr(node, "tasks", "rm", "-f", task, check=False)
    if containers := ctr(node, "containers", "ls", "-q", check=False).split():
        ctr(node, "containers", "rm", *containers, check=False)


def node_cgroups(cluster: str) -> list[Path]:
    """This cluster's cgroup directories in every v1 hierarchy (and the v2 one), deepest first."""
    found: list[Path] = []
    for hierarchy in CGROUP_V1.iterdir() if CGROUP_V1.exists() else []:
        for top in hierarchy.glob(f"finetune-{cluster}-real-*"):
            found.extend(p for p in top.rglob("*") if p.is_dir())
            found.append(top)
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def kill_containers(cluster: str) -> None:
    """SIGKILL every process in the nodes' cgroups: the containers, which outlive their kubelet and shim."""
    for _ in range(20):
        pids: set[int] = set()
        for cg in node_cgroups(cluster):
            with contextlib.suppress(OSError):
                pids.update(int(p) for p in (cg / "cgroup.procs").read_text().split())
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def unmount_under(root: Path) -> None:
    """Unmount everything mounted below `root` (pods' volumes, rootfs, netns files), deepest first."""
    prefix = f"{root.resolve()}/"
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point.startswith(prefix):
            mounts.append(point)
    for point in sorted(set(mounts), key=len, reverse=True):
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True)


def stop(cluster_dir: Path, net: Network, images_dir: Path, stop_pids: Callable[[], None]) -> None:
    """Everything `start` and `prepare_network` made: containers, processes, mounts, cgroups, netns."""
    kill_containers(net.cluster)
    for node in all_nodes(cluster_dir, net, images_dir):
        if node.socket.exists():
            forget_containers(node)
    stop_pids()
    kill_containers(net.cluster)
    if cluster_dir.exists():
        unmount_under(cluster_dir)
    for cg in node_cgroups(net.cluster):
        with contextlib.suppress(OSError):
            cg.rmdir()
    teardown_network(net)
