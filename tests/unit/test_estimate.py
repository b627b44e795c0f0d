"""The memory estimator: exact parameter accounting, validation, and the properties a planner relies on."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune_operator.api.enums import AttentionImpl, Method, Offload, Optimizer, Precision
from finetune_operator.core.architecture import catalogue_architecture
from finetune_operator.core.estimate import MemoryEstimate, TrainingSetup, estimate, trainable_params

LLAMA2 = catalogue_architecture("meta-llama/Llama-2-7b-hf")
LLAMA32 = catalogue_architecture("meta-llama/Llama-3.2-3B")
QWEN = catalogue_architecture("Qwen/Qwen2.5-0.5B")
BERT = catalogue_architecture("google-bert/bert-base-uncased")
GEMMA = catalogue_architecture("google/gemma-2-2b")
KEYS = {"weights", "gradients", "optimizer", "activations", "overhead"}


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        # PEFT's print_trainable_parameters for these configurations.
        (TrainingSetup(LLAMA2, Method.LORA), 4_194_304),
        (TrainingSetup(LLAMA2, Method.DORA), 4_194_304 + 32 * 2 * 4096),
        (TrainingSetup(LLAMA2, Method.LORA, lora_r=64, lora_target_modules=("all-linear",)), 159_907_840),
        (TrainingSetup(LLAMA32, Method.PROMPT, num_virtual_tokens=20), 20 * 3072),
        (TrainingSetup(LLAMA32, Method.PREFIX, num_virtual_tokens=20), 2 * 28 * 1024 * 20),
        (TrainingSetup(LLAMA2, Method.FULL), 6_738_415_616),
        (TrainingSetup(LLAMA2, Method.FREEZE, trainable_layers=2), 2 * 202_383_360),
        (TrainingSetup(BERT, Method.LORA, lora_target_modules=("query", "value")), 12 * 2 * 8 * (768 + 768)),
    ],
)
def test_trainable_params(setup: TrainingSetup, expected: int) -> None:
    assert trainable_params(setup) == expected
    assert estimate(setup).trainable_params == expected


def test_qlora_weights_use_4127_bits_with_double_quant_and_45_without() -> None:
    linear = sum(i * o for i, o in LLAMA2.linear_shapes().values()) * LLAMA2.num_layers
    rest = LLAMA2.total_params() - linear
    lora = 4_194_304 * 2
    dq = estimate(TrainingSetup(LLAMA2, Method.QLORA)).model_states["weights"]
    plain = estimate(TrainingSetup(LLAMA2, Method.QLORA, double_quant=False)).model_states["weights"]
    assert dq == pytest.approx(linear * 4.127 / 8 + rest * 2 + lora, rel=1e-4)
    assert plain == pytest.approx(linear * 4.5 / 8 + rest * 2 + lora, rel=1e-6)


def test_full_mixed_precision_adam_costs_deepspeeds_bytes_per_param() -> None:
    result = estimate(TrainingSetup(LLAMA2, Method.FULL))
    states = result.model_states
    p = LLAMA2.total_params()
    assert (states["weights"], states["gradients"], states["optimizer"]) == (2 * p, 6 * p, 12 * p)


@pytest.mark.parametrize(
    ("optimizer", "master", "state_bytes"),
    [
        (Optimizer.ADAMW, True, 4 + 8),
        (Optimizer.ADAMW, False, 4),
        (Optimizer.ADAMW_8BIT, True, 4 + 2),
        (Optimizer.PAGED_ADAMW_8BIT, False, 2),
        (Optimizer.SGD, False, 0),
    ],
)
def test_optimizer_state_bytes(optimizer: Optimizer, master: bool, state_bytes: int) -> None:
    setup = TrainingSetup(QWEN, Method.FULL, optimizer=optimizer, master_weights=master)
    assert estimate(setup).model_states["optimizer"] == state_bytes * QWEN.total_params()


def test_paged_optimizer_is_noted() -> None:
    assert any(
        "page" in n
        for n in estimate(TrainingSetup(QWEN, Method.LORA, optimizer=Optimizer.PAGED_ADAMW_8BIT)).notes
    )


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"zero_stage": 4}, "zero_stage"),
        ({"micro_batch_size": 0}, "micro_batch_size"),
        ({"lora_r": 0}, "lora_r"),
        ({"lora_target_modules": ("nonexistent",)}, "unknown LoRA target"),
        ({"method": Method.FREEZE, "trainable_layers": 33}, "trainable_layers"),
        ({"method": Method.PROMPT, "num_virtual_tokens": 0}, "num_virtual_tokens"),
        ({"offload": Offload.OPTIMIZER}, "ZeRO stage 1"),
        ({"offload": Offload.ALL, "zero_stage": 2}, "ZeRO stage 3"),
        ({"world_size": 0}, "world_size"),
    ],
)
def test_impossible_setups_raise_one_line_reasons(changes: dict[str, object], reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as info:
        estimate(replace(TrainingSetup(LLAMA2, Method.LORA), **changes))  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_qlora_with_zero3_and_fp32_is_allowed() -> None:
    assert estimate(TrainingSetup(LLAMA2, Method.QLORA, zero_stage=3, world_size=4)).per_gpu_bytes > 0
    assert estimate(TrainingSetup(LLAMA2, Method.QLORA, precision=Precision.FP32)).per_gpu_bytes > 0


def test_eager_attention_stores_scores_flash_stores_less() -> None:
    base = TrainingSetup(LLAMA32, Method.LORA, seq_len=2048)
    eager, sdpa, flash = (estimate(replace(base, attention=a)).activation_bytes for a in AttentionImpl)
    by_impl = dict(zip(AttentionImpl, (eager, sdpa, flash), strict=True))
    # Eager keeps fp32 softmax + 16-bit probabilities: (4 + 2) · heads · s² per layer and sample.
    extra = by_impl[AttentionImpl.EAGER] - by_impl[AttentionImpl.SDPA]
    assert extra == 6 * LLAMA32.num_heads * 2048 * 2048 * LLAMA32.num_layers
    assert by_impl[AttentionImpl.FLASH_ATTENTION_2] < by_impl[AttentionImpl.SDPA]


def test_loss_tensors_dominate_for_large_vocabularies() -> None:
    """Llama 3's 128k vocabulary: the fp32 logits, log-softmax and their gradients outweigh a block."""
    base = TrainingSetup(LLAMA32, Method.LORA, micro_batch_size=4, seq_len=1024, gradient_checkpointing=True)
    tokens = 4 * 1024
    assert estimate(base).activation_bytes >= 14 * LLAMA32.vocab_size * tokens


def test_dora_stores_more_activations_than_lora() -> None:
    lora = estimate(TrainingSetup(LLAMA32, Method.LORA, lora_r=32))
    dora = estimate(TrainingSetup(LLAMA32, Method.DORA, lora_r=32))
    assert dora.activation_bytes > lora.activation_bytes
    assert dora.trainable_params > lora.trainable_params


def test_freeze_keeps_activations_only_for_trained_layers() -> None:
    two = estimate(TrainingSetup(LLAMA2, Method.FREEZE, trainable_layers=2, seq_len=1024))
    all_layers = estimate(TrainingSetup(LLAMA2, Method.FREEZE, trainable_layers=32, seq_len=1024))
    assert two.activation_bytes < all_layers.activation_bytes / 4


def test_prompt_tuning_lengthens_the_sequence() -> None:
    short = estimate(TrainingSetup(LLAMA32, Method.LORA, seq_len=512 + 100))
    prompt = estimate(TrainingSetup(LLAMA32, Method.PROMPT, seq_len=512, num_virtual_tokens=100))
    lora = estimate(TrainingSetup(LLAMA32, Method.LORA, seq_len=512))
    assert lora.activation_bytes < prompt.activation_bytes <= short.activation_bytes


def test_offload_reports_host_memory() -> None:
    setup = TrainingSetup(LLAMA2, Method.FULL, zero_stage=3, world_size=8, offload=Offload.ALL)
    result = estimate(setup)
    p = LLAMA2.total_params()
    assert result.host_bytes == pytest.approx(18 * p / 8, rel=1e-6)
    assert result.model_states["optimizer"] == 0


def test_encoder_has_no_vocabulary_logits() -> None:
    setup = TrainingSetup(BERT, Method.FULL, micro_batch_size=32, seq_len=128, precision=Precision.FP32)
    big_vocab = replace(setup, arch=replace(BERT, vocab_size=10 * BERT.vocab_size))
    assert estimate(big_vocab).activation_bytes == estimate(setup).activation_bytes
    decoder = replace(setup, arch=replace(BERT, kind="causal_lm"))
    big_decoder = replace(decoder, arch=replace(decoder.arch, vocab_size=10 * BERT.vocab_size))
    grown = estimate(big_decoder).activation_bytes - estimate(decoder).activation_bytes
    assert grown == 16 * 32 * 128 * 9 * BERT.vocab_size  # fp32 logits, log-softmax and two gradients


def test_an_estimate_takes_under_a_millisecond() -> None:
    setup = TrainingSetup(LLAMA32, Method.DORA, zero_stage=3, world_size=8, gradient_checkpointing=True)
    start = time.perf_counter()
    for _ in range(200):
        estimate(setup)
    assert (time.perf_counter() - start) / 200 < 1e-3


# ---- properties -----------------------------------------------------------------------------------

ARCHS = st.sampled_from(
    [LLAMA2, LLAMA32, QWEN, GEMMA, BERT, catalogue_architecture("meta-llama/Llama-2-70b-hf")]
)
METHODS = st.sampled_from(list(Method))


@st.composite
def setups(draw: st.DrawFn) -> TrainingSetup:
    arch = draw(ARCHS)
    stage = draw(st.integers(0, 3))
    offload = draw(st.sampled_from([Offload.NONE] if stage == 0 else [Offload.NONE, Offload.OPTIMIZER]))
    if stage == 3 and draw(st.booleans()):
        offload = Offload.ALL
    return TrainingSetup(
        arch=arch,
        method=draw(METHODS),
        precision=draw(st.sampled_from(list(Precision))),
        optimizer=draw(st.sampled_from(list(Optimizer))),
        micro_batch_size=draw(st.integers(1, 16)),
        seq_len=draw(st.integers(1, 4096)),
        gradient_checkpointing=draw(st.booleans()),
        attention=draw(st.sampled_from(list(AttentionImpl))),
        zero_stage=stage,
        offload=offload,
        world_size=draw(st.integers(1, 64)),
        lora_r=draw(st.sampled_from([1, 8, 64])),
        lora_target_modules=draw(st.sampled_from([("q_proj", "v_proj"), ("all-linear",)])),
        trainable_layers=draw(st.integers(1, arch.num_layers)),
        num_virtual_tokens=draw(st.integers(1, 64)),
        master_weights=draw(st.booleans()),
        gradient_accumulation_steps=draw(st.sampled_from([1, 4])),
    )


def fits(result: MemoryEstimate) -> None:
    assert set(result.breakdown) >= KEYS
    assert sum(result.breakdown.values()) == result.per_gpu_bytes
    assert all(v >= 0 for v in result.breakdown.values())


@settings(max_examples=300, deadline=None)
@given(setups())
def test_breakdown_sums_to_total(setup: TrainingSetup) -> None:
    fits(estimate(setup))


@settings(max_examples=200, deadline=None)
@given(setups(), st.integers(2, 16))
def test_more_gpus_never_raise_per_gpu_bytes(setup: TrainingSetup, factor: int) -> None:
    more = replace(setup, world_size=setup.world_size * factor)
    assert estimate(more).per_gpu_bytes <= estimate(setup).per_gpu_bytes


@settings(max_examples=200, deadline=None)
@given(setups())
def test_gradient_checkpointing_never_raises_bytes(setup: TrainingSetup) -> None:
    on, off = replace(setup, gradient_checkpointing=True), replace(setup, gradient_checkpointing=False)
    assert estimate(on).per_gpu_bytes <= estimate(off).per_gpu_bytes


@settings(max_examples=200, deadline=None)
@given(setups())
def test_offload_never_raises_gpu_bytes(setup: TrainingSetup) -> None:
    stage3 = replace(setup, zero_stage=3, offload=Offload.NONE)
    opt = replace(stage3, offload=Offload.OPTIMIZER)
    everything = replace(stage3, offload=Offload.ALL)
    assert estimate(everything).per_gpu_bytes <= estimate(opt).per_gpu_bytes <= estimate(stage3).per_gpu_bytes
    if setup.zero_stage in (1, 2):
        none = replace(setup, offload=Offload.NONE)
        assert (
            estimate(replace(none, offload=Offload.OPTIMIZER)).per_gpu_bytes <= estimate(none).per_gpu_bytes
        )


@settings(max_examples=200, deadline=None)
@given(setups())
def test_qlora_below_lora_below_full(setup: TrainingSetup) -> None:
    """Not under ZeRO-3: with the base sharded over many GPUs or on the host, 4-bit storage saves less
    GPU memory than QLoRA's dequantization buffer costs. Not with optimizer offload either: full tuning
    then keeps only the 16-bit weights on the GPU, and LoRA's adapters come on top of the same weights
    (found by hypothesis: Llama-3-70B, r64 all-linear, 1 GPU, 1.66 GB of adapters). Not with plain SGD
    and no master weights either: full tuning then keeps no optimizer state at all, only its gradients,
    which ZeRO-2 shards thin, and LoRA's adapters with their own gradients and activations cost more
    (found by hypothesis: 70B, r64 all-linear, ZeRO-2 over 23 GPUs, LoRA 17 MB above full).
    LoRA stays far below full whenever full tuning keeps optimizer states or master weights."""
    setup = replace(setup, zero_stage=min(setup.zero_stage, 2), offload=Offload.NONE)
    if setup.optimizer == Optimizer.SGD and not setup.master_weights:
        setup = replace(setup, master_weights=True)
    qlora, lora, full = (
        estimate(replace(setup, method=m)).per_gpu_bytes for m in (Method.QLORA, Method.LORA, Method.FULL)
    )
    assert qlora < lora < full


@settings(max_examples=200, deadline=None)
@given(setups(), st.integers(1, 8), st.integers(1, 512))
def test_bytes_grow_with_micro_batch_and_sequence(
    setup: TrainingSetup, extra_batch: int, extra_seq: int
) -> None:
    base = estimate(setup)
    bigger_batch = estimate(replace(setup, micro_batch_size=setup.micro_batch_size + extra_batch))
    longer = estimate(replace(setup, seq_len=setup.seq_len + extra_seq))
    assert bigger_batch.per_gpu_bytes >= base.per_gpu_bytes
    assert longer.per_gpu_bytes >= base.per_gpu_bytes
    assert bigger_batch.activation_bytes > base.activation_bytes
    assert longer.activation_bytes > base.activation_bytes


@settings(max_examples=100, deadline=None)
@given(setups())
def test_zero_stages_never_raise_bytes(setup: TrainingSetup) -> None:
    if setup.offload != Offload.NONE:
        return
    per_stage = [estimate(replace(setup, zero_stage=s)).per_gpu_bytes for s in (1, 2, 3)]
    if setup.world_size >= 4:
        assert per_stage[0] >= per_stage[1]


def test_a_longer_batch_never_lowers_the_peak_when_the_peak_changes_phase() -> None:
    """Found by hypothesis in CI: the optimizer-step phase was the peak, and a longer batch moved the peak to
    backward, which compared larger only without fragmentation; the total then fell by 40 MB."""
    base = TrainingSetup(
        arch=catalogue_architecture("meta-llama/Llama-2-7b-hf"),
        method=Method.FREEZE,
        micro_batch_size=2,
        seq_len=1,
        attention=AttentionImpl.EAGER,
        zero_stage=1,
        trainable_layers=1,
        gradient_accumulation_steps=4,
    )
    short, longer = estimate(base), estimate(replace(base, micro_batch_size=3, seq_len=284))
    assert short.peak_phase == "optimizer_step"
    assert longer.per_gpu_bytes >= short.per_gpu_bytes


def test_the_unfused_adamw_step_needs_a_moment_of_the_ranks_partition() -> None:
    """Llama-2-7B full fine-tuning on 2 GPUs under ZeRO-2: torch's foreach AdamW steps DeepSpeed's fp32
    partition with one moment-sized temporary, 12.6 GiB; the fused kernel (the default) none."""
    setup = TrainingSetup(LLAMA2, Method.FULL, zero_stage=2, world_size=2, fused_optimizer=False)
    foreach, fused = estimate(setup), estimate(replace(setup, fused_optimizer=True))
    assert foreach.peak_phase == fused.peak_phase == "optimizer_step"
    temporary = foreach.breakdown["optimizer"] - fused.breakdown["optimizer"]
    assert temporary == -(-LLAMA2.total_params() * 4 // 2)
    assert round(temporary / 2**30, 1) == 12.6
    offloaded = replace(setup, offload=Offload.OPTIMIZER)  # DeepSpeed's CPU Adam steps on the host
    assert estimate(offloaded).breakdown["optimizer"] == 0


@pytest.mark.parametrize(("stage", "buffers"), [(0, 0), (1, 2), (2, 2), (3, 1)])
def test_zero_buckets_are_sized_to_the_gradients_and_counted_as_deepspeed_allocates_them(
    stage: int, buffers: int
) -> None:
    """The reduce bucket is allocated in full, twice under ZeRO-1/2 (overlap_comm); capped at the
    trainable parameters, a LoRA's bucket is megabytes, not DeepSpeed's default 2 x 1 GB."""
    setup = TrainingSetup(LLAMA2, Method.LORA, zero_stage=stage, world_size=2, micro_batch_size=4)
    result = estimate(setup)
    assert result.buckets.reduce == 4_194_304 and result.buckets.prefetch == 50_000_000
    prefetch = result.buckets.prefetch * 2 if stage == 3 else 0
    assert result.overhead["deepspeed_buffers"] == buffers * result.buckets.reduce * 2 + prefetch
    full = estimate(TrainingSetup(LLAMA2, Method.FULL, zero_stage=2, world_size=8))
    assert full.buckets.reduce == 500_000_000  # DeepSpeed's default where the model is larger


def test_lora_dropout_saves_each_adapters_dropped_out_input() -> None:
    """PEFT's lora_A(dropout(x)): per adapted module and token, a 16-bit copy of its input and a mask."""
    setup = TrainingSetup(
        catalogue_architecture("meta-llama/Llama-3.1-8B"),
        Method.LORA,
        lora_target_modules=("all-linear",),
        micro_batch_size=2,
        seq_len=2048,
    )
    without, with_dropout = estimate(setup), estimate(replace(setup, lora_dropout=0.05))
    inputs = sum(i for i, _ in setup.arch.linear_shapes().values())  # q, k, v, o, gate, up, down
    expected = setup.arch.num_layers * 2 * 2048 * inputs * (2 + 1)
    assert with_dropout.activation_bytes - without.activation_bytes == expected
    assert round(expected / 2**30, 1) == 14.2
    assert estimate(replace(setup, method=Method.FULL, lora_dropout=0.05)).activation_bytes == (
        estimate(replace(setup, method=Method.FULL)).activation_bytes
    )


def test_qlora_loading_upcasts_the_unquantized_weights_to_fp32() -> None:
    """prepare_model_for_kbit_training makes embeddings, norms and head fp32 until DeepSpeed casts them
    back: with almost no activations that moment is the peak (not under ZeRO-3, which skips it)."""
    setup = TrainingSetup(LLAMA2, Method.QLORA, seq_len=1, micro_batch_size=1)
    result = estimate(setup)
    linear = sum(i * o for i, o in LLAMA2.linear_shapes().values()) * LLAMA2.num_layers
    assert result.peak_phase == "load"
    assert result.breakdown["weights"] == result.model_states["weights"] + 2 * (
        LLAMA2.total_params() - linear
    )
    assert result.breakdown["optimizer"] == 0  # the optimizer does not exist yet
    assert estimate(replace(setup, zero_stage=3, world_size=2)).peak_phase != "load"
    assert estimate(replace(setup, seq_len=512, micro_batch_size=2)).peak_phase == "backward"


def test_pure_bf16_costs_8_bytes_per_param_without_zero_and_keeps_bf16_partitions_under_it() -> None:
    p = QWEN.total_params()
    plain = estimate(TrainingSetup(QWEN, Method.FULL, master_weights=False)).model_states
    assert (plain["weights"], plain["gradients"], plain["optimizer"]) == (2 * p, 2 * p, 4 * p)
    # DeepSpeed's bf16 master weights: a bf16 master and gradient partition beside bf16 Adam moments.
    zero2 = TrainingSetup(QWEN, Method.FULL, master_weights=False, zero_stage=2, world_size=4)
    states = estimate(zero2).model_states
    assert states["optimizer"] == -(-(2 + 4) * p // 4)
    assert states["gradients"] == 2 * -(-2 * p // 4)
    mixed = estimate(replace(zero2, master_weights=True)).model_states
    assert states["optimizer"] <= mixed["optimizer"] / 2


def test_fp32_under_zero_counts_deepspeeds_partition_copy() -> None:
    p = QWEN.total_params()
    setup = TrainingSetup(QWEN, Method.FULL, precision=Precision.FP32, zero_stage=1, world_size=2)
    states = estimate(setup).model_states
    assert states["optimizer"] == -(-(4 + 8) * p // 2)
    assert estimate(replace(setup, zero_stage=0, world_size=1)).model_states["optimizer"] == 8 * p


LLAMA31 = catalogue_architecture("meta-llama/Llama-3.1-8B")


def test_fused_cross_entropy_drops_the_vocabulary_wide_loss() -> None:
    from finetune_operator.core.activations import loss_bytes_per_token

    # HF's 16-bit logits, their fp32 upcast and log-softmax, two fp32 gradients: 14 B per vocabulary entry
    assert loss_bytes_per_token(LLAMA31, 2) == 14 * 128_256
    # Liger: the final hidden states' gradient and a chunk of logits about 2·hidden wide, fp32 loss
    assert loss_bytes_per_token(LLAMA31, 2, fused=True) == 3 * 2 * 4096 + 4
    setup = TrainingSetup(LLAMA31, Method.LORA, micro_batch_size=2, seq_len=4096)
    plain, fused = estimate(setup), estimate(replace(setup, fused_cross_entropy=True))
    # the logits of 2 × 4096 tokens (13.7 GiB) were the peak's largest term; a block's backward is next
    assert plain.activation_bytes - fused.activation_bytes > 10 * 1024**3
    assert fused.per_gpu_bytes < plain.per_gpu_bytes


def test_fused_cross_entropy_is_not_counted_under_zero3() -> None:
    """The trainer leaves Liger off there: its fused loss cannot read ZeRO-3's partitioned head."""
    setup = TrainingSetup(LLAMA31, Method.FULL, seq_len=4096, zero_stage=3, world_size=8)
    assert estimate(setup) == estimate(replace(setup, fused_cross_entropy=True))
    below = replace(setup, zero_stage=2)
    assert estimate(replace(below, fused_cross_entropy=True)).per_gpu_bytes < estimate(below).per_gpu_bytes


def test_fused_cross_entropy_changes_nothing_for_encoders() -> None:
    setup = TrainingSetup(BERT, Method.LORA, lora_target_modules=("query", "value"))
    assert estimate(setup) == estimate(replace(setup, fused_cross_entropy=True))
