"""What the ftctl subcommands share: loading a job file, printing results, formatting bytes."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from finetune_operator.api.base import describe_validation_error
from finetune_operator.api.models import FineTuneJob, parse_job
from finetune_operator.core.architecture import ModelArchitecture, load_hf_config

GIB = 1024**3
COMPONENTS = ("weights", "gradients", "optimizer", "activations", "overhead")


class CliError(Exception):
    """Bad input: `ftctl` prints it as one line and exits 2."""


def load_job(path: Path) -> FineTuneJob:
    """The first FineTuneJob in a YAML file, validated, or a one-line error naming the bad fields."""
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
    except yaml.YAMLError as exc:
        raise CliError(f"{path}: not YAML: {exc}".splitlines()[0]) from exc
    jobs = [d for d in documents if isinstance(d, dict) and d.get("kind") == "FineTuneJob"]
    if not jobs:
        raise CliError(f"{path}: no FineTuneJob document")
    try:
        return parse_job(jobs[0])
    except ValidationError as exc:
        raise CliError(f"{path}: {describe_validation_error(exc)}") from exc


def local_architecture(uri: str | None) -> ModelArchitecture | None:
    """A model given as a local directory plans from its own config.json (how `ftctl` tries a job)."""
    if uri is None or "://" in uri.removeprefix("file://"):
        return None
    config = Path(uri.removeprefix("file://")) / "config.json"
    return load_hf_config(config) if config.is_file() else None


def gib(value: int) -> str:
    return f"{value / GIB:.2f} GiB"


def emit(data: Mapping[str, Any], fmt: str, table: str) -> None:
    if fmt == "json":
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    elif fmt == "yaml":
        sys.stdout.write(yaml.safe_dump(dict(data), sort_keys=False))
    else:
        sys.stdout.write(table)


def breakdown_table(breakdown: Mapping[str, int], total: int, host: int) -> list[str]:
    rows = [f"  {name:<14}{gib(breakdown.get(name, 0)):>12}" for name in COMPONENTS]
    rows += [f"  {name:<14}{gib(value):>12}" for name, value in breakdown.items() if name not in COMPONENTS]
    rows.append(f"  {'total':<14}{gib(total):>12}")
    if host:
        rows.append(f"  {'host (offload)':<14}{gib(host):>12}")
    return rows
