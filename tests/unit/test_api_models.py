"""The FineTuneJob models accept the documented spec and refuse bad input with a message naming the field."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from finetune_operator.api.base import describe_validation_error
from finetune_operator.api.enums import Method, Offload, Precision
from finetune_operator.api.models import parse_job

README_EXAMPLE = "examples/llama2-7b-alpaca-lora.yaml"


@pytest.fixture
def document() -> dict[str, Any]:
    with open(README_EXAMPLE) as f:
        loaded: dict[str, Any] = yaml.safe_load(f)
    return loaded


def error_for(document: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as caught:
        parse_job(document)
    return describe_validation_error(caught.value)


def test_issue_example_is_accepted_exactly_as_written(document: dict[str, Any]) -> None:
    job = parse_job(document)
    spec = job.spec
    assert spec.model.name == "meta-llama/Llama-2-7b-hf"
    assert spec.dataset.max_seq_length == 512
    assert spec.method.type is Method.LORA
    lora = spec.method.lora_settings()
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (16, 32, 0.05, ["q_proj", "v_proj"])
    assert spec.training.learning_rate == pytest.approx(2e-4)
    assert spec.training.micro_batch_size == 4 and spec.training.gradient_accumulation_steps == 4
    assert spec.training.precision is Precision.BF16
    assert spec.resources.gpus == "auto" and spec.resources.gpus_per_node == 8
    assert spec.distributed.zero_stage == "auto" and spec.distributed.offload is Offload.NONE


def test_round_trip_uses_camel_case(document: dict[str, Any]) -> None:
    dumped = parse_job(document).model_dump(by_alias=True, exclude_none=True, mode="json")
    assert dumped["spec"]["training"]["learningRate"] == pytest.approx(2e-4)
    assert dumped["spec"]["method"]["lora"]["targetModules"] == ["q_proj", "v_proj"]
    assert parse_job(dumped) == parse_job(document)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("method", "type"), "banana", "spec.method.type: Input should be 'full', 'freeze'"),
        (
            ("training", "microBatchSize"),
            0,
            "spec.training.microBatchSize: Input should be greater than or equal to 1",
        ),
        (("resources", "gpus"), 0, "resources.gpus must be a positive integer or auto"),
        (("distributed", "zeroStage"), 4, "distributed.zeroStage must be 0, 1, 2, 3 or auto"),
        (("training", "learningRat"), 0.1, "spec.training.learningRat: unknown field"),
        (("dataset", "uri"), "ftp://x", "spec.dataset.uri: String should match pattern"),
        (("method", "qlora"), {"quantType": "nf4"}, "method.qlora is only for type qlora"),
        (("method", "lora", "targetModules"), ["all-linear", "q_proj"], "all-linear must be the only entry"),
    ],
)
def test_bad_input_names_the_field(
    document: dict[str, Any], path: tuple[str, ...], value: Any, expected: str
) -> None:
    bad = copy.deepcopy(document)
    node = bad["spec"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert expected in error_for(bad)


def test_model_needs_a_name_or_uri(document: dict[str, Any]) -> None:
    document["spec"]["model"] = {}
    assert "set model.name (hub name) or model.uri" in error_for(document)


def test_resources_need_a_gpu_type_or_memory(document: dict[str, Any]) -> None:
    document["spec"]["resources"] = {"gpusPerNode": 8}
    assert "set resources.gpuType or resources.gpuMemoryGiB" in error_for(document)


def test_early_stopping_needs_a_validation_split(document: dict[str, Any]) -> None:
    document["spec"]["training"]["earlyStopping"] = {"patience": 2}
    assert "earlyStopping needs dataset.validationSplit > 0" in error_for(document)
    document["spec"]["dataset"]["validationSplit"] = 0.05
    assert parse_job(document).spec.training.early_stopping is not None


def test_gpu_memory_alias_and_explicit_counts(document: dict[str, Any]) -> None:
    document["spec"]["resources"] = {"gpuMemoryGiB": 40, "gpus": 4, "gpusPerNode": 2}
    document["spec"]["distributed"] = {"zeroStage": 3, "offload": "auto"}
    spec = parse_job(document).spec
    assert spec.resources.gpu_memory_gi_b == 40 and spec.resources.gpus == 4
    assert spec.distributed.zero_stage == 3 and spec.distributed.offload == "auto"


def test_prefix_and_prompt_refuse_zero3(document: dict[str, Any]) -> None:
    document["spec"]["method"] = {"type": "prefix"}
    document["spec"]["training"]["gradientCheckpointing"] = False  # prefix cannot recompute either
    document["spec"]["distributed"] = {"zeroStage": 3}
    assert "prefix and prompt tuning do not run under distributed.zeroStage 3" in error_for(document)
    document["spec"]["distributed"] = {"zeroStage": "auto"}
    assert parse_job(document).spec.method.type is Method.PREFIX


def test_prefix_refuses_gradient_checkpointing(document: dict[str, Any]) -> None:
    """PEFT's prefix keys and values are dropped when the HF Trainer recomputes a layer: refused at apply."""
    document["spec"]["method"] = {"type": "prefix"}
    document["spec"]["training"]["gradientCheckpointing"] = True
    assert "prefix tuning does not run with training.gradientCheckpointing" in error_for(document)
    document["spec"]["method"] = {"type": "prompt"}
    assert parse_job(document).spec.training.gradient_checkpointing


def test_save_merged_is_refused_for_methods_without_an_adapter_to_merge(document: dict[str, Any]) -> None:
    document["spec"]["output"]["saveMerged"] = True
    assert parse_job(document).spec.output.save_merged
    document["spec"]["method"] = {"type": "full"}
    assert "output.saveMerged only applies to lora, qlora or dora" in error_for(document)


def test_offload_needs_adamw(document: dict[str, Any]) -> None:
    document["spec"]["distributed"] = {"zeroStage": 2, "offload": "optimizer"}
    document["spec"]["training"]["optimizer"] = "paged_adamw_8bit"
    assert "needs training.optimizer adamw" in error_for(document)
    document["spec"]["training"]["optimizer"] = "adamw"
    assert parse_job(document).spec.distributed.offload is Offload.OPTIMIZER


@pytest.mark.parametrize(
    ("block", "uri", "expected"),
    [
        ("dataset", "s3://bucket/alpaca.jsonl", "spec.dataset: uri: s3:// is not supported yet"),
        ("model", "s3://bucket/llama", "spec.model: uri: s3:// is not supported yet"),
        ("output", "s3://bucket/out", "spec.output: uri: s3:// is not supported yet"),
        ("checkpointing", "s3://bucket/ckpt", "spec.checkpointing: uri: s3:// is not supported yet"),
        ("output", "hf://org/adapter", "spec.output: uri: hf:// is read-only"),
        ("checkpointing", "hf://org/ckpt", "spec.checkpointing: uri: hf:// is read-only"),
    ],
)
def test_uris_the_trainer_cannot_use_are_refused_with_the_field(
    document: dict[str, Any], block: str, uri: str, expected: str
) -> None:
    document["spec"].setdefault(block, {})["uri"] = uri
    assert expected in error_for(document)


def test_the_hub_is_fine_to_read_from(document: dict[str, Any]) -> None:
    document["spec"]["model"] = {"uri": "hf://meta-llama/Llama-2-7b-hf", "name": "meta-llama/Llama-2-7b-hf"}
    document["spec"]["dataset"]["uri"] = "hf://tatsu-lab/alpaca"
    spec = parse_job(document).spec
    assert (spec.model.uri, spec.dataset.uri) == ("hf://meta-llama/Llama-2-7b-hf", "hf://tatsu-lab/alpaca")
