"""The operator-trainer contract: the trainer config the operator renders, and the progress rank 0 reports.

The user-facing blocks (`model`, `dataset`, `method`, `training`, `checkpointing`, `output`) are the API
models themselves, embedded unchanged, so the trainer cannot drift from what `kubectl apply` validated.
Next to them sit the fields only the operator knows: where the URIs are mounted (`paths`, `mounts`), the
planned layout (`zeroStage`, `offload`, `worldSize`), the estimate to compare against, and how to report
progress. The trainer imports this module; the operator never imports the trainer.

The trainer image provides two commands (console scripts, so nothing here names the trainer's modules):
`finetune-launch` is torchrun keeping the workers' exit codes, `finetune-train --config FILE` one worker:

    finetune-launch --nnodes N --nproc_per_node G ... --no-python finetune-train --config trainer_config.yaml
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import ClassVar, Literal

import yaml
from pydantic import Field

from finetune_operator.api.base import ApiModel, Rule
from finetune_operator.api.enums import AttentionImpl, Offload
from finetune_operator.api.methods import METHODS
from finetune_operator.api.models import (
    CheckpointingSpec,
    DatasetSpec,
    MethodSpec,
    ModelSpec,
    OutputSpec,
    ProgressStatus,
    TrainingSpec,
)
from finetune_operator.api.text import gib

#: torchrun behind a wrapper that exits with the first failed worker's own code (torchrun alone always
#: exits 1), so the operator can tell a configuration error (never retried) from a preemption.
LAUNCH_COMMAND = "finetune-launch"
#: One worker process; torchrun runs it with `--no-python`.
TRAIN_COMMAND = "finetune-train"
#: What the trainer is doing, as reported in ProgressReport.state.
ProgressState = Literal["starting", "training", "saving", "completed", "failed"]
#: The pod annotation rank 0 writes its `ProgressReport` to; the operator copies it into status.
PROGRESS_ANNOTATION = "finetune.dev/progress"
#: The file the file reporter writes (in the output directory unless `progress.path` says otherwise).
PROGRESS_FILE = "progress.json"
#: Where every worker serves /metrics (declared as the worker container's `metrics` port, which the
#: chart's PodMonitor scrapes): the Prometheus exporter port OpenTelemetry registered, clear of DCGM's 9400.
METRICS_PORT = 9464
#: Written into the output directory at the end of a run.
SUMMARY_FILE = "training_summary.json"
#: One JSON object per logged step in the output directory (step, loss, learning rate, tokens/s, ...), as
#: LLaMA-Factory's trainer_log.jsonl: a loss curve to plot without TensorBoard.
TRAIN_LOG_FILE = "train_log.jsonl"
#: The training (and evaluation) loss against the step, drawn from TRAIN_LOG_FILE at the end of a run, so
#: the curve covers every attempt of a resumed job.
LOSS_PLOT_FILE = "training_loss.png"
#: Where a failing worker writes its one-line reason (the container's terminationMessagePath): Kubernetes
#: copies it into the pod's status, and the operator into the job's Failed or Restarting condition.
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
#: The rendered trainer config the operator mounts and ftctl writes.
CONFIG_FILE = "trainer_config.yaml"
#: The attention kernels (`model.attentionImplementation`) the image built from Dockerfile.trainer has:
#: PyTorch's own. flash_attention_2 needs the flash-attn package, built against the image's CUDA and torch.
IMAGE_ATTENTION: tuple[AttentionImpl, ...] = (AttentionImpl.SDPA, AttentionImpl.EAGER)

#: libyaml's dumper where PyYAML was built with it (its wheels are), else the pure-Python one.
SAFE_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class ResolvedPaths(ApiModel):
    """Local paths the operator resolved from the job's URIs (pvc:// becomes a mount path).

    `model` and `dataset` are None when the trainer loads them from the Hugging Face hub by name/URI;
    `output` and `checkpoints` are always local directories, because a checkpoint must survive the pod.
    """

    model: str | None = Field(default=None, description="Directory holding config.json and weights, or hub.")
    dataset: str | None = Field(default=None, description="Local file or directory of the data set, or hub.")
    output: str = Field(min_length=1, description="Directory the adapter/model and summary are written to.")
    checkpoints: str = Field(min_length=1, description="Directory holding checkpoint-N subdirectories.")


class DeepSpeedBuckets(ApiModel):
    """ZeRO's communication buckets, in elements, as the planner sized them and the estimator counts them.

    DeepSpeed allocates its reduce bucket at full size whatever it reduces (twice with overlap_comm): its
    default of 5e8 elements is 2 GB of bf16 beside a LoRA's few million gradients. The planner caps each
    bucket at what it could ever hold, so what the estimate counts is what DeepSpeed allocates.
    """

    reduce: int = Field(ge=1, description="reduce_bucket_size: gradient elements reduced together.")
    prefetch: int = Field(
        ge=1, description="ZeRO-3's stage3_prefetch_bucket_size: parameters gathered ahead."
    )


class ProgressSettings(ApiModel):
    """How rank 0 reports progress, and where every worker serves Prometheus metrics."""

    reporter: Literal["pod-annotation", "file", "none"] = Field(
        default="file",
        description="pod-annotation: patch finetune.dev/progress on the worker's own pod (in-cluster); "
        "file: write progress.json (local runs, tests); none: only log.",
    )
    path: str | None = Field(
        default=None, description="File for the file reporter; default progress.json in the output directory."
    )
    interval_seconds: float = Field(
        default=10.0,
        ge=0.0,
        description="Least time between two reports, in seconds; bounds API-server writes to one per 10 s "
        "per job by default. Final reports (completion, checkpoint) are never throttled.",
    )
    metrics_port: int | None = Field(
        default=METRICS_PORT,
        ge=0,
        le=65535,
        description="Port every worker serves /metrics on (0: any free port; null: no metrics server). "
        "9464 is the Prometheus exporter port OpenTelemetry registered, clear of DCGM's 9400.",
    )


class TrainerConfig(ApiModel):
    """Everything a worker needs; `kubectl get` shows the job, this is what the trainer sees."""

    job_name: str = Field(min_length=1, max_length=253, description="The FineTuneJob's name (logs, metrics).")
    model: ModelSpec
    dataset: DatasetSpec
    method: MethodSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    checkpointing: CheckpointingSpec = Field(default_factory=CheckpointingSpec)
    output: OutputSpec
    paths: ResolvedPaths
    mounts: dict[str, str] = Field(
        default_factory=dict, description="PVC claim name → mount path in the worker, for pvc:// URIs."
    )
    zero_stage: int = Field(default=0, ge=0, le=3, description="DeepSpeed ZeRO stage the planner chose.")
    offload: Offload = Field(default=Offload.NONE, description="What ZeRO offloads to host memory.")
    world_size: int = Field(default=1, ge=1, description="Total worker processes (GPUs) the plan launches.")
    estimate_bytes: int | None = Field(
        default=None, ge=0, description="The operator's per-GPU peak estimate, echoed in the summary."
    )
    buckets: DeepSpeedBuckets | None = Field(
        default=None, description="ZeRO's bucket sizes from the plan; none: DeepSpeed's defaults."
    )
    progress: ProgressSettings = Field(default_factory=ProgressSettings)

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.offload == 'none' || self.zeroStage >= 1",
            message="offload needs ZeRO stage 1 or higher",
            check=lambda s: s.offload == Offload.NONE or s.zero_stage >= 1,
        ),
        Rule(
            cel="self.offload != 'all' || self.zeroStage == 3",
            message="offload all (parameters) needs ZeRO stage 3",
            check=lambda s: s.offload != Offload.ALL or s.zero_stage == 3,
        ),
    )

    @property
    def is_classification(self) -> bool:
        return self.dataset.format == "classification"

    @property
    def uses_peft(self) -> bool:
        return METHODS[self.method.type].peft

    def to_yaml(self) -> str:
        # libyaml's emitter (same output, a fifth of the time: the operator renders one per job and attempt).
        return yaml.dump(
            self.model_dump(mode="json", by_alias=True, exclude_none=True),
            Dumper=SAFE_DUMPER,
            sort_keys=False,
        )

    @classmethod
    def from_yaml(cls, text: str) -> TrainerConfig:
        """Parse a rendered config, YAML or JSON (JSON is YAML, so one parser serves both).

        Raises pydantic.ValidationError or yaml.YAMLError; the trainer maps both to the config-error exit.
        """
        return cls.model_validate(yaml.safe_load(text))


# --- progress: the one payload trainer and operator share -----------------------------------------------


class ProgressReport(ApiModel):
    """What rank 0 reports (as JSON in the `finetune.dev/progress` pod annotation, or progress.json).

    Counts are cumulative over restarts: after a resume `step` continues from the checkpoint.
    """

    state: ProgressState = Field(default="training", description="What the trainer is doing.")
    step: int = Field(default=0, ge=0, description="Optimizer steps done.")
    total_steps: int = Field(default=0, ge=0, description="Optimizer steps planned.")
    epoch: float = Field(default=0.0, ge=0.0, description="Epochs done (fractional).")
    loss: float | None = Field(default=None, description="Latest training loss.")
    eval_loss: float | None = Field(default=None, description="Latest evaluation loss.")
    learning_rate: float | None = Field(default=None, description="Current learning rate.")
    tokens_per_second: float | None = Field(default=None, ge=0.0, description="Throughput over all workers.")
    peak_memory_bytes: int | None = Field(default=None, ge=0, description="Peak GPU memory on rank 0.")
    tokens: int | None = Field(
        default=None, ge=0, description="Input tokens trained on over all workers (restored on resume)."
    )
    elapsed_seconds: float = Field(default=0.0, ge=0.0, description="Wall time of this attempt so far.")
    steps_this_attempt: int = Field(default=0, ge=0, description="Steps since this attempt (re)started.")
    last_checkpoint_step: int | None = Field(default=None, ge=0, description="Newest complete checkpoint.")
    last_checkpoint_path: str | None = Field(default=None, description="Where that checkpoint is.")
    updated_at: str = Field(
        default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"),
        description="When it was reported (RFC 3339).",
    )

    def to_json(self) -> str:
        return json.dumps(
            self.model_dump(mode="json", by_alias=True, exclude_none=True), separators=(",", ":")
        )

    @classmethod
    def from_json(cls, text: str) -> ProgressReport:
        return cls.model_validate_json(text)

    def eta_seconds(self) -> float | None:
        """Time left at this attempt's step rate; None before the first step (no rate yet)."""
        if self.steps_this_attempt <= 0 or self.elapsed_seconds <= 0 or self.total_steps <= 0:
            return None
        rate = self.steps_this_attempt / self.elapsed_seconds
        return max(self.total_steps - self.step, 0) / rate

    def to_status(self) -> ProgressStatus:
        """The job status block the operator writes, derived here so operator and trainer agree."""
        percent = min(100, self.step * 100 // self.total_steps) if self.total_steps else 0
        eta = self.eta_seconds()
        return ProgressStatus(
            step=self.step,
            total_steps=self.total_steps,
            epoch=self.epoch,
            percent=percent,
            loss=significant(self.loss),
            eval_loss=significant(self.eval_loss),
            learning_rate=self.learning_rate,
            tokens_per_second=self.tokens_per_second,
            peak_memory_bytes=self.peak_memory_bytes,
            peak_memory=None if self.peak_memory_bytes is None else gib(self.peak_memory_bytes),
            tokens=self.tokens,
            eta=None if eta is None else format_duration(eta),
            eta_seconds=None if eta is None else round(eta),
            display=f"{percent}% ({self.step}/{self.total_steps})",
            updated_at=self.updated_at,
        )


def significant(value: float | None, digits: int = 4) -> float | None:
    """A loss to `digits` significant digits: what a kubectl column shows (5.753, not 5.753318023681641);
    the trainer's metrics keep full precision."""
    return None if value is None else float(f"{value:.{digits}g}")


def format_duration(seconds: float) -> str:
    """1h02m, 5m03s or 42s: short enough for a kubectl column."""
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
