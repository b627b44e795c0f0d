"""Run a module under cProfile in every thread, timed by each thread's CPU clock, and write one profile.

Usage: python bench/profile_threads.py OUT.prof -m MODULE [ARGS...]
       python bench/profile_threads.py --report OUT.prof

`python -m cProfile` profiles only the main thread with the wall clock. The operator spends much of its
CPU elsewhere (the informers' watch threads decode every event; the API calls run in a worker pool), and
a thread blocked on a socket would bill its wait to `read`. So each thread that starts gets its own
profiler on `time.thread_time`, and at exit their statistics are merged into OUT (read it with
`python -m pstats OUT` or `bench/profile_threads.py --report OUT`); OUT.main holds the main thread's
alone, and OUT.threads.txt lists each thread's profiled CPU beside what the kernel counted for it.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import runpy
import sys
import threading
import time
from pathlib import Path
from typing import Any

#: Each thread's profiler, with the thread's name and kernel id.
_profilers: list[tuple[str, int, cProfile.Profile]] = []
_lock = threading.Lock()


def _new_profiler() -> cProfile.Profile:
    profiler = cProfile.Profile(time.thread_time)
    thread = threading.current_thread()
    with _lock:
        _profilers.append((thread.name, threading.get_native_id(), profiler))
    return profiler


#: The kernel's last count of each thread's CPU seconds (utime + stime), sampled every second.
_kernel_cpu: dict[int, float] = {}


def _sample_kernel_cpu(stop: threading.Event) -> None:
    """Keep `_kernel_cpu` current, so that a thread that has ended still has its (nearly) final count."""
    while not stop.wait(1.0):
        _sample()
    _sample()


def _sample() -> None:
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        _kernel_cpu[int(task.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_table(threads: list[tuple[str, int, _Snapshot]]) -> str:
    """Per thread: its name, the CPU its profile adds up to, and the kernel's count where it still runs."""
    lines = [f"{'thread':<40} {'profiled s':>10} {'kernel s':>9}"]
    for name, native_id, snapshot in threads:
        total = sum(stat[2] for stat in snapshot.stats.values())
        kernel = _kernel_cpu.get(native_id)
        lines.append(f"{name:<40} {total:>10.2f} {'-' if kernel is None else f'{kernel:.2f}':>9}")
    return "\n".join(lines) + "\n"


def _start_in_thread(*_: Any) -> None:
    """threading's per-thread profile hook: called once in each new thread, it installs that thread's own
    profiler, which replaces this hook."""
    _new_profiler().enable()


class _Snapshot:
    """A profiler's statistics as `pstats.Stats` takes them. Handing it the profiler itself would call its
    `create_stats`, whose `disable` closes every call still open (a watch blocked in `read`) with the
    clock of the thread that asks: another thread's CPU time, billed as that call's. `pstats.Stats` also
    empties what it is handed, so it is handed a `copy`."""

    def __init__(self, stats: dict[Any, Any]) -> None:
        self.stats = stats

    @classmethod
    def of(cls, profiler: cProfile.Profile) -> _Snapshot:
        profiler.snapshot_stats()
        return cls(dict(profiler.stats))  # type: ignore[attr-defined]

    def copy(self) -> _Snapshot:
        return _Snapshot(dict(self.stats))

    def create_stats(self) -> None:
        """Already made."""


def merged(snapshots: list[_Snapshot]) -> pstats.Stats:
    """Threads' statistics as one; a thread still running is read as it stands (its calls in flight are
    not counted yet)."""
    snapshots = [s for s in snapshots if s.stats]
    stats = pstats.Stats(snapshots[0].copy())
    for snapshot in snapshots[1:]:  # pstats refuses a thread with no call finished yet
        stats.add(snapshot.copy())
    return stats


def report(path: str, limit: int = 40) -> str:
    """The thread table, then the functions that spent the most CPU themselves, then those under which
    the most was spent (this repository's and its libraries' paths shortened)."""
    text = io.StringIO()
    threads = Path(f"{path}.threads.txt")
    if threads.exists():
        text.write(threads.read_text() + "\n")
    stats = pstats.Stats(path, stream=text)
    stats.sort_stats("tottime").print_stats(limit)
    stats.sort_stats("cumulative").print_stats(limit)
    if Path(f"{path}.main").exists():
        text.write("The main thread alone (the event loop: kopf and the controller's decisions)\n")
        main_thread = pstats.Stats(f"{path}.main", stream=text)
        main_thread.sort_stats("tottime").print_stats(limit)
        main_thread.sort_stats("cumulative").print_stats(limit)
    prefixes = {*(p + "/" for p in sys.path if p.endswith("-packages")), str(Path.cwd()) + "/"}
    result = text.getvalue()
    for prefix in sorted(prefixes, key=len, reverse=True):
        result = result.replace(prefix, "")
    return result


def main(argv: list[str]) -> int:
    if argv[:1] == ["--report"] and len(argv) == 2:
        print(report(argv[1]), end="")
        return 0
    if len(argv) < 3 or argv[1] != "-m":
        print(__doc__, file=sys.stderr)
        return 2
    out, module, args = argv[0], argv[2], argv[3:]
    main_profiler = _new_profiler()
    stop_sampling = threading.Event()
    sampler = threading.Thread(
        target=_sample_kernel_cpu, args=(stop_sampling,), name="cpu-sampler", daemon=True
    )
    sampler.start()
    threading.setprofile(_start_in_thread)
    sys.argv = [module, *args]
    sys.path[0] = os.getcwd()  # as `python -m` has it, rather than this script's directory
    main_profiler.enable()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 0
    else:
        code = 0
    finally:
        main_profiler.disable()
        threading.setprofile(None)  # type: ignore[arg-type]
        stop_sampling.set()
        sampler.join()
        with _lock:
            threads = [(name, native_id, _Snapshot.of(profiler)) for name, native_id, profiler in _profilers]
        Path(f"{out}.threads.txt").write_text(thread_table(threads))
        snapshots = [snapshot for _, _, snapshot in threads]
        merged(snapshots).dump_stats(out)
        merged(snapshots[:1]).dump_stats(f"{out}.main")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
