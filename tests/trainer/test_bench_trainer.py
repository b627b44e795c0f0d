"""bench/trainer_methods.py, the GPU benchmark of each method, run end to end on CPU with `--tiny`.

On CPU there is no GPU memory to measure, so this checks the path a GPU session relies on: the model
built from catalogue shapes, `ftctl train`, the summary read back, the plain HF Trainer run beside it
and the row written with the command that made it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.trainer

REPO = Path(__file__).resolve().parents[2]


def test_trainer_benchmark_runs_a_method_and_writes_its_row(tmp_path: Path) -> None:
    result = tmp_path / "result.json"
    args = ["--tiny", "--methods", "lora", "prefix", "--steps", "4", "--seq-len", "64", "--micro-batch", "2"]
    run = subprocess.run(
        [sys.executable, "bench/trainer_methods.py", *args, "--workdir", str(tmp_path / "work"), "--write", str(result)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    written = json.loads(result.read_text())
    assert written["command"] == "python bench/trainer_methods.py " + " ".join(
        [*args, "--workdir", str(tmp_path / "work"), "--write", str(result)]
    )
    assert written["model"] == "Qwen/Qwen2.5-0.5B (tiny shapes)"
    # the estimate's switches a GPU run compares (--pure-bf16, --no-liger-kernel), at the API's defaults
    assert (written["settings"]["pure_bf16"], written["settings"]["liger_kernel"]) == (False, True)
    row, prefix = written["rows"]
    assert (row["method"], row["exitCode"], row["zeroStage"]) == ("lora", 0, 0)
    assert (prefix["method"], prefix["exitCode"]) == ("prefix", 0)  # trains unpacked: prefix cannot pack
    assert 0 < row["trainableParams"] < row["totalParams"] / 10
    assert row["tokensPerSecond"] > 0 and row["estimatedGiB"] > 0
    assert row["peakReservedGiB"] is None and row["estimateError"] is None  # CPU: nothing to compare
    for measured in (row, prefix):  # beside a plain HF Trainer run of the same settings
        assert measured["hfTokensPerSecond"] > 0 and measured["speedupOverHf"] > 0
        assert measured["mfu"] is None and measured["hfMfu"] is None  # no GPU peak to divide by
    config = json.loads((tmp_path / "work" / "model" / "config.json").read_text())
    assert config["model_type"] == "qwen2"  # Qwen2.5 has q/k/v biases: built as Qwen2, not Llama
