"""training.reportTo's trackers and the loss plot, without training (tests/trainer/test_training.py trains
with all three trackers through `ftctl train`)."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest

from finetune_operator.api.enums import ReportTo
from finetune_trainer import plots, trackers
from finetune_trainer.exit_codes import ConfigurationError


def write_log(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_a_resumed_run_plots_one_curve_where_the_later_attempt_wins(tmp_path: Path) -> None:
    """Attempt 1 logged steps 5-25 and was killed mid-line; attempt 2 resumed from checkpoint 20."""
    log = write_log(
        tmp_path / "train_log.jsonl",
        [
            {"step": 5, "loss": 6.0},
            {"step": 10, "loss": 5.0, "evalLoss": 5.5},
            {"step": 15, "loss": 4.0},
            {"step": 20, "loss": 3.9},
            {"step": 25, "loss": 3.8},
            {"step": 25, "loss": 3.7},
            {"step": 30, "loss": 3.5, "evalLoss": 3.6},
        ],
    )
    with log.open("a") as out:
        out.write('{"step": 35, "lo')  # the kill cut this line
    train, evaluation = plots.read_curves(log)
    assert train == [(5, 6.0), (10, 5.0), (15, 4.0), (20, 3.9), (25, 3.7), (30, 3.5)]
    assert evaluation == [(10, 5.5), (30, 3.6)]
    picture = plots.plot_losses(log, tmp_path / "plot" / "loss.png", "job")
    assert picture is not None and picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_losses_no_plot_and_a_failed_drawing_is_only_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert plots.plot_losses(tmp_path / "absent.jsonl", tmp_path / "a.png", "job") is None
    empty = write_log(tmp_path / "empty.jsonl", [{"step": 5, "learningRate": 0.1}])
    assert plots.plot_losses(empty, tmp_path / "b.png", "job") is None
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()
    log = write_log(tmp_path / "train_log.jsonl", [{"step": 5, "loss": 1.0}])
    (tmp_path / "blocked").write_text("a file where the picture's directory should be")
    with caplog.at_level(logging.WARNING):
        assert plots.plot_losses(log, tmp_path / "blocked" / "loss.png", "job") is None
    assert "could not draw" in caplog.text


def test_trackers_write_into_the_output_offline_unless_the_job_says_otherwise() -> None:
    chosen = [ReportTo.TENSORBOARD, ReportTo.MLFLOW, ReportTo.WANDB]
    assert trackers.environment(chosen, "/out", "job", {}) == {
        "TENSORBOARD_LOGGING_DIR": "/out/runs",
        "MLFLOW_TRACKING_URI": "/out/mlruns",
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "MLFLOW_EXPERIMENT_NAME": "job",
        "WANDB_DIR": "/out",
        "WANDB_PROJECT": "job",
        "WANDB_MODE": "offline",
    }
    # the job's env (a tracking server, a W&B key from envFrom) wins; with a key W&B goes online
    user = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "WANDB_API_KEY": "k"}
    assert trackers.environment(chosen, "/out", "job", user) == {
        "TENSORBOARD_LOGGING_DIR": "/out/runs",
        "MLFLOW_EXPERIMENT_NAME": "job",
        "WANDB_DIR": "/out",
        "WANDB_PROJECT": "job",
    }
    assert trackers.environment([], "/out", "job", {}) == {}


def test_trackers_are_named_once_and_one_the_image_lacks_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert trackers.check([ReportTo.WANDB, ReportTo.TENSORBOARD, ReportTo.WANDB]) == ["wandb", "tensorboard"]
    real = importlib.util.find_spec
    # as in the trainer image, which ships tensorboard but not mlflow or wandb
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name in ("mlflow", "wandb") else real(name)
    )
    with pytest.raises(ConfigurationError) as refused:
        trackers.check([ReportTo.TENSORBOARD, ReportTo.MLFLOW, ReportTo.WANDB])
    assert str(refused.value).startswith("training.reportTo mlflow, wandb: this image lacks the mlflow wandb")
    assert "pip install mlflow wandb" in str(refused.value)
