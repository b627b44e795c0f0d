"""bench/profile_threads.py bills each thread its own CPU, and not another thread's to a call left open."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: A main thread and a spinner that each burn CPU, the spinner then blocked (a watch waiting on its
#: socket) until the process exits; and an idle thread that only waits.
MODULE = """
import threading, time

def burn(seconds):
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass

def spin_then_block(done):
    burn_spinner()
    done.set()
    threading.Event().wait()

def burn_spinner():
    burn(0.6)

def burn_main():
    burn(0.4)

done = threading.Event()
threading.Thread(target=spin_then_block, args=(done,), name="spinner", daemon=True).start()
threading.Thread(target=threading.Event().wait, name="idle", daemon=True).start()
done.wait()
time.sleep(1.2)  # the kernel's count of the spinner is sampled every second
burn_main()
"""


def test_each_thread_is_billed_its_own_cpu_and_the_report_names_its_functions(tmp_path: Path) -> None:
    (tmp_path / "spinning.py").write_text(MODULE)
    out = tmp_path / "out.prof"
    script = str(REPO / "bench" / "profile_threads.py")
    subprocess.run([sys.executable, script, str(out), "-m", "spinning"], cwd=tmp_path, check=True, timeout=60)

    rows = {
        line.split()[0]: line.split()[1:]
        for line in (tmp_path / "out.prof.threads.txt").read_text().splitlines()[1:]
    }
    profiled = {name: float(columns[0]) for name, columns in rows.items()}
    assert 0.55 <= profiled["spinner"] <= 0.75
    assert abs(profiled["spinner"] - float(rows["spinner"][1])) < 0.1  # the kernel's count agrees
    # Neither thread blocked at exit is billed the main thread's 0.4 s and more spent meanwhile.
    assert profiled["idle"] < 0.05
    assert profiled["MainThread"] >= 0.4

    report = subprocess.run(
        [sys.executable, script, "--report", str(out)], capture_output=True, text=True, check=True
    ).stdout
    assert "burn_spinner" in report and "burn_main" in report
    assert "The main thread alone" in report
