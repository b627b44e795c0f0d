"""A real Prometheus server (built from the pinned module by `make tools`) scraping a local cluster the way
the chart's ServiceMonitor and PodMonitor do, with the chart's alert rules loaded."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from .conftest import BIN, REPO
from .processes import free_port, start_logged

RULES = REPO / "charts" / "finetune-operator" / "prometheus" / "alerts.yaml"
#: Scrapes and rule evaluations this often, so a test sees a change within seconds.
INTERVAL = "2s"


def scrape_config(
    kubeconfig: Path, operator_namespace: str, job_namespaces: tuple[str, ...]
) -> dict[str, Any]:
    """Pod discovery through the API server, relabelled as the chart's monitors are: the operator's pods
    as job "finetune-operator" with honor_labels (a job's namespace label is kept), workers' port
    `metrics` as job "finetune-trainer" with namespace and pod target labels."""

    def pods(namespaces: tuple[str, ...], app: str) -> dict[str, Any]:
        return {
            "kubernetes_sd_configs": [
                {"role": "pod", "kubeconfig_file": str(kubeconfig), "namespaces": {"names": list(namespaces)}}
            ],
            "relabel_configs": [
                {
                    "source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_name"],
                    "regex": app,
                    "action": "keep",
                },
                {
                    "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                    "regex": "metrics",
                    "action": "keep",
                },
                {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            ],
        }

    return {
        "global": {"scrape_interval": INTERVAL, "evaluation_interval": INTERVAL, "scrape_timeout": INTERVAL},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "finetune-operator",
                "honor_labels": True,
                **pods((operator_namespace,), "finetune-operator"),
            },
            {"job_name": "finetune-trainer", **pods(job_namespaces, "finetune-trainer")},
        ],
    }


class Prometheus:
    def __init__(self, url: str, log: Path) -> None:
        self.url, self.log = url, log

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (raises on a query that does not parse)."""
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"] if data["resultType"] == "vector" else [data]
        return result

    def values(self, expr: str) -> list[float]:
        return [float(sample["value"][1]) for sample in self.query(expr)]

    def wait_for(
        self, expr: str, what: str, done: Callable[[list[float]], bool] = bool, timeout: float = 120
    ) -> list[float]:
        """Poll `expr` until `done(values)`; fail with the last values and the server's log tail."""
        deadline = time.monotonic() + timeout
        while True:
            values = self.values(expr)
            if done(values):
                return values
            if time.monotonic() > deadline:
                targets = [
                    (t["labels"].get("job"), t["health"], t.get("lastError"))
                    for t in self.api("targets")["activeTargets"]
                ]
                raise AssertionError(
                    f"Prometheus: {what} not seen in {timeout:.0f}s ({expr} = {values}); targets: {targets}\n"
                    f"{self.log.read_text()[-2000:]}"
                )
            time.sleep(1)


@contextmanager
def running_prometheus(config: dict[str, Any], workdir: Path) -> Iterator[Prometheus]:
    """The server with `config`, on a free loopback port, until the block ends."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = workdir / "prometheus.log"
    command = [
        str(BIN / "prometheus"),
        f"--config.file={workdir / 'prometheus.yml'}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    process = start_logged(command, log)
    server = Prometheus(f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2):
                    break
            except OSError:
                assert process.poll() is None, f"prometheus exited: {log.read_text()[-2000:]}"
                assert time.monotonic() < deadline, f"prometheus not ready in 60s: {log.read_text()[-2000:]}"
                time.sleep(0.5)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
