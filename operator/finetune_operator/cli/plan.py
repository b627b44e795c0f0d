"""`ftctl plan`: the GPU count, node layout, ZeRO stage and offload the operator would choose for each job."""

from __future__ import annotations

import argparse
from pathlib import Path

from finetune_operator.api.models import FineTuneJob
from finetune_operator.api.text import count
from finetune_operator.cli.common import (
    HelpFormatter,
    add_filename_option,
    add_output_option,
    breakdown_table,
    document,
    emit_all,
    explain_peak,
    gib,
    local_architecture,
)
from finetune_operator.core.architecture import load_hf_config
from finetune_operator.core.plan import Plan, plan
from finetune_operator.core.requests import quantity_bytes
from finetune_operator.manifests import load_jobs

#: Exit status when the plan is made but the job does not fit, so scripts can tell it from bad input (2).
DOES_NOT_FIT = 1


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "plan",
        help="show the plan the operator would make for FineTuneJobs",
        description="Plan each FineTuneJob as the operator would: the fewest GPUs that fit, then the fastest "
        "ZeRO stage and offload. -o json|yaml prints `status.plan` as the operator writes it (kind Plan, "
        "or a List of them). Exits 1 when a job does not fit, 2 on bad input.",
        formatter_class=HelpFormatter,
    )
    add_filename_option(p)
    p.add_argument("--model-config", type=Path, help="plan from this config.json instead of the catalogue")
    p.add_argument(
        "--node-memory",
        type=_quantity,
        metavar="QUANTITY",
        help="host memory of a GPU node (e.g. 512Gi), as the operator's placement.nodeMemory: no layout "
        "whose workers request more; unset, nothing is checked",
    )
    add_output_option(p)
    p.set_defaults(run=run)


def _quantity(text: str) -> int:
    try:
        return quantity_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def run(args: argparse.Namespace) -> int:
    documents, blocks, all_fit = [], [], True
    for loaded in load_jobs(args.filename):
        job = loaded.job
        arch = (
            load_hf_config(args.model_config) if args.model_config else local_architecture(job.spec.model.uri)
        )
        result = plan(job.spec, arch=arch, node_memory=args.node_memory)
        all_fit = all_fit and result.fits
        documents.append(
            document(
                "Plan",
                {
                    "metadata": {
                        "name": job.metadata.name,
                        **({"namespace": job.metadata.namespace} if job.metadata.namespace else {}),
                        "source": loaded.where,
                    },
                    "plan": result.to_status().model_dump(mode="json", by_alias=True, exclude_none=True),
                    "suggestions": list(result.suggestions),
                },
            )
        )
        blocks.append(table(job, result))
    emit_all(documents, args.output, "\n".join(blocks))
    return 0 if all_fit else DOES_NOT_FIT


def table(job: FineTuneJob, result: Plan) -> str:
    verdict = "fits" if result.fits else "DOES NOT FIT"
    lines = [
        f"FineTuneJob {job.metadata.name}: {job.spec.method.type.value} on {result.gpu_type or 'GPUs'} "
        f"({gib(result.usable_bytes)} usable per GPU) - {verdict}",
        f"  {count(result.gpus, 'GPU')} = {count(result.nodes, 'node')} x {result.gpus_per_node}, "
        f"ZeRO-{result.zero_stage}, offload {result.offload.value}",
        f"  {result.message}",
        f"  each worker requests {gib(result.requests.memory_bytes)} host memory and "
        f"{gib(result.requests.ephemeral_storage_bytes)} local disk; a checkpoint takes about "
        f"{result.requests.checkpoint_seconds} s to write",
        "  component          per GPU",
        *breakdown_table(result.estimate.breakdown, result.per_gpu_bytes, result.estimate.host_bytes),
        *explain_peak(result.estimate, result.zero_stage),
    ]
    return "\n".join(lines) + "\n"
