"""Prometheus conventions, offline, with promtool (built by `make tools`): the alert rules check and pass
their unit tests, both /metrics endpoints lint clean, every dashboard query parses, the dashboards are
what the generator makes. tests/e2e/test_real_pods.py runs the same rules and queries in a real server."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from finetune_operator.api.enums import Offload
from finetune_operator.api.models import (
    Condition,
    FineTuneJobStatus,
    PlanStatus,
    ProgressStatus,
    WorkersStatus,
)
from finetune_operator.api.trainer import ProgressReport
from finetune_operator.metrics import build_metrics
from finetune_trainer.progress import create_metrics
from monitoring.dashboards import panels

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "charts" / "finetune-operator" / "prometheus" / "alerts.yaml"
#: What Grafana substitutes before a query reaches Prometheus (a single value, or All's regex).
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__range": "1h",
    "$namespace": ".*",
    "$job_name": ".*",
}


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool") or str(REPO / ".cache" / "bin" / "promtool")
    if not Path(binary).exists():
        pytest.skip("promtool is built by `make tools`")
    return subprocess.run(
        [binary, *args], input=stdin, capture_output=True, text=True, timeout=120, check=False
    )


def test_the_alert_rules_check_and_pass_their_unit_tests() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", str(REPO / "tests" / "monitoring" / "alerts_test.yaml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # every alert has a test that names it
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    tests = (REPO / "tests" / "monitoring" / "alerts_test.yaml").read_text()
    assert alerts and all(f"alertname: {a}" in tests for a in alerts), alerts


def test_the_operators_metrics_lint_clean_with_every_series_present() -> None:
    metrics = build_metrics()
    plan = PlanStatus(
        fits=True, gpus=2, nodes=2, gpus_per_node=1, zero_stage=0, offload=Offload.NONE,
        per_gpu_bytes=10, usable_bytes=20,
    )  # fmt: skip
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    running = FineTuneJobStatus(
        phase="Running",
        plan=plan,
        workers=WorkersStatus(total=2, running=2),
        start_time=now,
        progress=ProgressStatus(
            step=3, total_steps=10, loss=1.0, tokens=100, eta_seconds=5, peak_memory_bytes=9
        ),
        conditions=[
            Condition(type=kind, status="True", reason=kind, last_transition_time=now)
            for kind in ("Scheduled", "Running", "Stalled")
        ],
    )
    metrics.observe("ns", "a", FineTuneJobStatus(), running, datetime.now(UTC), deadline_seconds=60)
    failed = running.model_copy(update={"phase": "Failed", "completion_time": now})
    metrics.observe("ns", "b", running, failed, datetime.now(UTC))
    metrics.reconcile_errors.labels("temporary").inc()
    text = generate_latest(metrics.registry).decode()
    for family in ("finetune_job_gpu_seconds_total", "finetune_job_deadline_timestamp_seconds",
                   "finetune_jobs_finished_total", "finetune_job_queue_seconds_bucket",
                   "finetune_namespace_gpu_seconds_total", "process_resident_memory_bytes"):  # fmt: skip
        assert family in text
    checked = promtool("check", "metrics", stdin=text)
    assert checked.returncode == 0 and not checked.stdout.strip(), checked.stdout + checked.stderr


def test_the_trainers_metrics_lint_clean() -> None:
    metrics = create_metrics("job-a", rank=0)
    metrics.update(
        ProgressReport(step=3, total_steps=10, loss=1.0, eval_loss=1.1, learning_rate=1e-4, tokens=50)
    )
    checked = promtool("check", "metrics", stdin=generate_latest(metrics.registry).decode())
    assert checked.returncode == 0 and not checked.stdout.strip(), checked.stdout + checked.stderr


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    queries = [expr for _, _, exprs in panels(GRAFANA_VARIABLES) for expr in exprs]
    assert len(queries) >= 30
    # promtool parses rule expressions offline: one recording rule per query
    rules = [{"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(queries)]
    path = tmp_path / "dashboards.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    checked = promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    leftovers = [q for q in queries if re.search(r"\$\w", q)]
    assert not leftovers, f"Grafana variables the tests do not substitute: {leftovers}"


def test_the_committed_dashboards_are_the_generated_ones() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "dashboards" / "generate.py")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
