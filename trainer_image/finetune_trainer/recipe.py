"""The training recipe: setup → train → save → cleanup, in that order, one function each.

Why HF Trainer and not a hand-written loop: it already drives DeepSpeed (ZeRO 0-3, offload, resuming the
engine's sharded state), PEFT models, evaluation, early stopping and gradient checkpointing through
accelerate, identically on CUDA/NCCL and on CPU/gloo (DeepSpeed's CPU accelerator, `DS_ACCELERATOR=cpu`,
falls back to gloo when oneCCL is absent), so the CPU tests exercise the code path the GPU pods run.
What it lacks is added as callbacks: atomic checkpoint markers and rotation, SIGTERM → checkpoint → exit,
and progress reporting.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from transformers import (
    EarlyStoppingCallback,
    PreTrainedTokenizerBase,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    set_seed,
)

from finetune_operator.api.enums import AttentionImpl, Optimizer, Precision
from finetune_operator.api.exit_codes import ExitCode
from finetune_operator.api.methods import MERGE_RULE, METHODS
from finetune_operator.api.models import TrainingSpec
from finetune_operator.api.trainer import (
    LOSS_PLOT_FILE,
    SUMMARY_FILE,
    TRAIN_LOG_FILE,
    ProgressReport,
    ProgressState,
    TrainerConfig,
)
from finetune_trainer import checkpoints, export, methods, plots, trackers
from finetune_trainer.console import Console, TrainLog
from finetune_trainer.data import DataBundle, build_datasets
from finetune_trainer.deepspeed import bf16_engine, render_deepspeed_config
from finetune_trainer.exit_codes import ConfigurationError
from finetune_trainer.methods import MethodBuilder
from finetune_trainer.model import count_parameters, load_model, load_tokenizer, model_source, torch_dtype
from finetune_trainer.progress import ThrottledReporter, TrainerMetrics, build_reporter, start_metrics

log = logging.getLogger(__name__)

OPTIMIZERS = {
    Optimizer.ADAMW: "adamw_torch",
    Optimizer.ADAMW_8BIT: "adamw_bnb_8bit",
    Optimizer.PAGED_ADAMW_8BIT: "paged_adamw_8bit",
    Optimizer.SGD: "sgd",
}
#: Where a merged LoRA model goes (output.saveMerged), beside the adapter in the output directory.
MERGED_SUBDIR = "merged"


# --- preemption -----------------------------------------------------------------------------------------


class Preemption:
    """SIGTERM (preemption, suspend, eviction) sets a flag; the callback acts on it at a step boundary.

    The handler only sets the flag: saving inside a signal handler would run collectives in the middle
    of a backward pass. Ranks may see the signal at different steps (pods are signalled one by one), so
    the flag is all-reduced at each step end and every rank stops at the same step.
    """

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        log.warning("SIGTERM: saving a checkpoint at the next step boundary, then exiting")
        self.requested = True

    def agreed(self, device: torch.device) -> bool:
        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        flag = torch.tensor([1 if self.requested else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.requested = bool(flag.item())
        return self.requested


# --- callbacks ------------------------------------------------------------------------------------------


@dataclass
class RunStats:
    """What the progress callback has seen; feeds progress reports and the summary."""

    start_time: float = field(default_factory=time.monotonic)
    start_step: int = 0
    start_tokens: int = 0
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    last_checkpoint: checkpoints.Checkpoint | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)


def peak_memory() -> tuple[int | None, int | None]:
    """(max allocated, max reserved) GPU bytes on this rank; None on CPU, where there is no GPU to size."""
    if not torch.cuda.is_available():
        return None, None
    return int(torch.cuda.max_memory_allocated()), int(torch.cuda.max_memory_reserved())


class ProgressCallback(TrainerCallback):
    """Turns HF's logs into ProgressReports (rank 0) and Prometheus gauges (every rank)."""

    def __init__(
        self,
        stats: RunStats,
        reporter: ThrottledReporter | None,
        metrics: TrainerMetrics,
        console: Console | None = None,
        train_log: TrainLog | None = None,
    ) -> None:
        self.stats, self.reporter, self.metrics = stats, reporter, metrics
        self.console, self.train_log = console, train_log

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.stats.start_time = time.monotonic()
        self.stats.start_step = state.global_step
        self.stats.start_tokens = int(state.num_input_tokens_seen)
        if self.console is not None:
            self.console.start(state.max_steps, state.global_step)
        self.send(state, "training", force=True)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.console is not None:
            self.console.step(state.global_step)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.console is not None:
            self.console.close()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        logs = logs or {}
        if "loss" in logs:
            self.stats.loss = float(logs["loss"])
            self.stats.losses.append((state.global_step, self.stats.loss))
        if "eval_loss" in logs:
            self.stats.eval_loss = float(logs["eval_loss"])
            self.stats.eval_losses.append((state.global_step, self.stats.eval_loss))
        if "learning_rate" in logs:
            self.stats.learning_rate = float(logs["learning_rate"])
        elapsed = time.monotonic() - self.stats.start_time
        tokens = int(state.num_input_tokens_seen) - self.stats.start_tokens
        if elapsed > 0 and tokens > 0:
            self.stats.tokens_per_second = tokens / elapsed
        report = self.send(state, "training")
        if "loss" in logs or "eval_loss" in logs:
            if self.console is not None:
                self.console.show(report)
            if self.train_log is not None:
                self.train_log.append(report)

    def send(self, state: TrainerState, phase: ProgressState, force: bool = False) -> ProgressReport:
        report = self.build(state, phase)
        self.metrics.update(report)
        if self.reporter is not None:
            self.reporter.report(report, force=force)
        return report

    def build(self, state: TrainerState, phase: ProgressState) -> ProgressReport:
        ckpt = self.stats.last_checkpoint
        return ProgressReport(
            state=phase,
            step=state.global_step,
            total_steps=state.max_steps,
            epoch=float(state.epoch or 0.0),
            loss=self.stats.loss,
            eval_loss=self.stats.eval_loss,
            learning_rate=self.stats.learning_rate,
            tokens_per_second=self.stats.tokens_per_second,
            peak_memory_bytes=peak_memory()[0],
            tokens=int(state.num_input_tokens_seen),
            elapsed_seconds=time.monotonic() - self.stats.start_time,
            steps_this_attempt=state.global_step - self.stats.start_step,
            last_checkpoint_step=ckpt.step if ckpt else None,
            last_checkpoint_path=str(ckpt.path) if ckpt else None,
        )


class CheckpointCallback(TrainerCallback):
    """Marks each checkpoint complete once every rank has written it, rotates, and handles SIGTERM."""

    def __init__(self, root: str, keep: int, preemption: Preemption, progress: ProgressCallback) -> None:
        self.root, self.keep, self.preemption, self.progress = root, keep, preemption, progress

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.preemption.agreed(args.device):
            control.should_save = True
            control.should_training_stop = True

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank's shards are on disk before the marker says so
        path = Path(self.root) / f"{checkpoints.PREFIX}{state.global_step}"
        if state.is_world_process_zero:
            checkpoints.mark_complete(path, state.global_step)
            checkpoints.prune(self.root, self.keep)
            log.info("checkpoint %s complete", path)
        self.progress.stats.last_checkpoint = checkpoints.Checkpoint(state.global_step, path, True)
        self.progress.send(state, "training", force=True)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # no rank races ahead into a save that pruning could touch


# --- setup ----------------------------------------------------------------------------------------------


@dataclass
class Session:
    """Everything `setup` built; `train`, `save` and `cleanup` take it."""

    config: TrainerConfig
    method: MethodBuilder
    args: TrainingArguments
    tokenizer: PreTrainedTokenizerBase
    model: torch.nn.Module
    data: DataBundle
    trainer: Trainer
    stats: RunStats
    preemption: Preemption
    progress: ProgressCallback
    trainable_params: int
    total_params: int
    quantized_layers: int
    wall_start: float = field(default_factory=time.monotonic)


def check_combination(config: TrainerConfig) -> MethodBuilder:
    """Refuse, before loading anything, what cannot run; the messages land in the job's status."""
    method = methods.check(config)
    if not MERGE_RULE.check(config):
        raise ConfigurationError(MERGE_RULE.message)
    if not torch.cuda.is_available() and config.training.precision == Precision.FP16:
        raise ConfigurationError("training.precision fp16 needs a GPU; use bf16 or fp32 on CPU")
    if config.model.attention_implementation == AttentionImpl.FLASH_ATTENTION_2:
        if not torch.cuda.is_available():
            raise ConfigurationError("model.attentionImplementation flash_attention_2 needs a GPU; use sdpa")
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigurationError(
                "model.attentionImplementation flash_attention_2: this image has no flash-attn package; "
                "use sdpa (the default) or eager, or an image with flash-attn"
            )
    if (
        uses_liger(config, on_gpu=torch.cuda.is_available())
        and importlib.util.find_spec("liger_kernel") is None
    ):
        raise ConfigurationError(
            "training.useLigerKernel: this image has no liger-kernel package (the plan counted its smaller "
            "loss); set it to false, or use an image with liger-kernel"
        )
    return method


def uses_liger(config: TrainerConfig, *, on_gpu: bool) -> bool:
    """Liger's kernels are Triton (GPUs only) and patch causal LMs; a classifier's loss is small anyway.
    A model type Liger does not know trains unpatched (transformers logs a warning). Not under ZeRO-3:
    the fused loss reads the LM head's weight by attribute, never running the head's module, so
    DeepSpeed's gather hook does not fire and the kernel gets an empty partition (TRL hit the same in
    its own Liger losses); the estimator counts the plain loss there."""
    return (
        config.training.use_liger_kernel and on_gpu and not config.is_classification and config.zero_stage < 3
    )


def cast_fp32_to_bf16(model: torch.nn.Module) -> int:
    """Every fp32 parameter in bf16, for `training.pureBf16`: PEFT makes adapters and virtual tokens in
    fp32 and QLoRA's k-bit preparation upcasts norms and embeddings. DeepSpeed's bf16 engine would cast
    them as it wraps the model, but without ZeRO it stays off (`bf16_engine`). Returns how many moved."""
    moved = 0
    for param in model.parameters():
        if param.dtype == torch.float32:
            param.data = param.data.to(torch.bfloat16)
            moved += 1
    return moved


def optimizer_name(training: TrainingSpec) -> str:
    """HF's name for the spec's optimizer: AdamW fused unless `fusedOptimizer` is off (HF's own default
    since torch 2.8; the foreach one launches several kernels per parameter tensor)."""
    if training.optimizer == Optimizer.ADAMW and training.fused_optimizer:
        return "adamw_torch_fused"
    return OPTIMIZERS[training.optimizer]


def training_arguments(config: TrainerConfig, has_eval: bool, report_to: list[str]) -> TrainingArguments:
    """HF TrainingArguments from the spec; creating them also registers the DeepSpeed config, which
    ZeRO-3 needs before the model is loaded (weights are partitioned as they load). `report_to` names
    the trackers `trackers.prepare` checked."""
    t, ckpt = config.training, config.checkpointing
    on_gpu = torch.cuda.is_available()
    eval_strategy = "no"
    if has_eval:
        eval_strategy = "steps" if t.eval_steps else "epoch"
    early = t.early_stopping
    return TrainingArguments(
        output_dir=config.paths.checkpoints,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=min(t.warmup_ratio, 0.999),  # a float below 1 is a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        bf16=bf16_engine(config),
        fp16=t.precision == Precision.FP16,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        optim=optimizer_name(t),
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        eval_strategy=eval_strategy,
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=ckpt.save_steps,
        save_total_limit=None,  # rotation is CheckpointCallback's, after the completion marker
        metric_for_best_model=early.metric if early else None,
        greater_is_better=False if early else None,
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        report_to=report_to or "none",
        run_name=config.job_name,
        disable_tqdm=True,
        use_liger_kernel=uses_liger(config, on_gpu=on_gpu),
        use_cpu=not on_gpu,
        deepspeed=render_deepspeed_config(config, "cuda" if on_gpu else "cpu"),
    )


def setup(config: TrainerConfig, preemption: Preemption) -> Session:
    method = check_combination(config)
    report_to = trackers.prepare(config.training.report_to, config.paths.output, config.job_name)
    set_seed(config.training.seed)
    tokenizer = load_tokenizer(config)
    # a validationSplit above 0 always holds out at least one example (data.packing.split_indices)
    args = training_arguments(config, has_eval=config.dataset.validation_split > 0, report_to=report_to)
    # each node's first worker reads and tokenises into the cache on the output volume; the others wait,
    # then load that (and so does every later attempt of the job)
    with args.main_process_first(desc="tokenising the data set"):
        data = build_datasets(
            config.dataset,
            tokenizer,
            seed=config.training.seed,
            local_path=config.paths.dataset,
            cache_root=config.paths.output,
            can_share_rows=METHODS[config.method.type].packing,
            varlen_attention=config.model.attention_implementation == AttentionImpl.FLASH_ATTENTION_2,
        )
    quantization = method.quantization(config)
    device_map = None
    if quantization is not None and config.zero_stage < 3:
        device_map = {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}
    base = load_model(config, tokenizer, quantization=quantization, device_map=device_map)
    if data.label_names:
        base.config.id2label = dict(enumerate(data.label_names))
        base.config.label2id = {name: i for i, name in enumerate(data.label_names)}
    model = method.apply(base, config)
    if config.training.pure_bf16:
        log.info("pure bf16: %d fp32 parameter tensors cast to bf16", cast_fp32_to_bf16(model))
    trainable, total = count_parameters(model)
    # bitsandbytes' own 4-bit layers; PEFT's LoRA wrapper around one is also named Linear4bit, not counted.
    quantized = sum(
        1
        for m in model.modules()
        if type(m).__module__.startswith("bitsandbytes") and "4bit" in type(m).__name__
    )
    if trainable == 0:
        raise ConfigurationError(f"method {config.method.type.value} left no trainable parameters")
    log.info(
        "method %s: %d trainable of %d parameters (%.4f%%)",
        config.method.type.value,
        trainable,
        total,
        100 * trainable / total,
    )
    if args.world_size != config.world_size:
        log.warning("planned for %d workers, running on %d", config.world_size, args.world_size)
    stats = RunStats()
    rank = args.process_index
    metrics = start_metrics(config.job_name, rank, config.progress.metrics_port)
    reporter = build_reporter(config) if args.should_save else None
    console = Console(terminal=sys.stderr.isatty()) if args.should_save else None
    train_log = TrainLog(Path(config.paths.output) / TRAIN_LOG_FILE) if args.should_save else None
    progress = ProgressCallback(stats, reporter, metrics, console, train_log)
    callbacks: list[TrainerCallback] = [
        progress,
        CheckpointCallback(
            config.paths.checkpoints, config.checkpointing.save_total_limit, preemption, progress
        ),
    ]
    if config.training.early_stopping is not None:
        early = config.training.early_stopping
        callbacks.append(
            EarlyStoppingCallback(
                early_stopping_patience=early.patience, early_stopping_threshold=early.threshold
            )
        )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=data.collator,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # raw dicts of strings; the console shows readable lines
    return Session(
        config,
        method,
        args,
        tokenizer,
        model,
        data,
        trainer,
        stats,
        preemption,
        progress,
        trainable,
        total,
        quantized,
    )


# --- train ----------------------------------------------------------------------------------------------


#: How torch and PEFT say a checkpoint's tensors do not fit the model (a changed LoRA rank, target
#: modules or model): retrying would fail the same way.
MISMATCH_SIGNS = ("size mismatch", "Missing key(s)", "Unexpected key(s)")


def train(session: Session) -> bool:
    """Train, resuming from the newest complete checkpoint; False when stopped by SIGTERM."""
    root = session.config.paths.checkpoints
    if session.args.should_save:
        for path in checkpoints.remove_partial(root):
            log.warning("removed partial checkpoint %s", path)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    resume = checkpoints.latest_complete(root)
    if resume is not None:
        log.info("resuming from %s (step %d)", resume.path, resume.step)
        session.stats.last_checkpoint = resume
    try:
        session.trainer.train(resume_from_checkpoint=str(resume.path) if resume else None)
    except (RuntimeError, FileNotFoundError) as exc:
        # A checkpoint without the files this configuration reads (DeepSpeed names its optimizer shards
        # by precision and ZeRO stage) was written by another one, as is one whose tensors do not fit.
        missing = isinstance(exc, FileNotFoundError) and resume is not None and str(resume.path) in str(exc)
        if resume is None or not (missing or any(sign in str(exc) for sign in MISMATCH_SIGNS)):
            raise
        first = str(exc).strip().splitlines()[-1][:300]
        raise ConfigurationError(
            f"{resume.path} was saved by a different configuration ({first}); resume with the spec it was "
            "made with, or train into a new output directory"
        ) from exc
    return not session.preemption.requested


# --- save -----------------------------------------------------------------------------------------------


def save(session: Session) -> dict[str, Any]:
    """The adapter (or full model) and tokenizer into the output directory, an optional merged model,
    and training_summary.json; returns the summary."""
    config, trainer = session.config, session.trainer
    output = Path(config.paths.output)
    if not config.is_classification:
        model_config = getattr(session.model, "config", None)
        if model_config is not None:  # off for training (load_model); the saved model generates
            model_config.use_cache = True
    trainer.save_model(str(output))  # gathers ZeRO-3 partitions; PEFT models save only the adapter
    if session.args.should_save:
        session.tokenizer.save_pretrained(str(output))
    if config.output.save_merged:
        if session.args.should_save:
            merge_adapter(config, output, session.tokenizer)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    summary = build_summary(session)
    if session.args.should_save:
        (output / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        plots.plot_losses(output / TRAIN_LOG_FILE, output / LOSS_PLOT_FILE, config.job_name)
    return summary


def merge_adapter(config: TrainerConfig, output: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """The saved adapter merged into its base (export.merge, as `ftctl export` does) in output/merged."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # Training is over: without this, from_pretrained on rank 0 alone would enter ZeRO-3's collective
    # partitioning (zero.Init) and wait forever for the other ranks.
    unset_hf_deepspeed_config()  # type: ignore[no-untyped-call]
    num_labels = config.dataset.num_labels if config.is_classification else None
    merged = output / MERGED_SUBDIR
    export.merge(model_source(config), output, merged, torch_dtype(config.training.precision), num_labels)
    tokenizer.save_pretrained(str(merged))


def build_summary(session: Session) -> dict[str, Any]:
    state = session.trainer.state
    stats = session.stats
    wall = time.monotonic() - session.wall_start
    train_time = time.monotonic() - stats.start_time
    steps = state.global_step - stats.start_step
    allocated, reserved = peak_memory()
    return {
        "jobName": session.config.job_name,
        "method": session.config.method.type.value,
        "zeroStage": session.config.zero_stage,
        "worldSize": session.args.world_size,
        "steps": state.global_step,
        "stepsThisAttempt": steps,
        "resumedFromStep": stats.start_step or None,
        "epochs": state.epoch,
        "finalLoss": stats.losses[-1][1] if stats.losses else None,
        "bestLoss": min(loss for _, loss in stats.losses) if stats.losses else None,
        "finalEvalLoss": stats.eval_losses[-1][1] if stats.eval_losses else None,
        "bestEvalLoss": min(loss for _, loss in stats.eval_losses) if stats.eval_losses else None,
        "lossHistory": [[step, loss] for step, loss in stats.losses],
        "tokens": int(state.num_input_tokens_seen),
        "tokensPerSecond": stats.tokens_per_second,
        "stepsPerSecond": steps / train_time if train_time > 0 else None,
        "wallSeconds": wall,
        "trainableParams": session.trainable_params,
        "totalParams": session.total_params,
        "quantizedLayers": session.quantized_layers,
        "peakGpuMemoryAllocatedBytes": allocated,
        "peakGpuMemoryReservedBytes": reserved,
        "estimatedPerGpuBytes": session.config.estimate_bytes,
    }


# --- cleanup and the whole recipe -------------------------------------------------------------------------


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run(config: TrainerConfig) -> ExitCode:
    """setup → train → save → cleanup. Exceptions escape to the entry point, which maps them to codes."""
    preemption = Preemption()
    preemption.install()
    session = setup(config, preemption)
    completed = train(session)
    if not completed:
        log.warning(
            "stopped by SIGTERM after saving step %d; exiting to be restarted",
            session.trainer.state.global_step,
        )
        cleanup()
        return ExitCode.RETRYABLE
    summary = save(session)
    session.progress.send(session.trainer.state, "completed", force=True)
    if session.args.should_save:
        log.info(
            "done: %d steps, final loss %s; saved to %s (%s, %s, %s)",
            summary["steps"],
            "n/a" if summary["finalLoss"] is None else f"{summary['finalLoss']:.4g}",
            config.paths.output,
            SUMMARY_FILE,
            TRAIN_LOG_FILE,
            LOSS_PLOT_FILE,
        )
    cleanup()
    return ExitCode.SUCCESS
