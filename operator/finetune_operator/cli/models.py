"""`ftctl models`: the built-in model and GPU catalogues that planning works from offline."""

from __future__ import annotations

import argparse

from finetune_operator.api.enums import Method
from finetune_operator.cli.common import HelpFormatter, add_output_option, document, emit, gib
from finetune_operator.core.architecture import catalogue_architecture, catalogue_names
from finetune_operator.core.estimate import TrainingSetup, estimate
from finetune_operator.core.hardware import gpu_model, gpu_names


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "models",
        help="list the built-in model architectures and GPU products",
        description="List the model names (hub names) and GPU products the planner knows without a download. "
        "-o json|yaml prints kind Catalogue: parameters per model, memory bytes per GPU.",
        formatter_class=HelpFormatter,
    )
    add_output_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    models = {
        name: estimate(TrainingSetup(catalogue_architecture(name), Method.FULL)).total_params
        for name in catalogue_names()
    }
    gpus = {name: gpu_model(name).memory_bytes for name in gpu_names()}
    lines = ["MODEL" + " " * 45 + "PARAMS"]
    lines += [f"{name:<50}{params / 1e9:>6.2f} B" for name, params in models.items()]
    lines += [
        "",
        "GPU" + " " * 17 + "MEMORY",
        *(f"{name:<20}{gib(memory):>10}" for name, memory in gpus.items()),
    ]
    emit(document("Catalogue", {"models": models, "gpus": gpus}), args.output, "\n".join(lines) + "\n")
    return 0
