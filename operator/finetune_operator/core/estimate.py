"""Per-GPU peak memory of a fine-tuning job, from its architecture and training setup alone.

Pure arithmetic (no torch), so the planner can afford thousands of estimates per plan.

Accounting, per trainable parameter (DeepSpeed's, since the operator runs DeepSpeed):
- 16-bit with `master_weights`: 2 bytes working weight, 2 bytes 16-bit gradient, 4 bytes fp32 gradient
  (exists only around the optimizer step), 4 bytes fp32 master copy, Adam's m and v in fp32 (8 bytes).
  That is DeepSpeed's 2 + 18 bytes; the ZeRO paper's "16 bytes" leaves out the fp32 gradient.
- 16-bit without master weights: weight, gradient and both Adam moments in the same 16-bit dtype
  (8 bytes; torch's AdamW keeps states in the parameter's dtype). Under ZeRO-1/2/3 DeepSpeed's bf16
  master weights (`training.pureBf16`) still keep a master partition and a gradient partition of
  their own, in bf16: 2 + 2 more bytes, sharded.
- fp32: 4 + 4 + 8 bytes, and under ZeRO-1/2/3 the optimizer's own fp32 partition of weights and
  gradients (4 + 4, sharded), as DeepSpeed clones them whatever their dtype.
- 8-bit AdamW (paged or not): 2 bytes of states. Paged states can move to host under pressure; they
  are counted on the GPU, which is where they live while they fit.
- SGD: no state. The HF Trainer's `sgd` is torch SGD without momentum; with momentum it would be one
  moment (4 bytes fp32), which this estimator does not model.

The optimizer step: torch's foreach AdamW allocates about one moment-sized temporary over the parameters
it steps (its `sqrt(v) + eps`); DeepSpeed steps the HF Trainer's optimizer on each rank's flat fp32
partition, so under ZeRO-1/2/3 that is a partition's worth (12.6 GiB for Llama-2-7B full fine-tuning
on 2 GPUs). The fused kernel (`training.fusedOptimizer`, the default) and the 8-bit optimizers update
in place; under offload DeepSpeed's CPU Adam steps on the host.

ZeRO shards across `world_size` ranks: stage 1 the optimizer (master copy, states, fp32 gradients),
stage 2 also the 16-bit gradients, stage 3 also the parameters, plus the largest module gathered in
full with its gradient before reduce-scatter (DeepSpeed's `4·largest_layer_params`). Offload moves the
optimizer and fp32 gradients (and under `all` the parameters) to host memory; gradients then stream to
host through the reduce buckets instead of staying on the GPU.

Peak: the largest of three moments. At the start of backward all activations and the loss tensors are
alive, but (without gradient accumulation or ZeRO-2/3's persistent gradient buffers) only the LM
head's gradient exists yet. At the optimizer step all gradients exist and activations are gone. While
loading QLoRA (below ZeRO-3), PEFT's `prepare_model_for_kbit_training` upcasts every 16-bit weight that
is not 4-bit (embeddings, norms, the LM head) to fp32; DeepSpeed casts them back when it wraps the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from finetune_operator.api.enums import Offload, Optimizer, Precision
from finetune_operator.api.trainer import DeepSpeedBuckets
from finetune_operator.core.activations import ActivationEstimate, activation_bytes
from finetune_operator.core.methods import method_model
from finetune_operator.core.methods.base import MethodFootprint, TrainingSetup

__all__ = [
    "CUDA_CONTEXT_BYTES",
    "FRAGMENTATION",
    "MemoryEstimate",
    "TrainingSetup",
    "estimate",
    "trainable_params",
]

#: CUDA context and kernels a process holds before it allocates anything (~0.3-0.6 GiB by GPU/driver).
CUDA_CONTEXT_BYTES = 512 * 1024**2
#: Share of the dynamic allocations (activations, gradients) that the caching allocator reserves but
#: cannot reuse: torch's max_memory_reserved typically exceeds max_memory_allocated by 5-15%.
FRAGMENTATION = 0.10
#: DeepSpeed defaults in elements (deepspeed/runtime/zero/config.py): the reduce bucket and ZeRO-3's
#: prefetch bucket. The planner caps each at what it could ever hold (`bucket_sizes`) and renders them.
REDUCE_BUCKET_ELEMS = 500_000_000
PREFETCH_BUCKET_ELEMS = 50_000_000


@dataclass(frozen=True)
class MemoryEstimate:
    """The predicted peak on each GPU, as `torch.cuda.max_memory_reserved()` plus the CUDA context.

    - `breakdown`: what is resident at the peak moment (weights, gradients, optimizer, activations,
      overhead); it sums to `per_gpu_bytes`. When the optimizer step is the peak, activations are 0.
    - `model_states`: full per-GPU sizes of weights, gradients (16-bit and fp32) and optimizer, whether
      or not they coexist — what DeepSpeed's model-state estimators count.
    - `activation_bytes`: activations at their own peak, even when another moment is the overall peak.
    - `host_bytes`: host memory per GPU (rank) for offloaded states; multiply by GPUs per node.
    - `peak_phase`: "backward", "optimizer_step" or "load".
    - `buckets`: ZeRO's bucket sizes as counted, which the trainer config renders for DeepSpeed.
    """

    per_gpu_bytes: int
    breakdown: Mapping[str, int]
    host_bytes: int
    total_params: int
    trainable_params: int
    model_states: Mapping[str, int] = field(default_factory=dict)
    activation_bytes: int = 0
    overhead: Mapping[str, int] = field(default_factory=dict)
    peak_phase: str = "backward"
    notes: tuple[str, ...] = ()
    buckets: DeepSpeedBuckets = field(
        default_factory=lambda: DeepSpeedBuckets(reduce=REDUCE_BUCKET_ELEMS, prefetch=PREFETCH_BUCKET_ELEMS)
    )


@dataclass(frozen=True)
class _PerParam:
    """Bytes per trainable parameter, before any sharding."""

    weight: int
    grad16: int
    grad32: int
    master: int
    states: int
    step_temp: int


def _per_param(setup: TrainingSetup) -> _PerParam:
    mixed = setup.sixteen_bit and setup.master_weights
    weight = 2 if setup.sixteen_bit else 4
    full_state = 4 if mixed or setup.precision == Precision.FP32 else 2  # one Adam moment
    states = {
        Optimizer.ADAMW: 2 * full_state,
        Optimizer.ADAMW_8BIT: 2,
        Optimizer.PAGED_ADAMW_8BIT: 2,
        Optimizer.SGD: 0,
    }[setup.optimizer]
    # torch's foreach AdamW allocates about one moment-sized temporary during the step; fused updates in place.
    step_temp = full_state if setup.optimizer == Optimizer.ADAMW and not setup.fused_optimizer else 0
    # DeepSpeed's ZeRO optimizers step a partition copy of the weights and gradients of their own: fp32
    # in mixed precision, else in the weights' dtype (fp32, or bf16 master weights); without ZeRO torch
    # steps the parameters themselves.
    partition = 4 if mixed else (weight if setup.zero_stage >= 1 else 0)
    return _PerParam(
        weight=weight,
        grad16=weight,
        grad32=partition,
        master=partition,
        states=states,
        step_temp=step_temp,
    )


def validate(setup: TrainingSetup) -> None:
    """Reject impossible combinations with a one-line reason; method-specific rules live with the method."""
    checks: list[tuple[bool, str]] = [
        (setup.zero_stage in (0, 1, 2, 3), f"zero_stage must be 0..3, got {setup.zero_stage}"),
        (setup.micro_batch_size >= 1, f"micro_batch_size must be at least 1, got {setup.micro_batch_size}"),
        (setup.seq_len >= 1, f"seq_len must be at least 1, got {setup.seq_len}"),
        (setup.world_size >= 1, f"world_size must be at least 1, got {setup.world_size}"),
        (
            setup.gradient_accumulation_steps >= 1,
            f"gradient_accumulation_steps must be at least 1, got {setup.gradient_accumulation_steps}",
        ),
        (
            setup.offload == Offload.NONE or setup.zero_stage >= 1,
            f"offload {setup.offload.value!r} needs ZeRO stage 1 or more",
        ),
        (setup.offload != Offload.ALL or setup.zero_stage == 3, "offloading parameters needs ZeRO stage 3"),
    ]
    for ok, reason in checks:
        if not ok:
            raise ValueError(reason)


def trainable_params(setup: TrainingSetup) -> int:
    """Parameters that receive gradients under the setup's method."""
    return method_model(setup.method).footprint(setup).trainable_params


def _footprint(setup: TrainingSetup) -> MethodFootprint:
    validate(setup)
    model = method_model(setup.method)
    model.validate(setup)
    return model.footprint(setup)


def estimate(setup: TrainingSetup) -> MemoryEstimate:
    """Predict the per-GPU peak; raises ValueError for setups that cannot run (see `setup.validate`)."""
    fp = _footprint(setup)
    arch = setup.arch
    n, stage = setup.world_size, setup.zero_stage
    pp = _per_param(setup)
    pt = fp.trainable_params
    offload_opt = setup.offload != Offload.NONE
    offload_params = setup.offload == Offload.ALL

    def shard(nbytes: int, from_stage: int) -> int:
        return -(-nbytes // n) if stage >= from_stage else nbytes

    all_weights = fp.frozen_weight_bytes + pt * pp.weight
    live_weights = arch.largest_layer_params() * pp.weight if stage == 3 else 0
    weights = (0 if offload_params else shard(all_weights, 3)) + live_weights
    optimizer_all = shard(pt * (pp.master + pp.states), 1)
    grad16 = shard(pt * pp.grad16, 2)
    grad32 = shard(pt * pp.grad32, 1)
    live_grads = fp.trainable_largest_layer * pp.grad16 if stage == 3 else 0
    step_temp = 0 if offload_opt else shard(pt * pp.step_temp, 1)
    host = 0
    if offload_opt:
        # Optimizer and fp32 gradients (fp32 even in pure 16-bit: DeepSpeed's CPU Adam works in fp32).
        host = optimizer_all + shard(pt * 4, 1) + (shard(all_weights, 3) if offload_params else 0)
        optimizer, grad16, grad32 = 0, 0, 0
    else:
        optimizer = optimizer_all

    acts: ActivationEstimate = activation_bytes(
        arch,
        fp,
        act_bytes=2 if setup.sixteen_bit else 4,
        attention=setup.attention,
        micro_batch=setup.micro_batch_size,
        seq_len=setup.seq_len,
        checkpointing=setup.gradient_checkpointing,
        fused_loss=setup.liger_loss,
    )
    # Gradients alive at the start of backward: all of them under accumulation or in ZeRO-3's persistent
    # partition buffer; otherwise (ZeRO-2 frees its partition buffer after each step) only the head's.
    if setup.gradient_accumulation_steps > 1 or stage == 3:
        resident_grads = grad16 + live_grads
    elif fp.head_trained:
        resident_grads = min(grad16, shard(arch.vocab_size * arch.hidden_size * pp.grad16, 2))
    else:
        resident_grads = 0
    step_grads = grad16 + grad32

    buckets = bucket_sizes(pt, arch.total_params())
    buckets_bwd = _deepspeed_buffers(setup, buckets, pp.grad16)
    # What each moment holds beside the weights; the optimizer states exist from the first step on.
    none = {"weights": weights, "gradients": 0, "optimizer": optimizer, "activations": 0, "buffers": 0}
    phases = {
        "backward": none | {"gradients": resident_grads, "activations": acts.total, "buffers": buckets_bwd},
        "optimizer_step": none | {"gradients": step_grads, "optimizer": optimizer + step_temp},
        "load": none | {"weights": weights + _kbit_upcast(setup, fp), "optimizer": 0},
    }

    # The peak is the largest moment counted whole, fragmentation included: comparing them without it
    # could pick a smaller one, and then more activations would lower the estimate.
    def fragmentation(moment: dict[str, int]) -> int:
        return int(FRAGMENTATION * (moment["gradients"] + moment["activations"]))

    phase = max(phases, key=lambda name: sum(phases[name].values()) + fragmentation(phases[name]))
    moment = phases[phase]
    overhead = {
        "cuda_context": CUDA_CONTEXT_BYTES,
        "fragmentation": fragmentation(moment),
        "deepspeed_buffers": moment["buffers"],
    }
    breakdown = {
        "weights": moment["weights"],
        "gradients": moment["gradients"],
        "optimizer": moment["optimizer"],
        "activations": moment["activations"],
        "overhead": sum(overhead.values()),
    }
    notes: list[str] = []
    if setup.optimizer == Optimizer.PAGED_ADAMW_8BIT:
        notes.append("paged optimizer states are counted on the GPU; under pressure they page to host")
    if offload_opt:
        notes.append("offloaded optimizer states need host memory: host_bytes per GPU")
    return MemoryEstimate(
        per_gpu_bytes=sum(breakdown.values()),
        breakdown=MappingProxyType(breakdown),
        host_bytes=host,
        total_params=arch.total_params(),
        trainable_params=pt,
        model_states=MappingProxyType(
            {
                "weights": weights,
                "gradients": grad16 + grad32 + live_grads,
                "optimizer": optimizer,
            }
        ),
        activation_bytes=acts.total,
        overhead=MappingProxyType(overhead),
        peak_phase=phase,
        notes=tuple(notes),
        buckets=buckets,
    )


def bucket_sizes(trainable_params: int, total_params: int) -> DeepSpeedBuckets:
    """DeepSpeed's default buckets, each capped at what it could ever hold: the reduce bucket at the
    trainable parameters' gradients, ZeRO-3's prefetch bucket at the parameters."""
    return DeepSpeedBuckets(
        reduce=max(1, min(REDUCE_BUCKET_ELEMS, trainable_params)),
        prefetch=max(1, min(PREFETCH_BUCKET_ELEMS, total_params)),
    )


def _deepspeed_buffers(setup: TrainingSetup, buckets: DeepSpeedBuckets, grad_bytes: int) -> int:
    """Bytes of ZeRO's communication buckets during backward (the step needs none of its own).

    ZeRO-1/2 allocate the reduce bucket in full at every backward, twice with overlap_comm (the
    trainer turns it on on GPUs) so one bucket fills while the other reduces. ZeRO-3 keeps one reduce
    bucket and gathers up to a prefetch bucket of parameters ahead of use. The all-gather after the
    step writes into the existing 16-bit parameter buffers, so it adds no buffer of its own.
    """
    if setup.zero_stage == 0:
        return 0
    if setup.zero_stage == 3:
        return (buckets.reduce + buckets.prefetch) * grad_bytes
    return 2 * buckets.reduce * grad_bytes


def _kbit_upcast(setup: TrainingSetup, fp: MethodFootprint) -> int:
    """Extra bytes while QLoRA loads below ZeRO-3: the 16-bit weights that are not 4-bit, upcast to fp32
    beside the 4-bit base (`fp.unquantized_params` of them, 2 more bytes each)."""
    if not fp.unquantized_params or setup.zero_stage >= 3 or not setup.sixteen_bit:
        return 0
    return fp.unquantized_params * 2
