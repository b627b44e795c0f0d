"""`ftctl estimate`: per-GPU peak memory of one configuration, like `accelerate estimate-memory` with activations."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from finetune_operator.api.enums import AttentionImpl, Method, Offload, Optimizer, Precision, QuantType
from finetune_operator.cli.common import CliError, breakdown_table, emit
from finetune_operator.core.architecture import ModelArchitecture, catalogue_architecture, load_hf_config
from finetune_operator.core.estimate import TrainingSetup, estimate


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "estimate",
        help="estimate per-GPU peak memory for one configuration",
        description="Estimate the per-GPU peak memory of training one configuration, with a breakdown.",
    )
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="hub name from the built-in catalogue, e.g. meta-llama/Llama-2-7b-hf")
    model.add_argument("--model-config", type=Path, help="a HF config.json (or the directory holding it)")
    p.add_argument("--method", type=Method, choices=list(Method), default=Method.LORA)
    p.add_argument("--precision", type=Precision, choices=list(Precision), default=Precision.BF16)
    p.add_argument("--optimizer", type=Optimizer, choices=list(Optimizer), default=Optimizer.ADAMW)
    p.add_argument("--micro-batch-size", type=int, default=1, metavar="B")
    p.add_argument("--seq-len", type=int, default=512, metavar="S")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--attention", type=AttentionImpl, choices=list(AttentionImpl), default=AttentionImpl.SDPA)
    p.add_argument("--lora-r", type=int, default=8, metavar="R")
    p.add_argument(
        "--lora-target-modules", default="q_proj,v_proj", metavar="M,M|all-linear", help="comma-separated"
    )
    p.add_argument("--quant-type", type=QuantType, choices=list(QuantType), default=QuantType.NF4)
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True, help="QLoRA only")
    p.add_argument("--trainable-layers", type=int, default=2, metavar="N", help="freeze: last N layers train")
    p.add_argument("--num-virtual-tokens", type=int, default=20, metavar="N", help="prefix/prompt tuning")
    p.add_argument("--zero-stage", type=int, choices=range(4), default=0)
    p.add_argument("--gpus", type=int, default=1, metavar="N", help="world size")
    p.add_argument("--offload", type=Offload, choices=list(Offload), default=Offload.NONE)
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(run=run)


def _architecture(args: argparse.Namespace) -> tuple[str, ModelArchitecture]:
    if args.model_config is not None:
        return str(args.model_config), load_hf_config(args.model_config)
    return args.model, catalogue_architecture(args.model)


def run(args: argparse.Namespace) -> int:
    name, arch = _architecture(args)
    if args.gpus < 1:
        raise CliError("--gpus must be at least 1")
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
    )
    result = estimate(setup)
    share = result.trainable_params / result.total_params if result.total_params else 0.0
    header = [
        f"Model {name}: {result.total_params / 1e9:.2f} B parameters, "
        f"{result.trainable_params / 1e6:.2f} M trainable ({share:.2%})",
        f"{setup.method.value}, {setup.precision.value}, {setup.optimizer.value}, micro batch "
        f"{setup.micro_batch_size} x {setup.seq_len} tokens"
        f"{', gradient checkpointing' if setup.gradient_checkpointing else ''}, "
        f"ZeRO-{setup.zero_stage}, offload {setup.offload.value}, {setup.world_size} GPU(s)",
        "  component          per GPU",
    ]
    table = (
        "\n".join(header + breakdown_table(result.breakdown, result.per_gpu_bytes, result.host_bytes)) + "\n"
    )
    data = {
        "model": name,
        "per_gpu_bytes": result.per_gpu_bytes,
        "breakdown": dict(result.breakdown),
        "host_bytes": result.host_bytes,
        "total_params": result.total_params,
        "trainable_params": result.trainable_params,
        "setup": {
            k: (v.value if hasattr(v, "value") else v) for k, v in asdict(setup).items() if k != "arch"
        },
        "architecture": asdict(arch),
    }
    emit(data, args.output, table)
    return 0
