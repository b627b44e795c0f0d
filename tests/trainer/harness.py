"""Run the trainer exactly as a pod does (launcher → torchrun → DeepSpeed on gloo) on tiny models.

Every training test goes through `write_trainer_config` + `start`/`run`, so the matrix tests, the
resume tests and the signal tests share one way of launching.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from finetune_operator.api.trainer import PROGRESS_FILE, SUMMARY_FILE, TrainerConfig
from finetune_operator.cli.train import launch_command

#: One torchrun run of a tiny model takes ~10 s on 2 cores; this bounds a hung gang.
RUN_TIMEOUT_S = 240


def write_trainer_config(
    workdir: Path,
    *,
    model_dir: Path,
    data: Path,
    method: dict[str, Any],
    zero_stage: int,
    classification: bool = False,
    model: dict[str, Any] | None = None,
    dataset: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    checkpointing: dict[str, Any] | None = None,
    output: dict[str, Any] | None = None,
) -> Path:
    """A trainer config for a 2-process CPU run: fp32 (no bf16 kernels needed), constant LR, small steps."""
    out = workdir / "out"
    config = TrainerConfig.model_validate(
        {
            "jobName": "tiny",
            "model": {"uri": str(model_dir), **(model or {})},
            "dataset": {
                "uri": str(data),
                "format": "classification" if classification else "text",
                "maxSeqLength": 32,
                **({"numLabels": 2} if classification else {}),
                **(dataset or {}),
            },
            "method": method,
            "training": {
                "maxSteps": 30,
                "learningRate": 1e-2,
                "lrScheduler": "constant",
                "precision": "fp32",
                "microBatchSize": 4,
                "loggingSteps": 5,
                **(training or {}),
            },
            "checkpointing": {"saveSteps": 10, "saveTotalLimit": 2, **(checkpointing or {})},
            "output": {"uri": str(out), **(output or {})},
            "paths": {
                "model": str(model_dir),
                "dataset": str(data),
                "output": str(out),
                "checkpoints": str(out / "checkpoints"),
            },
            "zeroStage": zero_stage,
            "worldSize": 2,
            "progress": {"reporter": "file", "intervalSeconds": 0, "metricsPort": 0},
        }
    )
    path = workdir / "trainer.yaml"
    path.write_text(config.to_yaml())
    return path


def start(config_path: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start in a new session so a test can signal the launcher alone or kill the whole gang."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "60"}
    handle = log.open("wb")
    return subprocess.Popen(
        launch_command(config_path, 2),
        stdout=handle,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def descendants(pid: int) -> list[int]:
    """Every process below `pid`. torchrun starts each worker in its own session, so killing the
    launcher's process group would orphan the workers, which then keep training."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def kill_gang(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the launcher and all its workers at once, as losing the node would."""
    for pid in [*descendants(process.pid), process.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()


def run(config_path: Path) -> int:
    log = config_path.parent / f"run-{time.monotonic_ns()}.log"
    process = start(config_path, log)
    try:
        return process.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_gang(process)
        raise AssertionError(f"trainer hung; log {log}:\n{log.read_text()[-4000:]}") from None


def tail(workdir: Path) -> str:
    logs = sorted(workdir.glob("run-*.log"))
    return logs[-1].read_text()[-6000:] if logs else "(no log)"


def summary(workdir: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((workdir / "out" / SUMMARY_FILE).read_text())
    return loaded


def progress(workdir: Path) -> dict[str, Any] | None:
    path = workdir / "out" / PROGRESS_FILE
    try:
        loaded: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return loaded


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
