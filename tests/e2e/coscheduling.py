"""scheduler-plugins' kube-scheduler with Coscheduling, built from its Go module (`make tools`:
tools/coscheduling), running against the local cluster as a second scheduler.

It runs as a process beside the control plane, as the default scheduler here does, under the profile name
scheduler-plugins' chart gives it (`SCHEDULER_NAME`, the operator's default for coscheduled workers), so
pods that name no scheduler never pass through it. Its PodGroup CRD comes from the same module version
(`.cache/bin/coscheduling-config/crd.yaml`) and stays when it stops. Only the scheduler runs, not
scheduler-plugins' controller: Coscheduling's all-or-nothing decision counts the group's pods itself, the
controller only fills in the PodGroup's status.
"""

from __future__ import annotations

import ssl
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from finetune_operator.scheduling.options import SCHEDULER_NAME

from .conftest import BIN, Cluster
from .processes import LocalProcess, free_port, start_logged

CRD = BIN / "coscheduling-config" / "crd.yaml"
#: How long a partly placed group waits in Permit before Coscheduling releases it (its default is 60 s).
PERMIT_WAITING_SECONDS = 10
#: How long a rejected group waits before the scheduler tries it again (its default is 5 min); it sweeps
#: every 30 s, so a gang placed once GPUs free up is placed within about 45 s.
UNSCHEDULABLE_RETRY_SECONDS = 15


class Coscheduler(LocalProcess):
    """`with Coscheduler(cluster, workdir) as scheduler:` runs the scheduler until the block ends."""

    def __init__(self, cluster: Cluster, workdir: Path) -> None:
        self.cluster, self.workdir = cluster, workdir
        self.log = workdir / "scheduler-plugins.log"
        self.port = free_port()

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cluster.install_crds([yaml.safe_load(CRD.read_text())])
        config = self.workdir / "config.yaml"
        config.write_text(yaml.safe_dump(self._configuration()))
        kubeconfig = str(self.cluster.kubeconfig)
        command = [
            str(BIN / "scheduler-plugins"),
            "--config", str(config),
            "--bind-address", "127.0.0.1",
            "--secure-port", str(self.port),
            "--authentication-kubeconfig", kubeconfig,
            "--authorization-kubeconfig", kubeconfig,
            # Coscheduling requeues a rejected group only when a pod or PodGroup is added, not when GPUs
            # free up; the scheduler retries such pods after this long (5 min by default).
            "--pod-max-in-unschedulable-pods-duration", f"{UNSCHEDULABLE_RETRY_SECONDS}s",
            "--v", "2",
        ]  # fmt: skip
        self.proc = start_logged(command, self.log)

    def _configuration(self) -> dict[str, Any]:
        """scheduler-plugins' documented Coscheduling profile: the plugin at every extension point and as
        the only queue sort (it keeps a group's pods together in the queue)."""
        return {
            "apiVersion": "kubescheduler.config.k8s.io/v1",
            "kind": "KubeSchedulerConfiguration",
            "leaderElection": {"leaderElect": False},
            "clientConnection": {"kubeconfig": str(self.cluster.kubeconfig)},
            "profiles": [
                {
                    "schedulerName": SCHEDULER_NAME,
                    "plugins": {
                        "multiPoint": {"enabled": [{"name": "Coscheduling"}]},
                        "queueSort": {"enabled": [{"name": "Coscheduling"}], "disabled": [{"name": "*"}]},
                    },
                    "pluginConfig": [
                        {
                            "name": "Coscheduling",
                            "args": {"permitWaitingTimeSeconds": PERMIT_WAITING_SECONDS},
                        }
                    ],
                }
            ],
        }

    def _wait_ready(self, timeout: float = 90) -> None:
        """Until its /readyz answers (its informers have synced): a self-signed serving certificate."""
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        deadline = time.monotonic() + timeout
        problem = ""
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"scheduler-plugins exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                url = f"https://127.0.0.1:{self.port}/readyz"
                with urllib.request.urlopen(url, timeout=2, context=context):
                    return
            except OSError as exc:
                problem = str(exc)
            time.sleep(0.5)
        raise RuntimeError(f"scheduler-plugins not ready after {timeout}s ({problem}):\n{self.tail()}")
