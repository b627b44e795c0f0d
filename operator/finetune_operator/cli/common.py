"""What the ftctl subcommands share: reading `-f` as kubectl does, printing results, formatting bytes."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from finetune_operator.api.base import describe_error_item
from finetune_operator.api.models import FineTuneJob, parse_job
from finetune_operator.core.architecture import ModelArchitecture, load_hf_config

GIB = 1024**3
COMPONENTS = ("weights", "gradients", "optimizer", "activations", "overhead")


class CliError(Exception):
    """Bad input: `ftctl` prints it as one line and exits 2."""


#: The version of ftctl's `-o json|yaml` documents (README, "Output schema"): fields are added, never
#: renamed or removed, within one version.
OUTPUT_API_VERSION = "ftctl.finetune.dev/v1"
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class LoadedJob:
    """A FineTuneJob and where it came from (`file:line`), so several jobs' output can be told apart."""

    job: FineTuneJob
    where: str


def read_sources(filename: str) -> list[tuple[str, str]]:
    """(name, text) of what `-f` names, as kubectl reads it: `-` is stdin, a directory is its
    .yaml/.yml/.json files in name order (not recursive), anything else one file."""
    if filename == "-":
        return [("<stdin>", sys.stdin.read())]
    path = Path(filename)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in MANIFEST_SUFFIXES)
        if not files:
            raise CliError(f"{path}: no {', '.join(MANIFEST_SUFFIXES)} files")
        return [(str(p), p.read_text()) for p in files]
    return [(str(path), path.read_text())]


def load_jobs(filename: str) -> list[LoadedJob]:
    """Every FineTuneJob in what `-f` names (documents of other kinds are skipped, as `kubectl apply -f`
    would send them elsewhere), validated; errors say file:line:column and the field."""
    jobs = [job for name, text in read_sources(filename) for job in _jobs_in(name, text)]
    if not jobs:
        raise CliError(f"{'<stdin>' if filename == '-' else filename}: no FineTuneJob document")
    return jobs


def load_job(filename: str, command: str) -> FineTuneJob:
    """The one FineTuneJob a command that runs a single job needs."""
    jobs = load_jobs(filename)
    if len(jobs) > 1:
        where = ", ".join(j.where for j in jobs)
        raise CliError(f"{command} takes one FineTuneJob; {filename} has {len(jobs)} ({where})")
    return jobs[0].job


def _jobs_in(name: str, text: str) -> list[LoadedJob]:
    try:
        documents = [node for node in yaml.compose_all(text, Loader=yaml.SafeLoader) if node is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark is not None else name
        raise CliError(f"{where}: not YAML: {problem}") from exc
    found = []
    for node in documents:
        document = yaml.SafeLoader("").construct_document(node)
        if not (isinstance(document, dict) and document.get("kind") == "FineTuneJob"):
            continue
        try:
            job = parse_job(document)
        except ValidationError as exc:
            problems = [
                f"{_position(name, node, item['loc'], item['type'] == 'extra_forbidden')}: "
                f"{describe_error_item(item)}"
                for item in exc.errors()
            ]
            raise CliError("; ".join(problems)) from exc
        found.append(LoadedJob(job, f"{name}:{node.start_mark.line + 1}"))
    return found


def _position(name: str, node: yaml.Node, loc: Sequence[Any], at_key: bool) -> str:
    """file:line:column of the deepest node on `loc` (a pydantic error's path, camelCase keys): a bad value
    points at the value, an unknown field (`at_key`) at its key."""
    mark = node.start_mark
    for depth, part in enumerate(loc, 1):
        if isinstance(node, yaml.MappingNode):
            pair = next(((k, v) for k, v in node.value if k.value == part), None)
            if pair is None:
                break
            mark, node = pair[0].start_mark, pair[1]
            last = depth == len(loc)
            if not (last and at_key) and not isinstance(node, yaml.MappingNode | yaml.SequenceNode):
                mark = node.start_mark
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            mark = node.start_mark
        else:
            break
    return f"{name}:{mark.line + 1}:{mark.column + 1}"


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
