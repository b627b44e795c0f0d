"""What rank 0 shows while it trains, and the log it leaves: readable without TensorBoard.

On a terminal (`ftctl train`), a progress bar with the step, loss, tokens/s and time left; elsewhere (a
pod's log) one plain line per logging step. Either way every logged step is appended to
`train_log.jsonl` in the output directory, one JSON object per line, so a loss curve survives the run
(and a resumed run continues it).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from finetune_operator.api.trainer import ProgressReport, format_duration

log = logging.getLogger("finetune_trainer")


def progress_line(report: ProgressReport, with_step: bool = True) -> str:
    """`step 20/60 (33%) loss 5.753 lr 9.5e-03 1,234 tokens/s ETA 11s`."""
    parts = []
    if with_step:
        percent = f" ({report.step * 100 // report.total_steps}%)" if report.total_steps else ""
        parts.append(f"step {report.step}/{report.total_steps}{percent}")
    if report.loss is not None:
        parts.append(f"loss {report.loss:.4g}")
    if report.eval_loss is not None:
        parts.append(f"eval loss {report.eval_loss:.4g}")
    if report.learning_rate is not None:
        parts.append(f"lr {report.learning_rate:.1e}")
    if report.tokens_per_second:
        parts.append(f"{report.tokens_per_second:,.0f} tokens/s")
    eta = report.eta_seconds()
    if eta is not None:
        parts.append(f"ETA {format_duration(eta)}")
    return " ".join(parts)


class Console:
    """A tqdm bar on a terminal, plain log lines otherwise (rank 0 only)."""

    def __init__(self, terminal: bool) -> None:
        self.terminal = terminal
        self.bar: Any = None

    def start(self, total_steps: int, step: int) -> None:
        if self.terminal:
            self.bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True)

    def step(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def show(self, report: ProgressReport) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(progress_line(report, with_step=False), refresh=True)
        else:
            log.info("%s", progress_line(report))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TrainLog:
    """`train_log.jsonl`: one object per logged step, appended (a resumed run continues the file)."""

    FIELDS = ("step", "totalSteps", "epoch", "loss", "evalLoss", "learningRate", "tokensPerSecond", "tokens")

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, report: ProgressReport) -> None:
        data = report.model_dump(mode="json", by_alias=True, exclude_none=True)
        record = {key: data[key] for key in self.FIELDS if key in data}
        record["time"] = report.updated_at
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as out:
            out.write(json.dumps(record, separators=(",", ":")) + "\n")
