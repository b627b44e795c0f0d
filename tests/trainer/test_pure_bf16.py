"""training.pureBf16 trains with bf16 Adam moments, with and without ZeRO; mixed bf16 keeps them in fp32.

The moments are read back from the checkpoint DeepSpeed wrote, so the test sees what the GPU would hold.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune_operator.api.exit_codes import ExitCode

from . import harness


def moments(node: Any) -> Iterator[torch.Tensor]:
    """Every Adam moment (`exp_avg`, `exp_avg_sq`) in a loaded optimizer checkpoint, however nested."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("exp_avg", "exp_avg_sq") and isinstance(value, torch.Tensor):
                yield value
            else:
                yield from moments(value)
    elif isinstance(node, list | tuple):
        for item in node:
            yield from moments(item)


@pytest.mark.trainer
@pytest.mark.parametrize(
    ("pure", "zero_stage", "dtype"),
    [(True, 0, torch.bfloat16), (True, 2, torch.bfloat16), (False, 2, torch.float32)],
)
def test_pure_bf16_keeps_adams_moments_in_bf16(
    tmp_path: Path, tiny_llama_dir: Path, text_data: Path, pure: bool, zero_stage: int, dtype: torch.dtype
) -> None:
    config = harness.write_trainer_config(
        tmp_path,
        model_dir=tiny_llama_dir,
        data=text_data,
        method={"type": "full"},
        zero_stage=zero_stage,
        training={"maxSteps": 4, "loggingSteps": 2, "precision": "bf16", "pureBf16": pure},
        checkpointing={"saveSteps": 4},
    )
    assert harness.run(config) == ExitCode.SUCCESS, harness.tail(tmp_path)
    summary = harness.summary(tmp_path)
    assert summary["steps"] == 4 and summary["finalLoss"] > 0
    # ZeRO's *optim_states.pt, or without ZeRO the optimizer inside mp_rank_00_model_states.pt
    files = sorted((tmp_path / "out" / "checkpoints" / "checkpoint-4").rglob("*.pt"))
    assert files, "no optimizer states in the checkpoint"
    found = [m for file in files for m in moments(torch.load(file, map_location="cpu", weights_only=False))]
    assert found, f"no Adam moments in {files}"
    assert {m.dtype for m in found} == {dtype}
