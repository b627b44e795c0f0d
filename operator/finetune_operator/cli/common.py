"""What the ftctl subcommands share: options, printing results, formatting bytes."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from finetune_operator.api.refusal import server_refusal
from finetune_operator.core.architecture import ModelArchitecture, load_hf_config
from finetune_operator.core.estimate import MemoryEstimate

if TYPE_CHECKING:
    from kubernetes.client.exceptions import ApiException

    from finetune_operator.client import FineTuneClient

GIB = 1024**3
COMPONENTS = ("weights", "gradients", "optimizer", "activations", "overhead")


class CliError(Exception):
    """Bad input: `ftctl` prints it as one line and exits 2 (as it does a ManifestError)."""


#: The version of ftctl's `-o json|yaml` documents (README, "Output schema"): fields are added, never
#: renamed or removed, within one version.
OUTPUT_API_VERSION = "ftctl.finetune.dev/v1"


def local_architecture(uri: str | None) -> ModelArchitecture | None:
    """A model given as a local directory plans from its own config.json (how `ftctl` tries a job)."""
    if uri is None or "://" in uri.removeprefix("file://"):
        return None
    config = Path(uri.removeprefix("file://")) / "config.json"
    return load_hf_config(config) if config.is_file() else None


def gib(value: int) -> str:
    return f"{value / GIB:.2f} GiB"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written, and every option's default in `--help`."""


def add_filename_option(parser: argparse.ArgumentParser, what: str = "FineTuneJob manifests") -> None:
    parser.add_argument(
        "-f",
        "--filename",
        required=True,
        metavar="FILE|DIR|-",
        help=f"{what}: a file (every document), a directory (its .yaml/.yml/.json files) or - for stdin",
    )


def add_output_option(
    parser: argparse.ArgumentParser, formats: Sequence[str] = ("table", "json", "yaml")
) -> None:
    parser.add_argument("-o", "--output", choices=formats, default=formats[0], help="output format")


def document(kind: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """A versioned output document (camelCase fields, as the API's own)."""
    return {"apiVersion": OUTPUT_API_VERSION, "kind": kind, **body}


def emit(data: Mapping[str, Any], fmt: str, table: str) -> None:
    """`data` as JSON or YAML, or `table` for people."""
    if fmt == "json":
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    elif fmt == "yaml":
        sys.stdout.write(yaml.safe_dump(dict(data), sort_keys=False))
    else:
        sys.stdout.write(table)


def emit_all(documents: Sequence[Mapping[str, Any]], fmt: str, table: str) -> None:
    """One document as itself, several as a List, as `kubectl get -o json` prints them."""
    single = len(documents) == 1
    emit(documents[0] if single else document("List", {"items": list(documents)}), fmt, table)


def breakdown_table(breakdown: Mapping[str, int], total: int, host: int) -> list[str]:
    rows = [f"  {name:<14}{gib(breakdown.get(name, 0)):>12}" for name in COMPONENTS]
    rows += [f"  {name:<14}{gib(value):>12}" for name, value in breakdown.items() if name not in COMPONENTS]
    rows.append(f"  {'total':<14}{gib(total):>12}")
    if host:
        rows.append(f"  {'host (offload)':<14}{gib(host):>12}")
    return rows


def add_cluster_options(parser: argparse.ArgumentParser) -> None:
    """Where the jobs are, as kubectl takes it."""
    parser.add_argument(
        "-n", "--namespace", help="namespace (default: the kubeconfig context's, else default)"
    )
    parser.add_argument(
        "--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config or in-cluster)"
    )


def client_for(args: argparse.Namespace) -> FineTuneClient:
    """The SDK client for the cluster commands; imported here, so the offline ones (plan, estimate,
    models, train) never load the kubernetes client (half of ftctl's start-up)."""
    from finetune_operator.client import FineTuneClient

    return FineTuneClient(namespace=args.namespace, kubeconfig=args.kubeconfig)


def age(moment: datetime | None, now: datetime | None = None) -> str:
    """kubectl's AGE: 42s, 5m10s, 3h20m, 2d4h."""
    if moment is None:
        return "<unknown>"
    seconds = max(int(((now or datetime.now(UTC)) - moment).total_seconds()), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m{secs}s" if secs and minutes < 10 else f"{minutes}m"
    return f"{secs}s"


def columns(rows: Sequence[Sequence[str]]) -> str:
    """Rows aligned as kubectl prints them: three spaces between columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "".join(
        "   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n" for row in rows
    )


def api_message(exc: ApiException) -> str:
    """An API server refusal as kubectl prints it: `Error from server (NotFound): ...`."""
    reason, message = server_refusal(exc)
    return f"Error from server ({reason}): {message}"


def explain_peak(estimate: MemoryEstimate, zero_stage: int) -> list[str]:
    """Why the total is what it is: the moment of the peak and, for full tuning, the bytes per parameter
    against the 16 B rule of thumb."""
    if estimate.peak_phase == "optimizer_step":
        lines = [
            "  peak at the optimizer step: every gradient and the optimizer's states are alive; the "
            f"activations ({gib(estimate.activation_bytes)} at their own peak, in backward) are freed by then"
        ]
    elif estimate.peak_phase == "load":
        lines = [
            "  peak while loading: the 16-bit weights that are not 4-bit are upcast to fp32 for a moment"
        ]
    else:
        lines = ["  peak in backward: the activations are alive, the gradients not all computed yet"]
    states = sum(estimate.breakdown.get(k, 0) for k in ("weights", "gradients", "optimizer"))
    per_param = states / estimate.total_params if estimate.total_params else 0.0
    if zero_stage == 0 and estimate.trainable_params == estimate.total_params and per_param > 16.5:
        temporary = " and the unfused AdamW step one moment-sized temporary (4 B)" if per_param > 20.5 else ""
        lines.append(
            f"  {per_param:.1f} B per parameter, not the rule of thumb's 16 (16-bit weights and gradients, fp32 "
            f"master and Adam's two moments): DeepSpeed also keeps fp32 gradients (4 B){temporary}"
        )
    return lines
