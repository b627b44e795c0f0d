"""Checkpoint discovery, completion markers and rotation.

HF Trainer writes `checkpoint-N/` piece by piece (model or adapter, DeepSpeed shards of every rank,
trainer state). A pod killed half way leaves a directory that looks like a checkpoint and is not one, so
a checkpoint only counts once the `COMPLETE` marker is in it; the marker is written by rank 0 after a
barrier that every rank reaches only when its own shards are on disk, and it is itself written to a
temporary name and renamed (rename is atomic on POSIX file systems, NFS and CephFS included).

Rotation is ours, not HF's `save_total_limit`: HF deletes old checkpoints before the new one is marked,
which with a limit of 1 leaves a window with no usable checkpoint at all.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

PREFIX = "checkpoint-"
MARKER = "COMPLETE"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path
    complete: bool


def list_checkpoints(root: str | Path) -> list[Checkpoint]:
    """Every `checkpoint-N` directory under `root`, oldest step first; other names are ignored."""
    base = Path(root)
    if not base.is_dir():
        return []
    found = []
    for entry in base.iterdir():
        match = _NAME.match(entry.name)
        if match and entry.is_dir():
            found.append(Checkpoint(int(match.group(1)), entry, (entry / MARKER).is_file()))
    return sorted(found, key=lambda c: c.step)


def latest_complete(root: str | Path) -> Checkpoint | None:
    """The checkpoint to resume from: the newest one with its marker, or None to start at step 0."""
    complete = [c for c in list_checkpoints(root) if c.complete]
    return complete[-1] if complete else None


def mark_complete(path: str | Path, step: int) -> None:
    """Declare `path` complete; call only when every rank has finished writing into it."""
    target = Path(path)
    temporary = target / f".{MARKER}.tmp"
    temporary.write_text(json.dumps({"step": step, "time": datetime.now(UTC).isoformat(timespec="seconds")}))
    os.replace(temporary, target / MARKER)


def prune(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints, and partial ones older than the newest
    complete one (leftovers of a crash). Partial ones newer than it are left: one may be being written.
    Returns what was deleted.
    """
    checkpoints = list_checkpoints(root)
    complete = [c for c in checkpoints if c.complete]
    if not complete:
        return []
    newest = complete[-1].step
    doomed = [c.path for c in complete[:-keep]] if keep > 0 else []
    doomed += [c.path for c in checkpoints if not c.complete and c.step < newest]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def remove_partial(root: str | Path) -> list[Path]:
    """At start-up (no save in flight), delete every unmarked checkpoint so a new save of the same step
    never mixes with a dead attempt's files."""
    doomed = [c.path for c in list_checkpoints(root) if not c.complete]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed
