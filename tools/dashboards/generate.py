#!/usr/bin/env python3
"""The chart's Grafana dashboards, as typed data: `generate.py --write` writes
charts/finetune-operator/dashboards/*.json; `--check` fails when a committed file differs.

Three dashboards, each one question:
- operator health: is the operator up, how fast and how often does it fail to reconcile;
- jobs overview: what runs, what waits and for how long, who used how many GPU-hours, how good the
  memory estimates were;
- job detail (pick a namespace and a job): loss, throughput, progress, memory against the estimate,
  restarts.
Every query is run against a real Prometheus by tests/e2e/test_real_pods.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parents[2] / "charts" / "finetune-operator" / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
NS = 'namespace=~"$namespace"'
JOB = 'namespace="$namespace", job_name="$job_name"'
OPERATOR = 'job="finetune-operator"'


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    targets: tuple[Target, ...]
    unit: str = "short"
    kind: str = "timeseries"  # timeseries, stat, bargauge, table
    width: int = 12
    height: int = 8
    description: str = ""


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    panels: tuple[Panel, ...]
    variables: tuple[dict[str, Any], ...] = field(default_factory=tuple)


def query_variable(name: str, query: str, label: str, multi: bool) -> dict[str, Any]:
    variable: dict[str, Any] = {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": query,
        "refresh": 2,
        "sort": 1,
    }
    if multi:
        variable |= {"includeAll": True, "multi": True, "current": {"text": "All", "value": "$__all"}}
    return variable


def t(expr: str, legend: str = "") -> Target:
    return Target(expr, legend)


def quantiles(histogram: str, window: str, qs: tuple[float, ...]) -> tuple[Target, ...]:
    """One target per quantile of a histogram over all its series, legends p50, p95, ..."""
    return tuple(
        t(f"histogram_quantile({q}, sum by (le) (rate({histogram}_bucket[{window}])))", f"p{round(q * 100)}")
        for q in qs
    )


NAMESPACES = query_variable("namespace", "label_values(finetune_job_phase, namespace)", "Namespace", True)
ONE_NAMESPACE = query_variable("namespace", "label_values(finetune_job_phase, namespace)", "Namespace", False)
ONE_JOB = query_variable(
    "job_name", 'label_values(finetune_job_phase{namespace="$namespace"}, job_name)', "Job", False
)

OPERATOR_HEALTH = Dashboard(
    uid="finetune-operator-health",
    title="FineTune Operator / Health",
    panels=(
        Panel("Replicas up", (t(f"sum(up{{{OPERATOR}}})"),), kind="stat", width=6, height=5),
        Panel("Jobs tracked", (t("sum(finetune_jobs)"),), kind="stat", width=6, height=5),
        Panel(
            "Reconciles per second",
            (t("sum(rate(finetune_reconcile_duration_seconds_count[5m]))", "reconciles"),),
            unit="reqps",
            width=6,
            height=5,
            kind="stat",
        ),
        Panel(
            "Gang restarts (last hour)",
            (t("sum(increase(finetune_gang_restarts_total[1h]))"),),
            kind="stat",
            width=6,
            height=5,
        ),
        Panel(
            "Reconcile latency",
            quantiles("finetune_reconcile_duration_seconds", "5m", (0.5, 0.95, 0.99)),
            unit="s",
        ),
        Panel(
            "Reconcile errors per minute",
            (t("sum by (kind) (rate(finetune_reconcile_errors_total[5m])) * 60 or vector(0)", "{{kind}}"),),
            description="Conflicts and timeouts are retried; a sustained rate fires FineTuneOperatorReconcileErrors.",
        ),
        Panel(
            "Operator CPU",
            (t(f"rate(process_cpu_seconds_total{{{OPERATOR}}}[5m])", "{{instance}}"),),
            unit="percentunit",
        ),
        Panel(
            "Operator memory (RSS)",
            (t(f"process_resident_memory_bytes{{{OPERATOR}}}", "{{instance}}"),),
            unit="bytes",
        ),
    ),
)

JOBS_OVERVIEW = Dashboard(
    uid="finetune-jobs-overview",
    title="FineTune Operator / Jobs",
    variables=(NAMESPACES,),
    panels=(
        Panel(
            "Jobs by phase",
            (t(f"sum by (phase) (finetune_job_phase{{{NS}}})", "{{phase}}"),),
            kind="stat",
            width=24,
            height=5,
        ),
        Panel(
            "GPUs in use by namespace",
            (
                t(
                    f"sum by (namespace) (rate(finetune_namespace_gpu_seconds_total{{{NS}}}[5m]))",
                    "{{namespace}}",
                ),
            ),
            description="GPUs held by running workers, from the GPU-seconds counter.",
        ),
        Panel(
            "GPU-hours by namespace (dashboard range)",
            (
                t(
                    f"sum by (namespace) (increase(finetune_namespace_gpu_seconds_total{{{NS}}}[$__range])) / 3600",
                    "{{namespace}}",
                ),
            ),
            kind="bargauge",
            description="For chargeback: GPUs of running workers times the time they ran.",
        ),
        Panel(
            "Queue time (p50, p95)",
            quantiles("finetune_job_queue_seconds", "1h", (0.5, 0.95)),
            unit="s",
            description="From workers created (or gated by a queue) until every one was placed.",
        ),
        Panel(
            "Time to running and to the end (p95)",
            (
                t(
                    "histogram_quantile(0.95, sum by (le) (rate(finetune_job_time_to_running_seconds_bucket[1h])))",
                    "creation → running",
                ),
                t(
                    "histogram_quantile(0.95, sum by (le, outcome) (rate(finetune_job_duration_seconds_bucket[1h])))",
                    "creation → {{outcome}}",
                ),
            ),
            unit="s",
        ),
        Panel(
            "Jobs finished by outcome and reason (dashboard range)",
            (
                t(
                    f"sum by (outcome, reason) (increase(finetune_jobs_finished_total{{{NS}}}[$__range]))",
                    "{{outcome}} {{reason}}",
                ),
            ),
            kind="bargauge",
        ),
        Panel(
            "Stalled, restarting and failed jobs",
            (
                t(f"sum(finetune_job_stalled{{{NS}}})", "stalled"),
                t(f'sum(finetune_job_phase{{{NS}, phase="Restarting"}})', "restarting"),
                t(f'sum(finetune_job_phase{{{NS}, phase="Failed"}})', "failed"),
            ),
        ),
        Panel(
            "Estimate accuracy: measured / estimated peak GPU memory",
            (t(f"finetune_job_gpu_memory_peak_ratio{{{NS}}}", "{{namespace}}/{{job_name}}"),),
            unit="percentunit",
            description="Above 100%: the estimate was low, an OOM risk for the next job like it. GPU jobs only.",
        ),
        Panel(
            "Throughput by job",
            (t(f"rate(finetune_job_tokens_total{{{NS}}}[5m])", "{{namespace}}/{{job_name}}"),),
            unit="tokens/s",
        ),
        Panel(
            "Progress by job",
            (t(f"finetune_job_progress_ratio{{{NS}}}", "{{namespace}}/{{job_name}}"),),
            unit="percentunit",
        ),
    ),
)

JOB_DETAIL = Dashboard(
    uid="finetune-job-detail",
    title="FineTune Operator / Job",
    variables=(ONE_NAMESPACE, ONE_JOB),
    panels=(
        Panel(
            "Progress",
            (t(f"finetune_job_progress_ratio{{{JOB}}}"),),
            unit="percentunit",
            kind="stat",
            width=6,
            height=5,
        ),
        Panel("Step", (t(f"finetune_job_step{{{JOB}}}"),), kind="stat", width=6, height=5),
        Panel(
            "Time left", (t(f"finetune_job_eta_seconds{{{JOB}}}"),), unit="s", kind="stat", width=6, height=5
        ),
        Panel("Restarts", (t(f"finetune_job_restarts_total{{{JOB}}}"),), kind="stat", width=6, height=5),
        Panel(
            "Loss",
            (
                t(f'finetune_trainer_loss{{{JOB}, rank="0"}}', "train"),
                t(f'finetune_trainer_eval_loss{{{JOB}, rank="0"}}', "eval"),
            ),
            description="Straight from rank 0's metrics endpoint, at every scrape.",
        ),
        Panel(
            "Throughput",
            (t(f"rate(finetune_job_tokens_total{{{JOB}}}[5m])", "tokens/s"),),
            unit="tokens/s",
        ),
        Panel(
            "GPU memory against the estimate",
            (
                t(f"finetune_job_gpu_memory_estimated_bytes{{{JOB}}}", "estimated peak per GPU"),
                t(f"finetune_job_gpu_memory_peak_bytes{{{JOB}}}", "measured peak (rank 0)"),
            ),
            unit="bytes",
        ),
        Panel(
            "Learning rate",
            (t(f'finetune_trainer_learning_rate{{{JOB}, rank="0"}}', "lr"),),
        ),
        Panel(
            "Phase and stalls",
            (
                t(f"max by (phase) (finetune_job_phase{{{JOB}}}) == 1", "{{phase}}"),
                t(f"finetune_job_stalled{{{JOB}}}", "stalled"),
            ),
        ),
        Panel(
            "GPU-hours used",
            (t(f"finetune_job_gpu_seconds_total{{{JOB}}} / 3600", "GPU-hours"),),
        ),
    ),
)

DASHBOARDS = (OPERATOR_HEALTH, JOBS_OVERVIEW, JOB_DETAIL)


def render_panel(panel: Panel, number: int, x: int, y: int) -> dict[str, Any]:
    rendered: dict[str, Any] = {
        "id": number,
        "type": panel.kind,
        "title": panel.title,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": panel.width, "h": panel.height},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": DATASOURCE,
                "expr": target.expr,
                "legendFormat": target.legend,
            }
            for i, target in enumerate(panel.targets)
        ],
    }
    if panel.description:
        rendered["description"] = panel.description
    return rendered


def render(dashboard: Dashboard) -> dict[str, Any]:
    """Grafana's dashboard JSON (schema 39); panels flow left to right, rows as tall as their tallest."""
    panels, x, y, row_height = [], 0, 0, 0
    for number, panel in enumerate(dashboard.panels, start=1):
        if x + panel.width > 24:
            x, y, row_height = 0, y + row_height, 0
        panels.append(render_panel(panel, number, x, y))
        x, row_height = x + panel.width, max(row_height, panel.height)
    datasource = {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus"}
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "tags": ["finetune", "llm"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "templating": {"list": [datasource, *dashboard.variables]},
        "panels": panels,
    }


def files() -> dict[Path, str]:
    return {
        OUT / f"{d.uid}.json": json.dumps(render(d), indent=2, ensure_ascii=False) + "\n" for d in DASHBOARDS
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write the JSON files (default: check them)")
    args = parser.parse_args(argv)
    wanted = files()
    if args.write:
        for stale in set(OUT.glob("*.json")) - set(wanted):
            stale.unlink()
        for path, text in wanted.items():
            path.write_text(text)
        return 0
    stale = sorted(p.name for p, text in wanted.items() if not p.exists() or p.read_text() != text)
    extra = sorted(p.name for p in set(OUT.glob("*.json")) - set(wanted))
    if stale or extra:
        print(
            f"dashboards out of date: {stale + extra}; run tools/dashboards/generate.py --write",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
