"""`ftctl estimate`: per-GPU peak memory of one configuration, like `accelerate estimate-memory` with activations."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from pydantic.alias_generators import to_camel

from finetune_operator.api.enums import AttentionImpl, Method, Offload, Optimizer, Precision, QuantType
from finetune_operator.api.text import count
from finetune_operator.cli.common import (
    CliError,
    HelpFormatter,
    add_output_option,
    breakdown_table,
    document,
    emit,
    explain_peak,
)
from finetune_operator.core.architecture import ModelArchitecture, catalogue_architecture, load_hf_config
from finetune_operator.core.estimate import TrainingSetup, estimate


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "estimate",
        help="estimate per-GPU peak memory for one configuration",
        description="Estimate the per-GPU peak memory of training one configuration, with a breakdown. "
        "-o json|yaml prints kind Estimate (camelCase, as status.plan).",
        formatter_class=HelpFormatter,
    )
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="hub name from the built-in catalogue, e.g. meta-llama/Llama-2-7b-hf")
    model.add_argument("--model-config", type=Path, help="a HF config.json (or the directory holding it)")
    p.add_argument("--method", type=Method, choices=list(Method), default=Method.LORA, help="training method")
    p.add_argument(
        "--precision",
        type=Precision,
        choices=list(Precision),
        default=Precision.BF16,
        help="training precision",
    )
    p.add_argument(
        "--optimizer", type=Optimizer, choices=list(Optimizer), default=Optimizer.ADAMW, help="optimizer"
    )
    p.add_argument(
        "--fused-optimizer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="AdamW in torch's fused kernel (training.fusedOptimizer); the foreach one needs a step temporary",
    )
    p.add_argument(
        "--pure-bf16",
        action="store_true",
        help="bf16 weights, gradients and AdamW states with no fp32 master copy (training.pureBf16)",
    )
    p.add_argument(
        "--liger-kernel",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Liger's fused linear cross-entropy for causal LMs (training.useLigerKernel): no "
        "vocabulary-wide logits",
    )
    p.add_argument("--micro-batch-size", type=int, default=1, metavar="B", help="sequences per GPU per step")
    p.add_argument("--seq-len", type=int, default=512, metavar="S", help="tokens per sequence")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations")
    p.add_argument(
        "--attention",
        type=AttentionImpl,
        choices=list(AttentionImpl),
        default=AttentionImpl.SDPA,
        help="attention implementation",
    )
    p.add_argument("--lora-r", type=int, default=8, metavar="R", help="LoRA rank")
    p.add_argument(
        "--lora-dropout", type=float, default=0.05, metavar="P", help="LoRA dropout (the API's default)"
    )
    p.add_argument(
        "--lora-target-modules", default="q_proj,v_proj", metavar="M,M|all-linear", help="comma-separated"
    )
    p.add_argument(
        "--quant-type",
        type=QuantType,
        choices=list(QuantType),
        default=QuantType.NF4,
        help="QLoRA 4-bit type",
    )
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True, help="QLoRA only")
    p.add_argument("--trainable-layers", type=int, default=2, metavar="N", help="freeze: last N layers train")
    p.add_argument("--num-virtual-tokens", type=int, default=20, metavar="N", help="prefix/prompt tuning")
    p.add_argument("--zero-stage", type=int, choices=range(4), default=0, help="DeepSpeed ZeRO stage")
    p.add_argument("--gpus", type=int, default=1, metavar="N", help="world size")
    p.add_argument(
        "--offload",
        type=Offload,
        choices=list(Offload),
        default=Offload.NONE,
        help="what ZeRO offloads to host",
    )
    add_output_option(p)
    p.set_defaults(run=run)


def _architecture(args: argparse.Namespace) -> tuple[str, ModelArchitecture]:
    if args.model_config is not None:
        return str(args.model_config), load_hf_config(args.model_config)
    return args.model, catalogue_architecture(args.model)


def run(args: argparse.Namespace) -> int:
    name, arch = _architecture(args)
    if args.gpus < 1:
        raise CliError("--gpus must be at least 1")
    if args.pure_bf16 and args.precision != Precision.BF16:
        raise CliError("--pure-bf16 needs --precision bf16")
    setup = TrainingSetup(
        arch=arch,
        method=args.method,
        precision=args.precision,
        optimizer=args.optimizer,
        micro_batch_size=args.micro_batch_size,
        seq_len=args.seq_len,
        gradient_checkpointing=args.gradient_checkpointing,
        attention=args.attention,
        zero_stage=args.zero_stage,
        offload=args.offload,
        world_size=args.gpus,
        lora_r=args.lora_r,
        lora_target_modules=tuple(m.strip() for m in args.lora_target_modules.split(",") if m.strip()),
        quant_type=args.quant_type,
        double_quant=args.double_quant,
        trainable_layers=args.trainable_layers,
        num_virtual_tokens=args.num_virtual_tokens,
        fused_optimizer=args.fused_optimizer,
        lora_dropout=args.lora_dropout,
        master_weights=not args.pure_bf16,
        fused_cross_entropy=args.liger_kernel and arch.kind == "causal_lm",
    )
    result = estimate(setup)
    share = result.trainable_params / result.total_params if result.total_params else 0.0
    header = [
        f"Model {name}: {result.total_params / 1e9:.2f} B parameters, "
        f"{result.trainable_params / 1e6:.2f} M trainable ({share:.2%})",
        f"{setup.method.value}, {setup.precision.value}{' (pure)' if args.pure_bf16 else ''}, "
        f"{setup.optimizer.value}{', Liger loss' if setup.liger_loss else ''}, micro batch "
        f"{setup.micro_batch_size} x {setup.seq_len} tokens"
        f"{', gradient checkpointing' if setup.gradient_checkpointing else ''}, "
        f"ZeRO-{setup.zero_stage}, offload {setup.offload.value}, {count(setup.world_size, 'GPU')}",
        "  component          per GPU",
    ]
    rows = breakdown_table(result.breakdown, result.per_gpu_bytes, result.host_bytes)
    table = "\n".join([*header, *rows, *explain_peak(result, setup.zero_stage)]) + "\n"
    data = document(
        "Estimate",
        {
            "model": name,
            "perGpuBytes": result.per_gpu_bytes,
            "breakdown": dict(result.breakdown),
            "hostBytes": result.host_bytes,
            "peakPhase": result.peak_phase,
            "activationBytesAtTheirPeak": result.activation_bytes,
            "totalParams": result.total_params,
            "trainableParams": result.trainable_params,
            "setup": {
                to_camel(k): (v.value if hasattr(v, "value") else v)
                for k, v in asdict(setup).items()
                if k != "arch"
            },
            "architecture": {to_camel(k): v for k, v in asdict(arch).items()},
        },
    )
    emit(data, args.output, table)
    return 0
