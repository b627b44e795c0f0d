"""`ftctl plan`: the GPU count, node layout, ZeRO stage and offload the operator would choose for a job."""

from __future__ import annotations

import argparse
from pathlib import Path

from finetune_operator.cli.common import breakdown_table, emit, gib, load_job, local_architecture
from finetune_operator.core.architecture import load_hf_config
from finetune_operator.core.plan import plan

#: Exit status when the plan is made but the job does not fit, so scripts can tell it from bad input (2).
DOES_NOT_FIT = 1


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "plan",
        help="show the plan the operator would make for a FineTuneJob",
        description="Plan a FineTuneJob as the operator would: the fewest GPUs that fit, then the fastest "
        "ZeRO stage and offload. Exits 1 when the job does not fit, 2 on bad input.",
    )
    p.add_argument("-f", "--filename", type=Path, required=True, help="FineTuneJob YAML")
    p.add_argument("--model-config", type=Path, help="plan from this config.json instead of the catalogue")
    p.add_argument("-o", "--output", choices=("table", "yaml", "json"), default="table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    job = load_job(args.filename)
    arch = load_hf_config(args.model_config) if args.model_config else local_architecture(job.spec.model.uri)
    result = plan(job.spec, arch=arch)
    data = {
        "name": job.metadata.name,
        "fits": result.fits,
        "gpus": result.gpus,
        "nodes": result.nodes,
        "gpus_per_node": result.gpus_per_node,
        "zero_stage": result.zero_stage,
        "offload": result.offload.value,
        "gpu_type": result.gpu_type,
        "per_gpu_bytes": result.per_gpu_bytes,
        "usable_bytes": result.usable_bytes,
        "host_bytes_per_node": result.host_bytes_per_node,
        "worker_memory_bytes": result.requests.memory_bytes,
        "worker_ephemeral_storage_bytes": result.requests.ephemeral_storage_bytes,
        "checkpoint_seconds": result.requests.checkpoint_seconds,
        "breakdown": dict(result.estimate.breakdown),
        "total_params": result.estimate.total_params,
        "trainable_params": result.estimate.trainable_params,
        "message": result.message,
        "suggestions": list(result.suggestions),
    }
    verdict = "fits" if result.fits else "DOES NOT FIT"
    lines = [
        f"FineTuneJob {job.metadata.name}: {job.spec.method.type.value} on {result.gpu_type or 'GPUs'} "
        f"({gib(result.usable_bytes)} usable per GPU) - {verdict}",
        f"  GPUs {result.gpus} = {result.nodes} node(s) x {result.gpus_per_node}, ZeRO-{result.zero_stage}, "
        f"offload {result.offload.value}",
        f"  {result.message}",
        f"  each worker requests {gib(result.requests.memory_bytes)} host memory and "
        f"{gib(result.requests.ephemeral_storage_bytes)} local disk; a checkpoint takes about "
        f"{result.requests.checkpoint_seconds} s to write",
        "  component          per GPU",
        *breakdown_table(result.estimate.breakdown, result.per_gpu_bytes, result.estimate.host_bytes),
    ]
    emit(data, args.output, "\n".join(lines) + "\n")
    return 0 if result.fits else DOES_NOT_FIT
