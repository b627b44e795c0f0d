"""`ftctl get/status/wait` decide and print from API documents: tested here on documents, purely; the same
commands against the local cluster are in tests/e2e (test_operator.py, test_real_pods.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from finetune_operator.api.models import FineTuneJobStatus
from finetune_operator.cli.common import CliError, age
from finetune_operator.cli.get import row
from finetune_operator.cli.status import describe
from finetune_operator.cli.wait import predicate

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def ago(seconds: int) -> str:
    return (NOW - timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


JOB: dict[str, Any] = {
    "metadata": {"name": "demo", "namespace": "team-a", "creationTimestamp": ago(3700)},
    "spec": {"method": {"type": "lora"}},
    "status": {
        "phase": "Running",
        "message": "2 workers running",
        "restarts": 1,
        "plan": {
            "fits": True, "gpus": 2, "nodes": 2, "gpusPerNode": 1, "zeroStage": 0, "offload": "none",
            "gpuType": "L4", "perGpuBytes": 1, "usableBytes": 2,
            "message": "2 GPUs on 2 nodes, ZeRO-0: 0.5 GiB per GPU of 20.7 GiB usable",
        },
        "progress": {
            "step": 20, "totalSteps": 60, "display": "33% (20/60)", "loss": 5.753, "eta": "11s",
            "tokensPerSecond": 1234.5, "peakMemory": "15.2 GiB",
        },
        "lastCheckpoint": {"step": 20, "path": "/mnt/pvc/models/demo/checkpoints/checkpoint-20"},
        "workers": {"total": 2, "running": 2},
        "conditions": [
            {"type": "Running", "status": "True", "reason": "Running", "message": "2 workers running",
             "lastTransitionTime": ago(40)},
        ],
    },
}  # fmt: skip


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0, "0s"), (42, "42s"), (310, "5m10s"), (700, "11m"), (12000, "3h20m"), (187200, "2d4h")],
)
def test_ages_read_like_kubectls(seconds: int, shown: str) -> None:
    assert age(NOW - timedelta(seconds=seconds), NOW) == shown


def test_get_shows_the_columns_kubectl_get_shows() -> None:
    assert row(JOB, with_namespace=True)[:9] == [
        "team-a", "demo", "Running", "lora", "2", "33% (20/60)", "5.753", "11s", "1",
    ]  # fmt: skip


def test_status_reads_in_human_units() -> None:
    events = [
        {"type": "Normal", "reason": "Running", "message": "2 workers running", "time": NOW - timedelta(seconds=40),
         "count": 1, "from": "finetune-operator"},
    ]  # fmt: skip
    text = describe(JOB, events, NOW)
    assert text.splitlines()[0] == "FineTuneJob team-a/demo: Running, 2 workers running"
    assert (
        "Plan:        2 GPUs on 2 nodes, ZeRO-0: 0.5 GiB per GPU of 20.7 GiB usable (L4, offload none)"
        in text
    )
    assert "Progress:    33% (20/60), loss 5.753, 1,234 tokens/s, peak 15.2 GiB per GPU, ETA 11s" in text
    assert (
        "Workers:     2/2 running, 0 pending, 0 succeeded, 0 failed; 1 restart, 0 disruptions, 0 relaunches\n"
        in text
    )
    assert "Running   True     Running   40s" in text
    assert "40s   Normal   Running   finetune-operator   2 workers running" in text


def test_wait_for_a_phase_or_a_condition() -> None:
    status = FineTuneJobStatus.model_validate(JOB["status"])
    assert predicate(None) is None  # the job's end
    running, stalled = predicate("phase=Running"), predicate("condition=Stalled")
    assert running is not None and running(status)
    assert stalled is not None and not stalled(status)
    with pytest.raises(CliError, match="expected phase=PHASE or condition=TYPE"):
        predicate("Running")
