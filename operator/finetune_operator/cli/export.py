"""`ftctl export`: merge a trained adapter into its base model, a plain model for serving (vLLM,
`from_pretrained`) that needs no PEFT.

    ftctl export OUTPUT_DIR --output MERGED_DIR [--base MODEL] [--dtype bf16|fp16|fp32]

Runs the trainer's own merge (`python -m finetune_trainer.export`, installed by
`pip install 'finetune-operator[trainer]'`), the same code as a job's `output.saveMerged`.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

from finetune_operator.cli.common import CliError, HelpFormatter


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "export",
        help="merge a trained adapter into its base model",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    p.add_argument("adapter", type=Path, help="the job's output directory (adapter_config.json)")
    p.add_argument("--output", type=Path, required=True, help="where the merged model goes")
    p.add_argument("--base", help="the base model (directory or hub id); default: the adapter's record")
    p.add_argument(
        "--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="dtype of the merged weights"
    )
    p.add_argument("--num-labels", type=int, help="classification adapters: the number of labels")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("finetune_trainer") is None:
        raise CliError("the merge needs the trainer: pip install 'finetune-operator[trainer]'")
    command = [
        sys.executable,
        "-m",
        "finetune_trainer.export",
        str(args.adapter),
        "--output",
        str(args.output),
    ]
    command += ["--dtype", args.dtype]
    command += ["--base", args.base] if args.base else []
    command += ["--num-labels", str(args.num_labels)] if args.num_labels else []
    return subprocess.call(command)
