"""Run a module under tracemalloc and, on SIGUSR1, write what holds its memory.

Usage: python bench/memory_holders.py OUT.txt -m MODULE [ARGS...]

`bench/operator_scale.py` runs ours this way when BENCH_MEMORY=OUT is set, and signals it once its jobs
have settled, before it stops it. The report (written whole, then renamed into place) has the traced
total, the files and lines whose allocations are still alive, and the deep size of each holder the
operator keeps per job: the controller's cached intents, its two stores and its job loops (each a
task; a deep size sees a task's object, not its coroutine's frames), and kopf's per-object memories
(since kopf no longer watches the jobs, only of the CRDs it watches for the leading daemon). A deep
size counts each object once, in the first holder that reaches it. Tracing costs memory and CPU of its
own: the figures of such a run are not the benchmark's.
"""

from __future__ import annotations

import asyncio
import gc
import os
import runpy
import signal
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType, FunctionType, ModuleType
from typing import Any

MIB = 1 << 20
#: Objects a deep size does not walk into: shared machinery, not what a job holds.
OPAQUE = (type, FunctionType, ModuleType, asyncio.AbstractEventLoop)


def deep_size(root: object, seen: set[int]) -> int:
    """Bytes of `root` and everything it reaches through containers and attributes, each object once."""
    size, stack = 0, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, OPAQUE):
            continue
        seen.add(id(obj))
        size += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            stack.append(vars(obj))
        else:
            stack.extend(getattr(obj, s) for s in getattr(type(obj), "__slots__", ()) if hasattr(obj, s))
    return size


def instances(class_name: str) -> Iterator[Any]:
    return (o for o in gc.get_objects() if type(o).__name__ == class_name)


#: What the controller keeps per job, and how to reach it from the controller.
CONTROLLER_HOLDERS: dict[str, Callable[[Any], object]] = {
    "controller: cached intents": lambda c: c._intents,
    "controller: job store": lambda c: c.jobs.objects,
    "controller: pod store": lambda c: c.pods.objects,
    "controller: job loops": lambda c: c._loops,
}


def report() -> str:
    gc.collect()
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    by_file = snapshot.statistics("filename")
    lines = [f"traced: {sum(s.size for s in by_file) / MIB:.1f} MiB", "", "alive, by file:"]
    lines += [f"{s.size / MIB:8.2f} MiB {s.count:8d} {s.traceback[0].filename}" for s in by_file[:25]]
    lines += ["", "alive, by line:"]
    lines += [
        f"{s.size / MIB:8.2f} MiB {s.count:8d} {s.traceback[0].filename}:{s.traceback[0].lineno}"
        for s in snapshot.statistics("lineno")[:25]
    ]
    lines += ["", "holders (deep size; each object counted once, in the first that reaches it):"]
    seen: set[int] = set()
    controllers = list(instances("Controller"))
    jobs = sum(len(c.jobs.objects) for c in controllers)
    found = [(name, reach(c)) for c in controllers for name, reach in CONTROLLER_HOLDERS.items()]
    found += [("kopf's memories", m) for m in instances("ResourceMemories")]
    for name, holder in found:
        size = deep_size(holder, seen)
        lines.append(f"{size / MIB:8.2f} MiB {size / max(jobs, 1) / 1024:8.1f} KiB a job  {name}")
    lines.append(f"({jobs} jobs in the store)")
    return "\n".join(lines) + "\n"


def write_report(out: Path) -> Callable[[int, FrameType | None], None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        partial = out.with_name(out.name + ".partial")
        partial.write_text(report())
        partial.rename(out)

    return handler


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "-m":
        print(__doc__, file=sys.stderr)
        return 2
    out, module, args = Path(argv[0]), argv[2], argv[3:]
    tracemalloc.start()
    signal.signal(signal.SIGUSR1, write_report(out))
    sys.argv = [module, *args]
    sys.path[0] = os.getcwd()  # as `python -m` has it, rather than this script's directory
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
