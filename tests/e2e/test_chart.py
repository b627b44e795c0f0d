"""The Helm chart renders what the operator expects: `helm lint --strict`, and a webhook whose
certificate, CA bundle and settings fit together (the in-cluster path; the local cluster's is in
test_operator.py's webhook test)."""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from finetune_operator.api.enums import GangScheduling
from finetune_operator.scheduling.options import SchedulingOptions
from finetune_operator.settings import PeeringSettings, Settings, from_env

from .conftest import BIN, REPO

CHART = REPO / "charts" / "finetune-operator"


def helm(*args: str) -> str:
    done = subprocess.run([str(BIN / "helm"), *args], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def rendered(*values: str) -> dict[str, dict[str, Any]]:
    text = helm("template", "ft", str(CHART), "-n", "ops", "--kube-version", "1.37.2", *values)
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(text) if d}


def operator_settings(*values: str) -> Settings:
    """The settings the operator's container reads from the environment the chart gives it."""
    container = rendered(*values)["Deployment/ft"]["spec"]["template"]["spec"]["containers"][0]
    return from_env({e["name"]: e["value"] for e in container["env"] if "value" in e})


def test_the_chart_lints_strictly() -> None:
    assert "0 chart(s) failed" in helm("lint", "--strict", str(CHART))


def test_the_webhook_certificate_serves_the_service_name_and_the_bundle_trusts_it(tmp_path: Path) -> None:
    objects = rendered("--set", "watchNamespaces={team-a}")
    secret = objects["Secret/ft-webhook-tls"]["data"]
    (tmp_path / "tls.crt").write_bytes(base64.b64decode(secret["tls.crt"]))
    (tmp_path / "tls.key").write_bytes(base64.b64decode(secret["tls.key"]))
    # kopf's server loads exactly these files from FINETUNE_WEBHOOK_CERT_DIR.
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
        tmp_path / "tls.crt", tmp_path / "tls.key"
    )
    certificate = x509.load_pem_x509_certificate((tmp_path / "tls.crt").read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["ft-webhook.ops.svc"]

    hook = objects["ValidatingWebhookConfiguration/ft.finetune.dev"]["webhooks"][0]
    ca = x509.load_pem_x509_certificate(base64.b64decode(hook["clientConfig"]["caBundle"]))
    certificate.verify_directly_issued_by(ca)
    assert hook["clientConfig"]["service"] == {
        "name": "ft-webhook",
        "namespace": "ops",
        "path": "/plan",
        "port": 443,
    }
    assert hook["failurePolicy"] == "Ignore"
    assert hook["namespaceSelector"]["matchExpressions"][0]["values"] == ["team-a"]
    assert objects["Service/ft-webhook"]["spec"]["ports"][0]["targetPort"] == "webhook"


def test_the_deployment_configures_a_serving_only_webhook() -> None:
    """The chart owns the configuration and the certificate; every FINETUNE_ variable it sets is a setting."""
    deployment = rendered("--set", "webhook.failurePolicy=Fail")["Deployment/ft"]["spec"]["template"]["spec"]
    container = deployment["containers"][0]
    assert "--webhook-port=9443" in container["args"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}  # POD_NAME is from the pod
    settings = from_env(env)
    webhook = settings.webhook
    assert (webhook.address, webhook.cert_dir, webhook.configuration, webhook.failure_policy) == (
        "0.0.0.0",
        "/etc/finetune-webhook",
        "",
        "Fail",
    )
    mount = container["volumeMounts"][0]
    assert mount["mountPath"] == webhook.cert_dir
    assert deployment["volumes"][0]["secret"]["secretName"] == "ft-webhook-tls"


def test_the_trainer_images_attention_kernels_reach_the_operator() -> None:
    """What the chart says trainerImage has is what the webhook admits (core/desire.py)."""

    def kernels(*values: str) -> list[str]:
        return sorted(a.value for a in operator_settings(*values).render_options().attention_implementations)

    assert kernels() == ["eager", "sdpa"]  # the image built from Dockerfile.trainer: no flash-attn
    assert kernels("--set", "trainerAttentionImplementations={sdpa,flash_attention_2}") == [
        "flash_attention_2",
        "sdpa",
    ]


def test_the_gpu_nodes_memory_reaches_the_planner() -> None:
    def node_memory(*values: str) -> int | None:
        return operator_settings(*values).render_options().node_memory_bytes

    assert node_memory() is None  # not checked unless the platform team says
    assert node_memory("--set", "placement.nodeMemory=512Gi") == 512 * 1024**3


def test_the_gang_scheduling_default_reaches_the_operator_with_leave_to_create_pod_groups() -> None:
    assert operator_settings().scheduling_options() == SchedulingOptions()  # off unless the team says
    chosen = operator_settings(
        "--set", "scheduling.gangScheduling=coscheduling,scheduling.coschedulingSchedulerName=gang"
    ).scheduling_options()
    assert chosen == SchedulingOptions(GangScheduling.COSCHEDULING, "gang")
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["scheduling"]
    assert schema["properties"]["gangScheduling"]["enum"] == [g.value for g in GangScheduling]
    rules = rendered()["ClusterRole/ft"]["rules"]
    assert any("podgroups" in r["resources"] and "create" in r["verbs"] for r in rules)


def test_the_peering_timings_reach_the_operator() -> None:
    assert operator_settings().peering == PeeringSettings()  # the operator's defaults are the chart's
    chosen = operator_settings("--set", "peering.lifetimeSeconds=20,peering.handoverSeconds=3").peering
    assert (chosen.lifetime_seconds, chosen.handover_seconds) == (20, 3.0)


@pytest.mark.parametrize("value", ["webhook.enabled=false", "webhook.certManager.enabled=true"])
def test_the_webhook_can_be_turned_off_or_issued_by_cert_manager(value: str) -> None:
    objects = rendered("--set", value)
    if value == "webhook.enabled=false":
        assert not [k for k in objects if "webhook" in k.lower()]
        assert (
            "--webhook-port=9443"
            not in objects["Deployment/ft"]["spec"]["template"]["spec"]["containers"][0]["args"]
        )
    else:
        assert "Secret/ft-webhook-tls" not in objects  # cert-manager writes it
        assert objects["Certificate/ft-webhook"]["spec"]["dnsNames"] == ["ft-webhook.ops.svc"]
        config = objects["ValidatingWebhookConfiguration/ft.finetune.dev"]
        assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == "ops/ft-webhook"
        assert "caBundle" not in config["webhooks"][0]["clientConfig"]


def test_monitoring_objects_carry_the_tested_rules_and_every_dashboard() -> None:
    objects = rendered(
        "--set",
        "metrics.serviceMonitor.enabled=true,metrics.podMonitor.enabled=true,metrics.prometheusRule.enabled=true",
    )
    rules = yaml.safe_load((CHART / "prometheus" / "alerts.yaml").read_text())
    assert objects["PrometheusRule/ft"]["spec"] == rules  # the very file promtool tests
    pod_monitor = objects["PodMonitor/ft-workers"]["spec"]
    assert pod_monitor["podMetricsEndpoints"][0]["port"] == "metrics"
    assert pod_monitor["namespaceSelector"] == {"any": True}
    service_monitor = objects["ServiceMonitor/ft"]["spec"]
    assert service_monitor["endpoints"][0]["honorLabels"] is True
    dashboards = objects["ConfigMap/ft-dashboards"]
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert sorted(dashboards["data"]) == sorted(p.name for p in (CHART / "dashboards").glob("*.json"))
    assert len(dashboards["data"]) == 3
    # off by default: a cluster without the Prometheus operator's CRDs installs the chart as it is
    defaults = rendered()
    assert not [k for k in defaults if k.split("/")[0] in ("PodMonitor", "ServiceMonitor", "PrometheusRule")]
    # watching namespaces narrows the PodMonitor to them
    narrowed = rendered("--set", "metrics.podMonitor.enabled=true,watchNamespaces={team-a}")
    assert narrowed["PodMonitor/ft-workers"]["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}


def test_replicas_are_ready_when_healthy_spread_over_nodes_and_drained_one_at_a_time() -> None:
    objects = rendered()
    pod = objects["Deployment/ft"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in container["env"]
    spread = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert spread["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert objects["PodDisruptionBudget/ft"]["spec"]["maxUnavailable"] == 1
    # one replica: nothing to spread, and a budget would block every drain
    single = rendered("--set", "replicaCount=1")
    assert "PodDisruptionBudget/ft" not in single
    assert "affinity" not in single["Deployment/ft"]["spec"]["template"]["spec"]
    # a user's affinity replaces the default spread
    custom = rendered(
        "--set",
        "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].key=pool,affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].operator=Exists",
    )
    assert list(custom["Deployment/ft"]["spec"]["template"]["spec"]["affinity"]) == ["nodeAffinity"]


@pytest.mark.parametrize(
    ("value", "refusal"),
    [
        ("replicaCont=2", "additional properties 'replicaCont' not allowed"),
        ("webhook.failurePolicy=Sometimes", "value must be one of 'Ignore', 'Fail'"),
        ("placement.preset=aks", "value must be one of 'nvidia-gfd', 'gke', 'eks'"),
        ("metrics.podMonitor.interval=often", "does not match pattern"),
        ("placement.nodeMemory=lots", "does not match pattern"),
        ("scheduling.gangScheduling=volcano", "value must be one of 'none', 'coscheduling'"),
        (
            "trainerAttentionImplementations={flash}",
            "value must be one of 'sdpa', 'eager', 'flash_attention_2'",
        ),
    ],
)
def test_the_values_schema_refuses_typos_and_bad_values(value: str, refusal: str) -> None:
    done = subprocess.run(
        [str(BIN / "helm"), "template", "ft", str(CHART), "--kube-version", "1.37.2", "--set", value],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0 and refusal in done.stderr, done.stderr


def test_the_chart_lints_strictly_with_every_option_turned() -> None:
    values = (
        "replicaCount=1,webhook.certManager.enabled=true,watchNamespaces={a,b},manageTrainerAccess=false,"
        "trainerNamespaces={a},metrics.serviceMonitor.enabled=true,metrics.podMonitor.enabled=true,"
        "metrics.prometheusRule.enabled=true,metrics.dashboards.enabled=false,placement.preset=gke"
    )
    assert "0 chart(s) failed" in helm("lint", "--strict", str(CHART), "--set", values)


def test_the_chart_templates_without_naming_a_kubernetes_version() -> None:
    """`helm template` as a user first runs it: helm assumes the Kubernetes its client is built for."""
    text = helm("template", "ft", str(CHART))
    assert "kind: Deployment" in text
