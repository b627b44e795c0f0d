"""The loss curve as a picture (`training_loss.png`), drawn from `train_log.jsonl` when a run ends.

Drawn from the log file rather than from memory so that a job restarted from a checkpoint shows its
whole history: every attempt appended to the same file. An attempt that resumed from an earlier step
logs some steps again; the later record of a step wins, as it is the one the saved model descends from.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

Curve = list[tuple[int, float]]


def read_curves(train_log: Path) -> tuple[Curve, Curve]:
    """(training loss, evaluation loss) by step; unreadable lines are skipped (a line cut by a kill)."""
    train: dict[int, float] = {}
    evaluation: dict[int, float] = {}
    for line in train_log.read_text().splitlines():
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(record.get("loss"), int | float):
            train[step] = float(record["loss"])
        if isinstance(record.get("evalLoss"), int | float):
            evaluation[step] = float(record["evalLoss"])
    return sorted(train.items()), sorted(evaluation.items())


def plot_losses(train_log: Path, picture: Path, title: str) -> Path | None:
    """Draw the curves into `picture`; None when there is nothing to draw. A picture that cannot be drawn
    is a warning, never a failure: by now the model is saved, and failing would restart a finished job."""
    try:
        train, evaluation = read_curves(train_log) if train_log.exists() else ([], [])
        if not train and not evaluation:
            return None
        import matplotlib

        matplotlib.use("Agg")  # no display in a pod or over ssh
        from matplotlib import pyplot

        figure, axes = pyplot.subplots(figsize=(8, 4.5), dpi=100)
        for curve, label, style in ((train, "training loss", "-"), (evaluation, "evaluation loss", "o--")):
            if curve:
                axes.plot([s for s, _ in curve], [v for _, v in curve], style, label=label)
        axes.set_xlabel("step")
        axes.set_ylabel("loss")
        axes.set_title(title)
        axes.grid(True, alpha=0.3)
        axes.legend()
        figure.tight_layout()
        picture.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(picture)
        pyplot.close(figure)
        return picture
    except Exception as exc:
        log.warning("could not draw %s: %s", picture, exc)
        return None
