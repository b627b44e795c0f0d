"""The DeepSpeed config, rendered purely from the trainer config (no torch, no I/O).

HF Trainer checks these numbers against its TrainingArguments, and both come from the same
`TrainingSpec`, so they agree by construction; `train_batch_size` is left for DeepSpeed to derive from
micro batch × accumulation × the world size it finds, so the same config serves `ftctl train` with any
`--nproc-per-node`.
"""

from __future__ import annotations

from typing import Any, Literal

from finetune_operator.api.enums import Offload, Optimizer, Precision
from finetune_operator.api.trainer import TrainerConfig
from finetune_trainer.exit_codes import ConfigurationError

Device = Literal["cuda", "cpu"]

#: Steps between DeepSpeed's own log lines: effectively never, the progress reporter logs instead.
QUIET_STEPS = 1_000_000_000


def render_deepspeed_config(config: TrainerConfig, device: Device = "cuda") -> dict[str, Any]:
    """DeepSpeed's JSON config for this job on `device` (cpu only changes host-memory pinning)."""
    training = config.training
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": training.micro_batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "gradient_clipping": training.max_grad_norm,
        "steps_per_print": QUIET_STEPS,
        "wall_clock_breakdown": False,
        "bf16": _bf16(config),
        "fp16": _fp16(training.precision),
        "zero_optimization": _zero(config, device),
        # HF Trainer builds the optimizer (torch AdamW, bitsandbytes 8-bit, SGD); DeepSpeed only vouches
        # for its own, so without this flag it refuses the others under ZeRO.
        "zero_allow_untested_optimizer": True,
    }
    if config.offload != Offload.NONE:
        ds["optimizer"] = _offload_optimizer(config)
    return ds


def bf16_engine(config: TrainerConfig) -> bool:
    """Whether DeepSpeed trains in its bf16 mode (HF's `bf16` says the same). Pure bf16 without ZeRO is
    the exception: DeepSpeed's bf16 mode then keeps fp32 master weights in its BF16_Optimizer, so it stays
    off and torch's AdamW steps the bf16 parameters themselves, its moments in their dtype."""
    training = config.training
    return training.precision == Precision.BF16 and not (training.pure_bf16 and config.zero_stage == 0)


def _bf16(config: TrainerConfig) -> dict[str, Any]:
    """Mixed bf16 (fp32 master weights, gradients and Adam states in ZeRO's partitions), or with
    `training.pureBf16` under ZeRO-1/2/3 those partitions in bf16 too (DeepSpeed's low-precision master
    states, which it runs without offload only)."""
    if not bf16_engine(config):
        return {"enabled": False}
    if not config.training.pure_bf16:
        return {"enabled": True}
    return {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}


def _fp16(precision: Precision) -> dict[str, Any]:
    if precision != Precision.FP16:
        return {"enabled": False}
    # Dynamic loss scaling (loss_scale 0) from 2^16, DeepSpeed's documented defaults for fine-tuning.
    return {
        "enabled": True,
        "loss_scale": 0,
        "initial_scale_power": 16,
        "loss_scale_window": 1000,
        "hysteresis": 2,
        "min_loss_scale": 1,
    }


def _zero(config: TrainerConfig, device: Device) -> dict[str, Any]:
    stage, offload = config.zero_stage, config.offload
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero |= {"overlap_comm": device == "cuda", "contiguous_gradients": True}
        if config.buckets is not None:  # the plan's sizes, which its estimate counts
            zero["reduce_bucket_size"] = config.buckets.reduce
            if stage == 3:
                zero["stage3_prefetch_bucket_size"] = config.buckets.prefetch
    if stage == 3:
        # Gather the partitioned weights into one 16-bit state dict on save, so the saved model or
        # adapter loads with plain from_pretrained; without it rank 0 would save empty tensors.
        zero |= {"stage3_gather_16bit_weights_on_model_save": True}
    pin = device == "cuda"
    if offload in (Offload.OPTIMIZER, Offload.ALL):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if offload == Offload.ALL:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return zero


def _offload_optimizer(config: TrainerConfig) -> dict[str, Any]:
    """Offloaded optimizer states step on the CPU, which only DeepSpeed's CPU Adam does well.

    A client optimizer (torch AdamW) would step on the host at a fraction of the speed, so DeepSpeed
    refuses one under offload; we name AdamW here and DeepSpeed swaps in DeepSpeedCPUAdam. 8-bit and SGD
    optimizers have no CPU-offload implementation: refused as a configuration error.
    """
    training = config.training
    if training.optimizer != Optimizer.ADAMW:
        raise ConfigurationError(
            f"distributed.offload {config.offload.value} needs training.optimizer adamw "
            f"(DeepSpeed CPU Adam); {training.optimizer.value} cannot step offloaded states"
        )
    return {
        "type": "AdamW",
        "params": {
            "lr": training.learning_rate,
            "betas": [0.9, 0.999],
            "eps": 1e-8,
            "weight_decay": training.weight_decay,
        },
    }
