"""`ftctl train`: run a FineTuneJob on this machine with the trainer the pods run (like `llamafactory-cli train`).

    ftctl train -f job.yaml --nproc-per-node 2 --output-dir ./out

It plans the job as the operator does, renders the trainer config with the same `render_trainer_config`,
writes it to `<output>/trainer_config.yaml`, and runs
`finetune-launch --standalone --nproc_per_node N --no-python finetune-train --config …` (torchrun keeping
the workers' exit codes; DeepSpeed on gloo when there is no GPU), the trainer image's own commands, which
`pip install 'finetune-operator[trainer]'` installs beside ftctl. Local paths and
file:// URIs are accepted for model, data set and output; pvc:// claims need `--mount CLAIM=PATH`.
The exit status is the trainer's (0, 75 retryable, 78 configuration error, 79 out of memory).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from finetune_operator.api.exit_codes import describe
from finetune_operator.api.models import FineTuneJob
from finetune_operator.api.text import GIB
from finetune_operator.api.trainer import (
    CONFIG_FILE,
    LAUNCH_COMMAND,
    LOSS_PLOT_FILE,
    SUMMARY_FILE,
    TRAIN_COMMAND,
    TRAIN_LOG_FILE,
    ProgressSettings,
    TrainerConfig,
)
from finetune_operator.cli.common import (
    CliError,
    HelpFormatter,
    add_filename_option,
    local_architecture,
)
from finetune_operator.core.plan import plan
from finetune_operator.core.trainer_config import render_trainer_config
from finetune_operator.manifests import load_job


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "train",
        help="run a FineTuneJob locally with the workers' trainer (torchrun + DeepSpeed)",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    add_filename_option(p, "the FineTuneJob (one)")
    p.add_argument(
        "--nproc-per-node", type=int, default=1, help="worker processes (one per GPU; on CPU, any count)"
    )
    p.add_argument("--output-dir", type=Path, help="write here instead of spec.output.uri")
    p.add_argument(
        "--mount",
        action="append",
        default=[],
        metavar="CLAIM=PATH",
        help="where a pvc:// claim is on this machine",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="write the trainer config, print the command, run nothing"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="train again into an output directory that holds a finished run (its checkpoints are removed)",
    )
    p.set_defaults(run=run)


def local_job(job: FineTuneJob, output_dir: Path | None) -> FineTuneJob:
    """The job with relative local paths made absolute (the config is read from another directory) and
    the output redirected; URIs with a scheme are left as they are."""
    spec = job.spec

    def absolute(uri: str | None) -> str | None:
        if uri is None or "://" in uri:
            return uri
        return str(Path(uri).resolve())

    output = spec.output.model_copy(
        update={"uri": str(output_dir.resolve()) if output_dir else absolute(spec.output.uri)}
    )
    checkpointing = spec.checkpointing.model_copy(update={"uri": absolute(spec.checkpointing.uri)})
    model = spec.model.model_copy(update={"uri": absolute(spec.model.uri)})
    dataset = spec.dataset.model_copy(update={"uri": absolute(spec.dataset.uri)})
    new_spec = spec.model_copy(
        update={"model": model, "dataset": dataset, "output": output, "checkpointing": checkpointing}
    )
    return job.model_copy(update={"spec": new_spec})


def parse_mounts(entries: list[str]) -> dict[str, str]:
    mounts = {}
    for entry in entries:
        claim, sep, path = entry.partition("=")
        if not sep or not claim or not path:
            raise CliError(f"--mount {entry!r}: expected CLAIM=PATH")
        mounts[claim] = str(Path(path).resolve())
    return mounts


def build_config(args: argparse.Namespace) -> TrainerConfig:
    """Plan and render exactly as the operator does, with this machine's paths and process count."""
    if args.nproc_per_node < 1:
        raise CliError("--nproc-per-node must be at least 1")
    job = local_job(load_job(args.filename, "ftctl train", complete=this_machines_gpu), args.output_dir)
    planned = plan(job.spec, arch=local_architecture(job.spec.model.uri))
    return render_trainer_config(
        job,
        planned,
        mounts=parse_mounts(args.mount),
        world_size=args.nproc_per_node,
        progress=ProgressSettings(reporter="file", interval_seconds=0.0, metrics_port=None),
    )


def this_machines_gpu(document: dict[str, Any]) -> None:
    """A job that names no GPU plans for this machine's: the first CUDA device's memory, or on CPU the
    host memory per process, which is what training uses there."""
    resources = document.setdefault("spec", {}).setdefault("resources", {})
    if resources.get("gpuType") or resources.get("gpuMemoryGiB"):
        return
    resources["gpuMemoryGiB"] = round(local_accelerator_bytes() / GIB, 1)


def local_accelerator_bytes() -> int:
    try:
        import torch  # the trainer extra; without it the job is planned for host memory

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory)
    except ImportError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def check_output(output: Path, checkpoints: Path, overwrite: bool) -> None:
    """A finished run's directory is not trained into again by accident: its summary would be replaced
    by an empty history. Checkpoints without a summary are an interrupted run, which resumes."""
    if not (output / SUMMARY_FILE).exists():
        return
    if not overwrite:
        raise CliError(
            f"{output} holds a finished run ({SUMMARY_FILE}); use another --output-dir, or --overwrite to "
            "train from scratch there"
        )
    # The trackers' stores (runs/, mlruns/, wandb/) hold many runs by design; the new run is added to them.
    for stale in (output / SUMMARY_FILE, output / TRAIN_LOG_FILE, output / LOSS_PLOT_FILE, checkpoints):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()


def trainer_command(name: str) -> str:
    """A trainer command installed beside this Python (a venv need not be on PATH), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        raise CliError(f"{name} not found: install the trainer with pip install 'finetune-operator[trainer]'")
    return found


def launch_command(config_path: Path, nproc: int) -> list[str]:
    return [
        trainer_command(LAUNCH_COMMAND),
        "--standalone",  # a private rendezvous on a free port: two local runs never collide
        "--nproc_per_node",
        str(nproc),
        "--no-python",
        trainer_command(TRAIN_COMMAND),
        "--config",
        str(config_path),
    ]


def run(args: argparse.Namespace) -> int:
    config = build_config(args)
    output = Path(config.paths.output)
    if not args.dry_run:
        check_output(output, Path(config.paths.checkpoints), args.overwrite)
    config_path = output / CONFIG_FILE
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(config.to_yaml())
    command = launch_command(config_path, args.nproc_per_node)
    print(
        f"ftctl train: {config.method.type.value}, ZeRO-{config.zero_stage}, {args.nproc_per_node} process(es); "
        f"config {config_path}",
        file=sys.stderr,
    )
    if args.dry_run:
        print(" ".join(command))
        return 0
    code = subprocess.call(command)
    summary = output / SUMMARY_FILE
    if code == 0 and summary.exists():
        plot = f", plot {LOSS_PLOT_FILE}" if (output / LOSS_PLOT_FILE).exists() else ""
        print(
            f"ftctl train: saved to {output} (summary {summary.name}, log {TRAIN_LOG_FILE}{plot})",
            file=sys.stderr,
        )
    elif code != 0:
        print(
            f"ftctl train: the trainer exited {code} ({describe(code)}); see its last line above",
            file=sys.stderr,
        )
    return code
