"""Experiment trackers (`training.reportTo`): HF Trainer's own integrations, given a home that survives.

HF Trainer already has a callback per tracker; what a pod lacks is a place for them to write and a
server to talk to. Unless the job's environment says otherwise, each tracker writes into the output
directory, offline, so the run's curves are kept with its adapter on the same volume:

| tracker     | package it needs | default here (the job's `env` / `envFrom` override each)            |
|-------------|------------------|----------------------------------------------------------------------|
| tensorboard | tensorboard      | TENSORBOARD_LOGGING_DIR=<output>/runs                                 |
| mlflow      | mlflow           | MLFLOW_TRACKING_URI=<output>/mlruns (a file store), experiment = job  |
| wandb       | wandb            | WANDB_DIR=<output>, project = job; WANDB_MODE=offline without a key   |

A tracker whose package the image lacks is a configuration error before anything loads: a restart of
the same image would fail the same way.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from finetune_operator.api.enums import ReportTo
from finetune_trainer.exit_codes import ConfigurationError

#: The module each tracker's HF integration imports (`pip install` names are the same).
PACKAGES: Mapping[ReportTo, str] = {
    ReportTo.TENSORBOARD: "tensorboard",
    ReportTo.MLFLOW: "mlflow",
    ReportTo.WANDB: "wandb",
}


def prepare(report_to: Iterable[ReportTo], output: str, job_name: str) -> list[str]:
    """Check the trackers and point them at `output` (this process's environment, which HF's callbacks
    read); returns the `report_to` names for TrainingArguments."""
    names = check(report_to)
    os.environ.update(environment(report_to, output, job_name, os.environ))
    return names


def check(report_to: Iterable[ReportTo]) -> list[str]:
    """The `report_to` names for TrainingArguments, each once; refuses a tracker this image cannot run."""
    names = list(dict.fromkeys(ReportTo(r).value for r in report_to))
    missing = [n for n in names if importlib.util.find_spec(PACKAGES[ReportTo(n)]) is None]
    if missing:
        packages = " ".join(PACKAGES[ReportTo(n)] for n in missing)
        raise ConfigurationError(
            f"training.reportTo {', '.join(missing)}: this image lacks the {packages} package; build an "
            f"image FROM the trainer's with `pip install {packages}`, or drop it from reportTo"
        )
    return names


def environment(
    report_to: Iterable[ReportTo], output: str, job_name: str, environ: Mapping[str, str]
) -> dict[str, str]:
    """The variables to add so each tracker writes into `output` offline; what `environ` sets is kept."""
    out = Path(output)
    defaults: dict[str, str] = {}
    chosen = set(report_to)
    if ReportTo.TENSORBOARD in chosen:
        defaults["TENSORBOARD_LOGGING_DIR"] = str(out / "runs")
    if ReportTo.MLFLOW in chosen:
        if "MLFLOW_TRACKING_URI" not in environ:
            # A directory works on any volume (SQLite, MLflow's new default, locks badly on NFS); MLflow 3
            # keeps file stores working only when asked to.
            defaults["MLFLOW_TRACKING_URI"] = str(out / "mlruns")
            defaults["MLFLOW_ALLOW_FILE_STORE"] = "true"
        defaults["MLFLOW_EXPERIMENT_NAME"] = job_name
    if ReportTo.WANDB in chosen:
        defaults["WANDB_DIR"] = str(out)
        defaults["WANDB_PROJECT"] = job_name
        if not environ.get("WANDB_API_KEY"):
            defaults["WANDB_MODE"] = "offline"
    return {key: value for key, value in defaults.items() if key not in environ}
