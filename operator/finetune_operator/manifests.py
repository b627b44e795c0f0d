"""FineTuneJob manifests read as kubectl reads `-f`: a file (every document), a directory (its
.yaml/.yml/.json files in name order, not recursive) or `-` (stdin); errors say file:line:column.

Shared by `ftctl` and `FineTuneClient.submit`, so a job the SDK submits is read exactly as ftctl plans it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from finetune_operator.api.base import describe_error_item
from finetune_operator.api.models import FineTuneJob, parse_job


class ManifestError(ValueError):
    """A manifest that cannot be read or is not a valid FineTuneJob: one line saying where and why."""


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
            raise ManifestError(f"{path}: no {', '.join(MANIFEST_SUFFIXES)} files")
        return [(str(p), p.read_text()) for p in files]
    return [(str(path), path.read_text())]


#: Fills in what a document may leave out in one context (ftctl train: the GPU of this machine).
Completer = Callable[[dict[str, Any]], None]


def load_jobs(filename: str, complete: Completer | None = None) -> list[LoadedJob]:
    """Every FineTuneJob in what `-f` names (documents of other kinds are skipped, as `kubectl apply -f`
    would send them elsewhere), validated; errors say file:line:column and the field."""
    jobs = [job for name, text in read_sources(filename) for job in _jobs_in(name, text, complete)]
    if not jobs:
        raise ManifestError(f"{'<stdin>' if filename == '-' else filename}: no FineTuneJob document")
    return jobs


def load_job(filename: str, command: str, complete: Completer | None = None) -> FineTuneJob:
    """The one FineTuneJob a command that runs a single job needs."""
    jobs = load_jobs(filename, complete)
    if len(jobs) > 1:
        where = ", ".join(j.where for j in jobs)
        raise ManifestError(f"{command} takes one FineTuneJob; {filename} has {len(jobs)} ({where})")
    return jobs[0].job


def _jobs_in(name: str, text: str, complete: Completer | None) -> list[LoadedJob]:
    try:
        documents = [node for node in yaml.compose_all(text, Loader=yaml.SafeLoader) if node is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark is not None else name
        raise ManifestError(f"{where}: not YAML: {problem}") from exc
    found = []
    for node in documents:
        document = yaml.SafeLoader("").construct_document(node)
        if not (isinstance(document, dict) and document.get("kind") == "FineTuneJob"):
            continue
        if complete is not None:
            complete(document)
        try:
            job = parse_job(document)
        except ValidationError as exc:
            problems = [
                f"{_position(name, node, item['loc'], item['type'] == 'extra_forbidden')}: "
                f"{describe_error_item(item)}"
                for item in exc.errors()
            ]
            raise ManifestError("; ".join(problems)) from exc
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
