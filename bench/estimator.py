"""Estimator benchmark: predicted vs published peak memory (C1..C12), the time per estimate and per plan.

Run: `python bench/estimator.py [--write bench/results/estimator.json] [--markdown PATH]`.
Plans are timed on every FineTuneJob in examples/ (targets: estimate < 1 ms, plan < 10 ms).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from finetune_operator.api.models import FineTuneJobSpec, parse_job
from finetune_operator.core.calibration import (
    MODELLED_TERMS,
    UNEXPLAINED_GAPS,
    CalibrationResult,
    calibrate,
    calibration_rows,
    median_abs_error,
)
from finetune_operator.core.estimate import estimate
from finetune_operator.core.plan import plan

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

GB = 10**9


def time_per_call(fn: Callable[[], object], *, min_seconds: float = 0.5) -> float:
    """Mean seconds per call over at least `min_seconds`, after one warm-up call."""
    fn()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_seconds:
        fn()
        calls += 1
    return elapsed / calls


def example_specs() -> dict[str, FineTuneJobSpec]:
    specs = {}
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and document.get("kind") == "FineTuneJob":
                specs[path.name] = parse_job(document).spec
    return specs


def markdown(
    results: list[CalibrationResult], seconds: float, plan_seconds: dict[str, float], command: str
) -> str:
    lines = [
        "# Estimator calibration",
        "",
        f"Made by `{command}`. Predicted = the estimate as each source measures it (see",
        "`finetune_operator/core/calibration.py`): allocated = per-GPU estimate less CUDA context and",
        "fragmentation; reserved minus initial = less CUDA context. GB = 1e9 bytes.",
        "",
        "| row | setup | measure | measured GB | predicted GB | error | peak at |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.row.row} | {r.row.description} | {r.row.measure} | {r.row.measured_bytes / GB:.2f} "
            f"| {r.predicted_bytes / GB:.2f} | {r.error:+.1%} | {r.estimate.peak_phase} |"
        )
    worst = max(results, key=lambda r: abs(r.error))
    lines += [
        "",
        f"Median absolute error: {median_abs_error(results):.1%}; worst row: {worst.row.row} ({worst.error:+.1%}).",
        f"Time per estimate: {seconds * 1e6:.0f} µs (Python {platform.python_version()}, {platform.machine()}).",
        "Time per plan: "
        + ", ".join(f"{name} {value * 1e3:.2f} ms" for name, value in plan_seconds.items())
        + ".",
    ]
    lines += ["", "Rows beyond 15% and why (no per-row factor is applied):", ""]
    lines += [f"- {row}: {why}" for row, why in UNEXPLAINED_GAPS.items()]
    lines += ["", "## What the estimator counts", "", "| term | counted as | source |", "|---|---|---|"]
    lines += [f"| {term} | {how} | {source} |" for term, how, source in MODELLED_TERMS]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", type=Path, help="write the JSON results here")
    parser.add_argument("--markdown", type=Path, help="also write the markdown table here")
    args = parser.parse_args(argv)
    command = "python bench/estimator.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = calibrate()
    setups = [row.setup for row in calibration_rows()]
    seconds = time_per_call(lambda: [estimate(s) for s in setups]) / len(setups)
    plan_seconds = {name: time_per_call(lambda s=spec: plan(s)) for name, spec in example_specs().items()}
    text = markdown(results, seconds, plan_seconds, command.strip())
    print(text)
    if args.write:
        payload = {
            "command": command.strip(),
            "median_abs_error": median_abs_error(results),
            "worst_abs_error": max(abs(r.error) for r in results),
            "seconds_per_estimate": seconds,
            "seconds_per_plan": plan_seconds,
            "rows": [
                {
                    "row": r.row.row,
                    "description": r.row.description,
                    "measure": r.row.measure,
                    "source": r.row.source,
                    "measured_bytes": r.row.measured_bytes,
                    "predicted_bytes": r.predicted_bytes,
                    "per_gpu_bytes": r.estimate.per_gpu_bytes,
                    "error": r.error,
                    "peak_phase": r.estimate.peak_phase,
                    "breakdown": dict(r.estimate.breakdown),
                }
                for r in results
            ],
        }
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
