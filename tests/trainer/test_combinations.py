"""Every combination the API accepts trains, or is refused at `kubectl apply` with a message naming a field.

The space is the method table's methods × precision × QLoRA compute dtype × gradient checkpointing ×
attention kernel × ZeRO stage × packing × pure bf16: about 2,600 specs.

- Each of them goes through the admission verdict (`core/admission.review`: the API models' rules,
  the CEL twins of which the contract tests check, then the planner and the operator's checks). What
  is admitted must then pass the trainer's pre-flight (`recipe.check_combination`, the DeepSpeed config)
  on the trainer config the operator renders for it. The only refusal left is one this machine causes:
  fp16 needs a GPU.
- A sample of the admitted ones that this CPU can run (fp32 and bf16; sdpa and eager) then really trains,
  under torchrun with 2 processes and DeepSpeed on gloo, as a pod runs it. The sample is chosen to cover
  every value of every dimension first, then as many pairs of values as it can: the default 12 runs
  (about 11 s each on 2 cores) cover 82% of the 179 pairs among the 420 combinations this CPU can run.
  `FINETUNE_COMBINATIONS=all`, or another number, runs more.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from finetune_operator.api.enums import AttentionImpl, Method, Precision
from finetune_operator.api.exit_codes import ExitCode
from finetune_operator.api.models import FineTuneJob
from finetune_operator.api.trainer import CONFIG_FILE, TrainerConfig
from finetune_operator.core.admission import review
from finetune_operator.core.desire import Desired, desire, parse_job
from finetune_operator.core.gang import JobRef
from finetune_operator.settings import Settings
from finetune_trainer.deepspeed import render_deepspeed_config
from finetune_trainer.exit_codes import ConfigurationError
from finetune_trainer.recipe import check_combination

from . import harness

OPTIONS = Settings().render_options()
#: How many combinations to train (or "all").
SAMPLE = os.environ.get("FINETUNE_COMBINATIONS", "12")
#: What the CPU can run: the rest needs a GPU (fp16) or a package this image lacks (flash-attn).
CPU_PRECISIONS = (Precision.FP32, Precision.BF16)
CPU_ATTENTION = (AttentionImpl.SDPA, AttentionImpl.EAGER)
#: The fields a refusal must name, in the words the user writes.
FIELDS = (
    "zeroStage",
    "gradientCheckpointing",
    "packing",
    "attentionImplementation",
    "precision",
    "computeDtype",
    "pureBf16",
)


@dataclass(frozen=True)
class Combination:
    method: Method
    precision: Precision
    compute_dtype: Precision | None  # QLoRA only
    checkpointing: bool
    attention: AttentionImpl
    zero_stage: int
    packing: bool
    pure_bf16: bool = False

    def __str__(self) -> str:
        compute = f"/{self.compute_dtype.value}" if self.compute_dtype else ""
        return (
            f"{self.method.value} {self.precision.value}{compute} ckpt={int(self.checkpointing)} "
            f"{self.attention.value} zero{self.zero_stage} pack={int(self.packing)}"
            f"{' pure' if self.pure_bf16 else ''}"
        )

    def values(self) -> tuple[tuple[str, object], ...]:
        """(dimension, value) pairs, for coverage."""
        return tuple((name, getattr(self, name)) for name in self.__dataclass_fields__)

    def method_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"type": self.method.value}
        if self.compute_dtype is not None:
            spec["qlora"] = {"computeDtype": self.compute_dtype.value}
        return spec


def every_combination() -> Iterator[Combination]:
    for method, precision, checkpointing, attention, stage, packing, pure in itertools.product(
        Method, Precision, (False, True), AttentionImpl, range(4), (False, True), (False, True)
    ):
        for compute in Precision if method == Method.QLORA else (None,):
            yield Combination(method, precision, compute, checkpointing, attention, stage, packing, pure)


def job(combination: Combination) -> dict[str, Any]:
    """The combination as a FineTuneJob a user would apply: a small model on two GPUs, so every
    combination fits and only the combination itself can be refused."""
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "combination", "namespace": "team-a"},
        "spec": {
            "model": {
                "name": "Qwen/Qwen2.5-0.5B",
                "uri": "pvc://models/qwen",
                "attentionImplementation": combination.attention.value,
            },
            "dataset": {"uri": "pvc://datasets/text.jsonl", "format": "text", "packing": combination.packing},
            "method": combination.method_spec(),
            "training": {
                "precision": combination.precision.value,
                "gradientCheckpointing": combination.checkpointing,
                "pureBf16": combination.pure_bf16,
            },
            "resources": {"gpuType": "A100-80GB", "gpus": 2, "gpusPerNode": 2},
            "distributed": {"zeroStage": combination.zero_stage},
            "output": {"uri": "pvc://models/out"},
        },
    }


def trainer_config(document: dict[str, Any]) -> TrainerConfig:
    parsed = parse_job(document)
    assert isinstance(parsed, FineTuneJob), parsed
    desired = desire(parsed, JobRef("combination", "team-a", "uid", 1), OPTIONS, attempt=0)
    assert isinstance(desired, Desired), desired
    return TrainerConfig.model_validate(yaml.safe_load(desired.configmap["data"][CONFIG_FILE]))


@functools.cache
def verdicts() -> tuple[tuple[Combination, str | TrainerConfig], ...]:
    """Every combination with the admission webhook's refusal, or the trainer config the operator renders
    for it when admitted. Computed once (about 10 s), when the first test here needs it."""
    return tuple((c, review(job(c), None, OPTIONS) or trainer_config(job(c))) for c in every_combination())


def test_every_combination_is_refused_naming_a_field_or_passes_the_trainers_preflight() -> None:
    problems = []
    for combination, verdict in verdicts():
        if isinstance(verdict, str):
            if not any(name in verdict for name in FIELDS):
                problems.append(f"{combination}: refused without naming a field: {verdict}")
            continue
        try:
            check_combination(verdict)
            render_deepspeed_config(verdict)
        except ConfigurationError as err:
            gpu_only = combination.precision == Precision.FP16 and not torch.cuda.is_available()
            if not (gpu_only and "needs a GPU" in str(err)):
                problems.append(f"{combination}: admitted, then refused by the trainer: {err}")
    assert not problems, "\n".join(problems)
    # The refusals are the table's and the image's, not everything: most of the space is admitted.
    accepted = sum(1 for _, verdict in verdicts() if not isinstance(verdict, str))
    assert 500 < accepted < len(verdicts())


def sample(candidates: list[Combination], size: int | None) -> list[Combination]:
    """Greedy cover: each next pick covers the most (dimension, value) pairs of pairs not yet covered,
    so the first picks already cover every single value. Deterministic: every CI run trains the same."""
    if size is None:
        return candidates
    uncovered = {pair for c in candidates for pair in itertools.combinations(c.values(), 2)}
    picked: list[Combination] = []
    for _ in range(min(size, len(candidates))):
        singles = {value for pair in uncovered for value in pair}
        best = max(
            (c for c in candidates if c not in picked),
            key=lambda c: (
                len(singles & set(c.values()) - {v for p in picked for v in p.values()}),
                len(uncovered & set(itertools.combinations(c.values(), 2))),
            ),
        )
        picked.append(best)
        uncovered -= set(itertools.combinations(best.values(), 2))
    return picked


def runnable_here() -> list[Combination]:
    return [
        c
        for c, verdict in verdicts()
        if not isinstance(verdict, str)
        and c.precision in CPU_PRECISIONS
        and c.attention in CPU_ATTENTION
        and (c.compute_dtype is None or c.compute_dtype in CPU_PRECISIONS)
    ]


@functools.cache
def sampled() -> tuple[Combination, ...]:
    return tuple(sample(runnable_here(), None if SAMPLE == "all" else int(SAMPLE)))


def test_the_sample_covers_every_value_the_cpu_can_run() -> None:
    assert {v for c in sampled() for v in c.values()} == {v for c in runnable_here() for v in c.values()}


@pytest.mark.trainer
@pytest.mark.parametrize("index", range(len(runnable_here()) if SAMPLE == "all" else int(SAMPLE)))
def test_an_admitted_combination_trains(
    tmp_path: Path, tiny_llama_dir: Path, text_data: Path, index: int
) -> None:
    """The index-th of the sample (`sampled()` is computed when a test first runs, not at collection)."""
    combination = sampled()[index]
    config = harness.write_trainer_config(
        tmp_path,
        model_dir=tiny_llama_dir,
        data=text_data,
        method=combination.method_spec(),
        zero_stage=combination.zero_stage,
        model={"attentionImplementation": combination.attention.value},
        dataset={"packing": combination.packing},
        training={
            "maxSteps": 4,
            "loggingSteps": 2,
            "precision": combination.precision.value,
            "gradientCheckpointing": combination.checkpointing,
            "pureBf16": combination.pure_bf16,
        },
        checkpointing={"saveSteps": 4},
    )
    assert harness.run(config) == ExitCode.SUCCESS, f"{combination}\n{harness.tail(tmp_path)}"
    summary = harness.summary(tmp_path)
    assert summary["steps"] == 4 and summary["finalLoss"] is not None and summary["finalLoss"] > 0
