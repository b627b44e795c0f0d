"""The planner: the fewest GPUs, and then the fastest ZeRO stage and offload, whose estimated peak fits.

Users of Kubeflow Trainer guess `numNodes`; here the estimator answers it. Preference among configurations
that fit on the same GPU count goes to speed: no offload before optimizer offload before full offload,
and within each, lower ZeRO stages first (less communication).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

from finetune_operator.api.enums import OFFLOAD_OPTIMIZERS, Method, Offload, Precision
from finetune_operator.api.methods import METHODS, NO_ZERO3_METHODS, SETTINGS_BLOCKS
from finetune_operator.api.models import FineTuneJobSpec, ModelSpec, PlanStatus, QLoraSpec
from finetune_operator.api.text import count, gib
from finetune_operator.api.trainer import DeepSpeedBuckets
from finetune_operator.core.architecture import ModelArchitecture, catalogue_architecture
from finetune_operator.core.calibration import underestimate_margins
from finetune_operator.core.estimate import MemoryEstimate, TrainingSetup, estimate
from finetune_operator.core.hardware import gpu_model
from finetune_operator.core.requests import WorkerRequests, quantity_bytes, worker_requests

GIB = 1024**3
#: The largest job the planner considers: beyond this a fine-tune is a pre-training run in disguise.
DEFAULT_MAX_GPUS = 1024
OFFLOAD_ORDER = (Offload.NONE, Offload.OPTIMIZER, Offload.ALL)
#: How a suggestion names a method, where its value is not how people write it.
METHOD_LABELS = {Method.QLORA: "QLoRA"}
#: Stands in a suggestion's label for the ZeRO stage and offload the re-plan chose.
ZERO_PLACEHOLDER = "{zero}"


class PlanningError(ValueError):
    """The spec cannot be planned at all (unknown model or GPU, impossible layout); a permanent error."""


@dataclass(frozen=True)
class Plan:
    """A planned layout and the estimate behind it."""

    fits: bool
    gpus: int
    nodes: int
    gpus_per_node: int
    zero_stage: int
    offload: Offload
    usable_bytes: int
    estimate: MemoryEstimate
    gpu_type: str | None
    message: str
    #: Host memory, local disk and checkpoint time per worker (core/requests.py).
    requests: WorkerRequests
    suggestions: tuple[str, ...] = field(default=())
    #: How far measured peaks of this method ran above the estimate at most (core/calibration.py).
    margin: float = 0.0

    @property
    def per_gpu_bytes(self) -> int:
        return self.estimate.per_gpu_bytes

    @property
    def buckets(self) -> DeepSpeedBuckets:
        """ZeRO's bucket sizes the estimate counts, rendered into the trainer config."""
        return self.estimate.buckets

    @property
    def host_bytes_per_node(self) -> int:
        return self.estimate.host_bytes * self.gpus_per_node

    def to_status(self) -> PlanStatus:
        return PlanStatus(
            fits=self.fits,
            gpus=self.gpus,
            nodes=self.nodes,
            gpus_per_node=self.gpus_per_node,
            zero_stage=self.zero_stage,
            offload=self.offload,
            gpu_type=self.gpu_type,
            per_gpu_bytes=self.per_gpu_bytes,
            usable_bytes=self.usable_bytes,
            memory_per_gpu=f"{gib(self.per_gpu_bytes)} of {gib(self.usable_bytes)}",
            host_bytes_per_node=self.host_bytes_per_node,
            worker_memory_bytes=self.requests.memory_bytes,
            worker_ephemeral_storage_bytes=self.requests.ephemeral_storage_bytes,
            checkpoint_seconds=self.requests.checkpoint_seconds,
            breakdown=dict(self.estimate.breakdown),
            peak_phase=self.estimate.peak_phase,
            estimate_margin=round(self.margin, 3),
            total_params=self.estimate.total_params,
            trainable_params=self.estimate.trainable_params,
            message=self.message,
        )


def architecture_for(model: ModelSpec) -> ModelArchitecture:
    """The inline architecture block wins; otherwise the catalogue entry for the hub name."""
    if model.architecture is not None:
        a = model.architecture
        return ModelArchitecture(
            vocab_size=a.vocab_size,
            hidden_size=a.hidden_size,
            intermediate_size=a.intermediate_size,
            num_layers=a.num_layers,
            num_heads=a.num_heads,
            num_kv_heads=a.num_kv_heads or a.num_heads,
            tie_embeddings=a.tie_embeddings,
            mlp=a.mlp,
            head_dim=a.head_dim,
            max_position_embeddings=a.max_position_embeddings or ModelArchitecture.max_position_embeddings,
        )
    if model.name is None:
        raise PlanningError(
            "model.uri alone does not tell the architecture: set model.name or model.architecture"
        )
    try:
        return catalogue_architecture(model.name)
    except ValueError as exc:
        raise PlanningError(f"{exc}; or give model.architecture") from exc


def gpu_memory_bytes(spec: FineTuneJobSpec) -> tuple[int, str | None]:
    """Memory per GPU and the product name; `gpuMemoryGiB` overrides the product's number. A GPU without
    bfloat16 (before Ampere: T4, V100) cannot run a bf16 job: DeepSpeed refuses it at start."""
    resources = spec.resources
    product = None
    if resources.gpu_type is not None:
        try:
            product = gpu_model(resources.gpu_type)
        except ValueError as exc:
            raise PlanningError(str(exc)) from exc
        bf16 = [
            field
            for field, precision in (
                ("training.precision", spec.training.precision),
                (
                    "method.qlora.computeDtype",
                    spec.method.qlora_settings().compute_dtype if spec.method.type == Method.QLORA else None,
                ),
            )
            if precision == Precision.BF16
        ]
        if bf16 and not product.bf16:
            raise PlanningError(
                f"{' and '.join(bf16)} bf16: {product.name} GPUs have no bfloat16 (it came with Ampere); "
                "use fp16, or a newer GPU"
            )
    if resources.gpu_memory_gi_b is not None:
        return int(resources.gpu_memory_gi_b * GIB), product.name if product else None
    assert product is not None  # the API rules require one of the two
    return product.memory_bytes, product.name


def setup_for(spec: FineTuneJobSpec, arch: ModelArchitecture) -> TrainingSetup:
    """The estimator's view of a job, on one GPU with ZeRO off; the planner varies the layout."""
    training, method = spec.training, spec.method
    lora, qlora = method.lora_settings(), method.qlora_settings()
    return TrainingSetup(
        arch=arch,
        method=method.type,
        precision=training.precision,
        optimizer=training.optimizer,
        micro_batch_size=training.micro_batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        seq_len=spec.dataset.max_seq_length,
        gradient_checkpointing=training.gradient_checkpointing,
        attention=spec.model.attention_implementation,
        lora_r=lora.r,
        lora_target_modules=tuple(lora.target_modules),
        quant_type=qlora.quant_type,
        double_quant=qlora.double_quant,
        trainable_layers=method.freeze_settings().trainable_layers,
        num_virtual_tokens=method.virtual_tokens(),
        fused_optimizer=training.fused_optimizer,
        lora_dropout=lora.dropout,
        master_weights=not training.pure_bf16,
        fused_cross_entropy=training.use_liger_kernel
        and arch.kind == "causal_lm"
        and spec.dataset.format != "classification",
    )


def layout(gpus: int, gpus_per_node: int) -> tuple[int, int] | None:
    """(nodes, GPUs per node) with GPUs spread evenly, or None when `gpus` cannot be spread evenly."""
    nodes = math.ceil(gpus / gpus_per_node)
    if gpus % nodes:
        return None
    return nodes, gpus // nodes


def full_nodes(gpus: int, gpus_per_node: int) -> int:
    """A gang over several nodes takes all of each node's GPUs: 3 × 8 rather than 3 × 7 on 8-GPU nodes
    costs the same nodes, leaves no GPU stranded beside it, and only lowers the per-GPU peak. A gang on
    one node keeps its count (the rest of the node serves other jobs)."""
    nodes = math.ceil(gpus / gpus_per_node)
    return gpus if nodes == 1 else nodes * gpus_per_node


def _configurations(spec: FineTuneJobSpec) -> list[tuple[int, Offload]]:
    """(ZeRO stage, offload) pairs to try, fastest first; offload needs ZeRO ≥ 1 and AdamW with fp32
    states (not pure bf16), parameters ZeRO-3; prefix and prompt tuning stop at ZeRO-2 (what the trainer
    can run)."""
    dist = spec.distributed
    top = 2 if spec.method.type in NO_ZERO3_METHODS else 3
    stages = range(top + 1) if dist.zero_stage == "auto" else [int(dist.zero_stage)]
    if dist.offload != "auto":
        offloads: tuple[Offload, ...] = (Offload(dist.offload),)
    elif spec.training.optimizer in OFFLOAD_OPTIMIZERS and not spec.training.pure_bf16:
        offloads = OFFLOAD_ORDER
    else:
        offloads = (Offload.NONE,)
    return [
        (stage, offload)
        for offload in offloads
        for stage in stages
        if (offload == Offload.NONE or stage >= 1) and (offload != Offload.ALL or stage == 3)
    ]


def _smallest_fit(
    base: TrainingSetup, sizes: Sequence[int], usable: int, stage: int, offload: Offload
) -> tuple[int, MemoryEstimate] | None:
    """Binary search: per-GPU bytes never rise with the world size, so the fitting sizes are a suffix."""
    lo, hi, found = 0, len(sizes) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        result = estimate(replace(base, zero_stage=stage, offload=offload, world_size=sizes[mid]))
        if result.per_gpu_bytes <= usable:
            found, hi = (sizes[mid], result), mid - 1
        else:
            lo = mid + 1
    return found


def worker_memory(spec: FineTuneJobSpec, gpus: int, stage: int, result: MemoryEstimate) -> int:
    """Host memory one worker of this layout requests: the job's `resources.memory`, else the estimate's
    (offloaded states of its node's ranks, /dev/shm, the processes themselves)."""
    if spec.resources.memory is not None:
        return quantity_bytes(spec.resources.memory)
    spread = layout(gpus, spec.resources.gpus_per_node)
    assert spread is not None
    return _requests(spec, gpus, spread[1], stage, result).memory_bytes


def _requests(
    spec: FineTuneJobSpec, gpus: int, per_node: int, stage: int, result: MemoryEstimate
) -> WorkerRequests:
    return worker_requests(
        spec,
        gpus=gpus,
        gpus_per_node=per_node,
        zero_stage=stage,
        host_offload_bytes_per_node=result.host_bytes * per_node,
        total_params=result.total_params,
        trainable_params=result.trainable_params,
    )


@dataclass
class _HostCheck:
    """Whether a layout's workers fit their nodes' memory (`node_memory`; None: not checked), and the
    least a rejected layout needed, for the refusal's message."""

    spec: FineTuneJobSpec
    node_memory: int | None
    shortest: int | None = None

    def fits(self, gpus: int, stage: int, result: MemoryEstimate) -> bool:
        if self.node_memory is None:
            return True
        need = worker_memory(self.spec, gpus, stage, result)
        if need <= self.node_memory:
            return True
        self.shortest = need if self.shortest is None else min(self.shortest, need)
        return False

    def first_fit(
        self,
        base: TrainingSetup,
        sizes: Sequence[int],
        hit: tuple[int, MemoryEstimate],
        stage: int,
        offload: Offload,
    ) -> tuple[int, MemoryEstimate] | None:
        """From the smallest size whose GPUs hold the job, the first whose nodes also hold its workers:
        offloaded states per node shrink as nodes are added while processes per node grow, so the host
        need is not monotonic in the size; GPU fit is, so every size from `hit` on fits the GPUs."""
        for gpus in sizes[sizes.index(hit[0]) :]:
            result = (
                hit[1]
                if gpus == hit[0]
                else estimate(replace(base, zero_stage=stage, offload=offload, world_size=gpus))
            )
            if self.fits(gpus, stage, result):
                return gpus, result
        return None


def plan(
    spec: FineTuneJobSpec,
    arch: ModelArchitecture | None = None,
    max_gpus: int = DEFAULT_MAX_GPUS,
    explain: bool = True,
    node_memory: int | None = None,
) -> Plan:
    """Plan a job. `arch` overrides the spec's model (ftctl passes one read from a local config.json).

    With `explain`, a job that fits nowhere is re-planned in cheaper variants to say what would fit.
    With `node_memory` (bytes of host memory a GPU node offers) a layout whose worker would request
    more is never chosen: its pods could never be scheduled.
    """
    context_known = (
        arch is not None
        or spec.model.architecture is None
        or bool(spec.model.architecture.max_position_embeddings)
    )
    arch = arch or architecture_for(spec.model)
    if context_known and spec.dataset.max_seq_length > arch.max_position_embeddings:
        raise PlanningError(
            f"dataset.maxSeqLength {spec.dataset.max_seq_length} is longer than the model's context "
            f"({arch.max_position_embeddings} tokens, max_position_embeddings)"
        )
    memory, gpu_type = gpu_memory_bytes(spec)
    usable = int(memory * (1 - spec.resources.memory_headroom))
    gpn = spec.resources.gpus_per_node
    try:
        base = setup_for(spec, arch)
        estimate(base)
    except ValueError as exc:
        raise PlanningError(str(exc)) from exc
    requested = spec.resources.gpus
    if requested != "auto" and layout(int(requested), gpn) is None:
        raise PlanningError(
            f"resources.gpus {requested} cannot be spread evenly over nodes of {count(gpn, 'GPU')}; "
            f"use a multiple of the node count"
        )
    configurations = _configurations(spec)
    host = _HostCheck(spec, node_memory)

    def at(gpus: int) -> tuple[Plan | None, list[tuple[int, Offload, MemoryEstimate]]]:
        """The first configuration that fits on exactly `gpus` (None if none does), and every estimate."""
        tried = [
            (s, o, estimate(replace(base, zero_stage=s, offload=o, world_size=gpus)))
            for s, o in configurations
        ]
        for stage, offload, result in tried:
            if result.per_gpu_bytes <= usable and host.fits(gpus, stage, result):
                return _planned(
                    spec, gpus, stage, offload, result, gpn, usable, gpu_type, fits=True, note=""
                ), tried
        return None, tried

    if requested != "auto":  # the count asked for, first: the search below only explains a misfit
        fitted, tried = at(int(requested))
        if fitted is not None:
            return fitted
    sizes = [n for n in range(1, max_gpus + 1) if layout(n, gpn) is not None]
    best: tuple[int, int, Offload, MemoryEstimate] | None = None
    for stage, offload in configurations:
        hit = _smallest_fit(base, sizes, usable, stage, offload)
        if hit is not None:
            hit = host.first_fit(base, sizes, hit, stage, offload)
        if hit is not None and (best is None or hit[0] < best[0]):
            best = (hit[0], stage, offload, hit[1])
    if requested == "auto" and best is not None:
        gpus, stage, offload, result = best
        whole = full_nodes(gpus, gpn)
        if whole != gpus:  # the same nodes, all their GPUs: more memory per GPU to spare, never less
            widened = estimate(replace(base, zero_stage=stage, offload=offload, world_size=whole))
            if host.fits(whole, stage, widened):  # more processes per node may not fit its memory
                gpus, result = whole, widened
        return _planned(spec, gpus, stage, offload, result, gpn, usable, gpu_type, fits=True, note="")
    gpus = sizes[-1] if requested == "auto" else int(requested)
    if requested == "auto":
        fitted, tried = at(gpus)
        if fitted is not None:
            return fitted
    stage, offload, result = min(tried, key=lambda t: t[2].per_gpu_bytes)
    if requested == "auto":
        note = "does not fit on any GPU count up to the planner's limit"
    elif best is not None:
        note = f"does not fit on {count(gpus, 'GPU')}; the smallest count that fits is {best[0]}"
    else:
        note = f"does not fit on {count(gpus, 'GPU')}, nor on any count the planner tries"
    if spec.method.type in NO_ZERO3_METHODS:
        note += (
            f" ({spec.method.type.value} tuning cannot shard the frozen model: ZeRO-3 is not available to it)"
        )
    if host.shortest is not None and node_memory is not None:
        note += (
            f"; where the GPUs would hold it, a worker needs at least {gib(host.shortest)} of host memory, "
            f"more than the {gib(node_memory)} a GPU node has (operator setting placement.nodeMemory)"
        )
    suggestions = _suggestions(spec, arch, max_gpus, node_memory) if explain else ()
    if suggestions:
        note += "; would fit: " + "; ".join(suggestions)
    return _planned(spec, gpus, stage, offload, result, gpn, usable, gpu_type, False, note, suggestions)


def _planned(
    spec: FineTuneJobSpec,
    gpus: int,
    stage: int,
    offload: Offload,
    result: MemoryEstimate,
    gpn: int,
    usable: int,
    gpu_type: str | None,
    fits: bool,
    note: str,
    suggestions: tuple[str, ...] = (),
) -> Plan:
    spread = layout(gpus, gpn)
    assert spread is not None
    nodes, per_node = spread
    summary = (
        f"{count(gpus, 'GPU')} on {count(nodes, 'node')}, ZeRO-{stage}"
        f"{'' if offload == Offload.NONE else f' with {offload.value} offload'}: "
        f"{result.per_gpu_bytes / GIB:.1f} GiB per GPU of {usable / GIB:.1f} GiB usable"
    )
    margin = underestimate_margins()[spec.method.type]
    if fits and usable < result.per_gpu_bytes * (1 + margin):
        summary += (
            f", within the estimate's uncertainty: measured {spec.method.type.value} peaks ran up to "
            f"{margin:.0%} above estimates like this one"
        )
    requests = _requests(spec, gpus, per_node, stage, result)
    return Plan(
        fits=fits,
        gpus=gpus,
        nodes=nodes,
        gpus_per_node=per_node,
        requests=requests,
        zero_stage=stage,
        offload=offload,
        usable_bytes=usable,
        estimate=result,
        gpu_type=gpu_type,
        message=f"{note}: {summary}" if note else summary,
        suggestions=suggestions,
        margin=margin,
    )


def _alternatives(spec: FineTuneJobSpec) -> Iterator[tuple[str, FineTuneJobSpec]]:
    """Cheaper variants of a job that does not fit, each adding one step to the last, in the order a
    practitioner would give things up: memory for recomputation, then batch, then speed, then the method
    (the method table says whether the method can recompute and what cheaper method it has)."""
    label: list[str] = []
    training, dist = spec.training, spec.distributed
    traits = METHODS[spec.method.type]
    if not training.gradient_checkpointing and traits.gradient_checkpointing:
        training = training.model_copy(update={"gradient_checkpointing": True})
        spec = spec.model_copy(update={"training": training})
        label.append("gradient checkpointing")
        yield " + ".join(label), spec
    if training.micro_batch_size > 1:
        training = training.model_copy(update={"micro_batch_size": 1})
        spec = spec.model_copy(update={"training": training})
        label.append("micro batch 1")
        yield " + ".join(label), spec
    if dist.offload != "auto" or dist.zero_stage != "auto":
        spec = spec.model_copy(
            update={"distributed": dist.model_copy(update={"zero_stage": "auto", "offload": "auto"})}
        )
        label.append(ZERO_PLACEHOLDER)
        yield " + ".join(label), spec
    if traits.cheaper is not None:
        # Keep only the settings blocks the cheaper method reads (LoRA's adapters carry over to QLoRA).
        kept = set(METHODS[traits.cheaper].settings)
        blocks: dict[str, QLoraSpec | None] = {block: None for block in SETTINGS_BLOCKS if block not in kept}
        if METHODS[traits.cheaper].quantized and training.precision != Precision.FP32:
            # 4-bit matmuls compute in the precision the job already trains in (fp16 on pre-Ampere GPUs)
            blocks["qlora"] = QLoraSpec(compute_dtype=training.precision)
        method = spec.method.model_copy(update={"type": traits.cheaper, **blocks})
        label.append(METHOD_LABELS.get(traits.cheaper, traits.cheaper.value))
        yield " + ".join(label), spec.model_copy(update={"method": method})


def _suggestions(
    spec: FineTuneJobSpec, arch: ModelArchitecture, max_gpus: int, node_memory: int | None
) -> tuple[str, ...]:
    """Which cheaper variants would fit, and on how many GPUs (the requested count, when one is fixed)."""
    suggestions = []
    for label, variant in _alternatives(spec):
        try:
            alternative = plan(variant, arch, max_gpus, explain=False, node_memory=node_memory)
        except PlanningError:  # a variant this GPU cannot run at all (bf16 compute on a T4)
            continue
        if alternative.fits:
            zero = f"ZeRO-{alternative.zero_stage}" + (
                "" if alternative.offload == Offload.NONE else f" with {alternative.offload.value} offload"
            )
            steps = [zero if step == ZERO_PLACEHOLDER else step for step in label.split(" + ")]
            label = " + ".join(step for step in steps if step != "ZeRO-0")
            suggestions.append(f"{label} on {alternative.gpus} GPU{'s' if alternative.gpus > 1 else ''}")
    return tuple(dict.fromkeys(suggestions))  # variants that differ only in ZeRO-0 read the same
