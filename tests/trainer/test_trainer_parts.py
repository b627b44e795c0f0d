"""The trainer's parts in one process: checkpoints, progress, metrics, methods, QLoRA quantisation, packed
attention, launcher."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune_operator.api.enums import OFFLOAD_OPTIMIZERS, AttentionImpl, Method, Offload, Optimizer
from finetune_operator.api.methods import NO_ZERO3_METHODS
from finetune_operator.api.models import DatasetSpec
from finetune_operator.api.trainer import PROGRESS_ANNOTATION, ProgressReport, TrainerConfig
from finetune_trainer import checkpoints, methods
from finetune_trainer.data import (
    DataBundle,
    FlatteningCollator,
    PackedRowsCollator,
    PaddingCollator,
    build_datasets,
)
from finetune_trainer.deepspeed import render_deepspeed_config
from finetune_trainer.exit_codes import ConfigurationError
from finetune_trainer.methods import REGISTRY
from finetune_trainer.model import count_parameters, load_model, load_tokenizer
from finetune_trainer.progress import FileReporter, PodAnnotationReporter, ThrottledReporter, start_metrics

# --- checkpoints ----------------------------------------------------------------------------------------


def make_checkpoint(root: Path, step: int, complete: bool) -> Path:
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text("{}")
    if complete:
        checkpoints.mark_complete(path, step)
    return path


def test_latest_complete_ignores_partial_and_foreign_directories(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, 10, True)
    make_checkpoint(tmp_path, 20, True)
    make_checkpoint(tmp_path, 30, False)  # killed while saving
    (tmp_path / "checkpoint-40.tmp").mkdir()  # not our naming
    (tmp_path / "checkpoint-abc").mkdir()
    latest = checkpoints.latest_complete(tmp_path)
    assert latest is not None and (latest.step, latest.path.name) == (20, "checkpoint-20")
    assert [(c.step, c.complete) for c in checkpoints.list_checkpoints(tmp_path)] == [
        (10, True),
        (20, True),
        (30, False),
    ]


def test_no_checkpoint_means_start_from_zero(tmp_path: Path) -> None:
    assert checkpoints.latest_complete(tmp_path / "missing") is None
    make_checkpoint(tmp_path, 5, False)
    assert checkpoints.latest_complete(tmp_path) is None


def test_prune_keeps_the_newest_complete_and_a_save_in_flight(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        make_checkpoint(tmp_path, step, True)
    make_checkpoint(tmp_path, 15, False)  # stale partial, older than the newest complete
    make_checkpoint(tmp_path, 50, False)  # may be being written right now
    deleted = checkpoints.prune(tmp_path, keep=2)
    assert sorted(p.name for p in deleted) == ["checkpoint-10", "checkpoint-15", "checkpoint-20"]
    assert [c.step for c in checkpoints.list_checkpoints(tmp_path)] == [30, 40, 50]


def test_remove_partial_at_start_up(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, 10, True)
    make_checkpoint(tmp_path, 20, False)
    assert [p.name for p in checkpoints.remove_partial(tmp_path)] == ["checkpoint-20"]
    assert [c.step for c in checkpoints.list_checkpoints(tmp_path)] == [10]


# --- progress and metrics ---------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_throttled_reporter_passes_one_report_per_interval_and_every_forced_one(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "progress.json"
    reporter = ThrottledReporter(FileReporter(path), interval=10.0, clock=clock)
    assert reporter.report(ProgressReport(step=1, total_steps=9))
    clock.now += 5
    assert not reporter.report(ProgressReport(step=2, total_steps=9))
    assert ProgressReport.from_json(path.read_text()).step == 1
    assert reporter.report(ProgressReport(step=3, total_steps=9, state="completed"), force=True)
    clock.now += 10
    assert reporter.report(ProgressReport(step=4, total_steps=9))
    assert ProgressReport.from_json(path.read_text()).step == 4


class FakePods:
    def __init__(self, fail: bool = False) -> None:
        self.patches: list[tuple[str, str, Any]] = []
        self.fail = fail

    def patch_namespaced_pod(self, name: str, namespace: str, body: Any) -> Any:
        if self.fail:
            raise ConnectionError("API server unreachable")
        self.patches.append((name, namespace, body))
        return body


def test_pod_annotation_reporter_patches_its_own_pod_with_the_shared_payload() -> None:
    pods = FakePods()
    PodAnnotationReporter("job-worker-0", "team-a", api=pods).report(ProgressReport(step=3, total_steps=10))
    [(name, namespace, body)] = pods.patches
    assert (name, namespace) == ("job-worker-0", "team-a")
    payload = body["metadata"]["annotations"][PROGRESS_ANNOTATION]
    assert ProgressReport.from_json(payload).to_status().display == "30% (3/10)"


def test_a_failing_api_server_never_stops_training(caplog: pytest.LogCaptureFixture) -> None:
    PodAnnotationReporter("p", "ns", api=FakePods(fail=True)).report(ProgressReport(step=1))
    assert "progress report to pod ns/p failed" in caplog.text


def test_metrics_are_served_and_registered_only_when_created() -> None:
    metrics = start_metrics("job-a", rank=0, port=0)
    metrics.update(ProgressReport(step=7, total_steps=10, loss=1.25, tokens=4000))
    metrics.update(ProgressReport(step=8, total_steps=10, loss=1.2, tokens=4600))
    assert metrics.port is not None
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics.port}/metrics", timeout=5).read().decode()
    assert 'finetune_trainer_step{job_name="job-a",rank="0"} 8.0' in body
    assert 'finetune_trainer_loss{job_name="job-a",rank="0"} 1.2' in body
    # Throughput is a counter (its rate), counted up to the reported cumulative total, not summed twice.
    assert 'finetune_trainer_tokens_total{job_name="job-a",rank="0"} 4600.0' in body
    assert "# TYPE finetune_trainer_tokens_total counter" in body
    assert "finetune_trainer_gpu_memory_peak_bytes" in body
    # A second set (another rank in the same process) does not collide: each has its own registry.
    start_metrics("job-a", rank=1, port=None).update(ProgressReport(step=1))


# --- methods --------------------------------------------------------------------------------------------


def test_every_api_method_has_exactly_one_builder() -> None:
    assert set(REGISTRY) == set(Method)


def config_for(model_dir: Path, method: dict[str, Any], zero_stage: int = 0) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "jobName": "unit",
            "model": {"uri": str(model_dir)},
            "dataset": {"uri": "/unused.jsonl", "format": "text"},
            "method": method,
            "training": {"precision": "fp32"},
            "output": {"uri": "/unused"},
            "paths": {"model": str(model_dir), "output": "/unused", "checkpoints": "/unused/c"},
            "zeroStage": zero_stage,
        }
    )


def build(config: TrainerConfig) -> torch.nn.Module:
    method = methods.check(config)
    tokenizer = load_tokenizer(config)
    quantization = method.quantization(config)
    device_map = {"": "cpu"} if quantization is not None else None
    base = load_model(config, tokenizer, quantization=quantization, device_map=device_map)
    return method.apply(base, config)


@pytest.mark.parametrize("layout", ["packed rows", "flattened"])
@pytest.mark.parametrize("attention", [AttentionImpl.SDPA, AttentionImpl.EAGER])
def test_examples_sharing_a_row_do_not_attend_to_each_other(
    tmp_path: Path, tiny_llama_dir: Path, attention: AttentionImpl, layout: str
) -> None:
    """Through the model as the trainer loads it, each example's logits and the batch's loss are those of
    the examples alone, padded: in a batch of packed blocks (rows of different lengths, the shorter one
    padded) and in one flattened row, attention and positions restart at every example (in the old
    packing, and with the KV cache left on, the later examples attended to the earlier ones)."""
    config = config_for(tiny_llama_dir, {"type": "full"})
    config.model.attention_implementation = attention
    tokenizer = load_tokenizer(config)
    model = load_model(config, tokenizer).eval()
    texts = [
        "The cat sleeps in the sun.",
        "A dog runs after the red ball.",
        "Rain falls on the old roof.",
        "My neighbour reads a long book every evening.",
        "Hi.",
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))

    def bundle(**spec: Any) -> DataBundle:
        return build_datasets(DatasetSpec(uri=str(data), format="text", max_seq_length=24, **spec), tokenizer)

    plain = bundle(padding_free=False)
    assert isinstance(plain.collator, PaddingCollator)
    if layout == "packed rows":
        packed = bundle(packing=True)
        assert isinstance(packed.collator, PackedRowsCollator) and len(packed.train) >= 2
        batch = packed.collator(list(packed.train))
        assert len({len(row) for row in packed.train["input_ids"]}) > 1  # one row is padded
    else:
        batch = FlatteningCollator()(list(plain.train))
        assert batch["input_ids"].shape[0] == 1
    assert "attention_mask" not in batch
    rows, positions = batch["input_ids"].tolist(), batch["position_ids"].tolist()
    starts = [(r, p) for r, row in enumerate(positions) for p, position in enumerate(row) if position == 0]
    with torch.no_grad():
        together = model(**batch)
        weighted, targets = torch.tensor(0.0), 0
        for example in plain.train:
            alone = model(**plain.collator([example]))
            length = len(example["input_ids"])
            r, start = next((r, p) for r, p in starts if rows[r][p : p + length] == example["input_ids"])
            torch.testing.assert_close(together.logits[r, start : start + length], alone.logits[0])
            weighted, targets = weighted + alone.loss * (length - 1), targets + length - 1
    torch.testing.assert_close(together.loss, weighted / targets)


def test_a_model_path_missing_on_the_volume_is_a_configuration_error(tmp_path: Path) -> None:
    from finetune_operator.api.exit_codes import ExitCode
    from finetune_trainer.exit_codes import ConfigurationError, exit_code_for
    from finetune_trainer.model import model_source

    with pytest.raises(ConfigurationError, match="not a directory on the volume") as raised:
        model_source(config_for(tmp_path / "not-there", {"type": "lora"}))
    assert exit_code_for(raised.value) == ExitCode.CONFIG_ERROR


def test_freeze_trains_only_the_last_layers(tiny_llama_dir: Path) -> None:
    model = build(config_for(tiny_llama_dir, {"type": "freeze", "freeze": {"trainableLayers": 1}}))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("model.layers.1.") for name in trainable), sorted(trainable)


def test_qlora_quantises_the_base_to_4bit_nf4_and_trains_only_the_adapter(tiny_llama_dir: Path) -> None:
    import bitsandbytes as bnb

    config = config_for(
        tiny_llama_dir,
        {"type": "qlora", "qlora": {"computeDtype": "fp32", "quantType": "nf4", "doubleQuant": True}},
    )
    model = build(config)
    adapted = [
        m for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj")) and hasattr(m, "base_layer")
    ]
    assert len(adapted) == 4  # 2 layers × (q_proj, v_proj)
    for module in adapted:
        assert isinstance(module.base_layer, bnb.nn.Linear4bit)
        weight = module.base_layer.weight
        assert isinstance(weight, bnb.nn.Params4bit) and weight.dtype == torch.float32  # quant storage
        assert weight.quant_state.quant_type == "nf4" and weight.quant_state.nested  # double quant
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    trained, total = count_parameters(model)
    # The count uses the unpacked shape of 4-bit weights: total matches the unquantised model.
    assert total == count_parameters(build(config_for(tiny_llama_dir, {"type": "full"})))[1] + trained
    input_ids = torch.tensor([[5, 6, 7, 8]])
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)


def test_lora_on_missing_modules_is_a_configuration_error(tiny_llama_dir: Path) -> None:
    from finetune_trainer.exit_codes import ConfigurationError

    with pytest.raises(ConfigurationError, match=r"method\.lora"):
        build(config_for(tiny_llama_dir, {"type": "lora", "lora": {"targetModules": ["query"]}}))


# --- launcher -------------------------------------------------------------------------------------------


@pytest.mark.trainer
@pytest.mark.parametrize("code", [0, 75, 78, 79])
def test_launcher_exits_with_the_workers_code_not_torchruns_1(tmp_path: Path, code: int) -> None:
    script = tmp_path / "worker.py"
    script.write_text(f"import os, sys\nsys.exit({code} if os.environ['RANK'] == '1' else 0)\n")
    command = [
        sys.executable,
        "-m",
        "finetune_trainer.launch",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
    ]
    assert subprocess.run(command, capture_output=True, timeout=120).returncode == code


# --- entry point ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "document",
    ["jobName: x\nzeroStage: 9\n", "{not yaml: [", "jobName: x\nmodel: {uri: /m}\nunknownField: 1\n"],
)
def test_a_bad_trainer_config_exits_with_the_configuration_error_code(tmp_path: Path, document: str) -> None:
    from finetune_operator.api.exit_codes import ExitCode
    from finetune_trainer.__main__ import main

    path = tmp_path / "trainer.yaml"
    path.write_text(document)
    assert main(["--config", str(path)]) == ExitCode.CONFIG_ERROR


@pytest.mark.parametrize("method", list(Method))
def test_the_trainer_refuses_zero3_for_exactly_the_methods_the_api_and_planner_keep_off_it(
    method: Method,
) -> None:
    """One table (`api/methods.py`) drives the CEL rule and the planner; the trainer's own checks agree."""
    config = config_for(Path("/unused-model"), {"type": method.value}, zero_stage=3)
    if method in NO_ZERO3_METHODS:
        with pytest.raises(ConfigurationError, match="ZeRO-3"):
            methods.check(config)
    else:
        methods.check(config)


@pytest.mark.parametrize("optimizer", list(Optimizer))
def test_the_trainer_offloads_exactly_the_optimizers_the_api_allows(optimizer: Optimizer) -> None:
    config = config_for(Path("/unused-model"), {"type": "full"}, zero_stage=2).model_copy(
        update={"offload": Offload.OPTIMIZER}
    )
    config = config.model_copy(
        update={"training": config.training.model_copy(update={"optimizer": optimizer})}
    )
    if optimizer in OFFLOAD_OPTIMIZERS:
        assert render_deepspeed_config(config)["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    else:
        with pytest.raises(ConfigurationError, match=r"needs training\.optimizer adamw"):
            render_deepspeed_config(config)


def test_an_attention_kernel_the_image_lacks_is_a_configuration_error_not_a_retry(
    tiny_llama_dir: Path,
) -> None:
    """flash_attention_2 without the flash-attn package: every restart would fail the same way."""
    from finetune_operator.api.exit_codes import ExitCode
    from finetune_trainer.exit_codes import exit_code_for

    config = config_for(tiny_llama_dir, {"type": "lora"})
    config = config.model_copy(
        update={
            "model": config.model.model_copy(
                update={"attention_implementation": AttentionImpl.FLASH_ATTENTION_2}
            )
        }
    )
    with pytest.raises(ImportError) as missing:
        build(config)
    assert exit_code_for(missing.value) is ExitCode.CONFIG_ERROR


@pytest.mark.parametrize(
    ("gpu", "installed", "refusal"),
    [(False, True, "needs a GPU"), (True, False, "this image has no flash-attn package"), (True, True, None)],
)
def test_flash_attention_is_refused_before_anything_loads_where_it_cannot_run(
    monkeypatch: pytest.MonkeyPatch, gpu: bool, installed: bool, refusal: str | None
) -> None:
    import importlib.util

    from finetune_trainer import recipe

    config = config_for(Path("/unused-model"), {"type": "lora"})
    config = config.model_copy(
        update={
            "model": config.model.model_copy(
                update={"attention_implementation": AttentionImpl.FLASH_ATTENTION_2}
            )
        }
    )
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: (
            (object() if installed else None) if name == "flash_attn" else find_spec(name, *args)
        ),
    )
    if refusal is None:
        recipe.check_combination(config)
    else:
        with pytest.raises(ConfigurationError, match=refusal):
            recipe.check_combination(config)


@pytest.mark.parametrize(
    ("optimizer", "fused", "name"),
    [
        (Optimizer.ADAMW, True, "adamw_torch_fused"),  # the default
        (Optimizer.ADAMW, False, "adamw_torch"),
        (Optimizer.ADAMW_8BIT, True, "adamw_bnb_8bit"),  # no fused variant: the switch does nothing
        (Optimizer.SGD, True, "sgd"),
    ],
)
def test_adamw_steps_fused_unless_switched_off(optimizer: Optimizer, fused: bool, name: str) -> None:
    from finetune_operator.api.models import TrainingSpec
    from finetune_trainer.recipe import optimizer_name

    assert TrainingSpec().fused_optimizer is True
    assert optimizer_name(TrainingSpec(optimizer=optimizer, fused_optimizer=fused)) == name


@pytest.mark.parametrize(
    ("switch", "gpu", "classification", "zero_stage", "applies"),
    [
        (True, True, False, 2, True),  # the default on a GPU
        (True, False, False, 2, False),  # Triton kernels: never on CPU
        (True, True, True, 2, False),  # a classifier's loss is num_labels wide
        (True, True, False, 3, False),  # the fused loss would read a partitioned head
        (False, True, False, 0, False),
    ],
)
def test_liger_kernels_apply_to_causal_lms_on_gpus_below_zero3(
    switch: bool, gpu: bool, classification: bool, zero_stage: int, applies: bool
) -> None:
    from finetune_trainer.recipe import uses_liger

    config = config_for(Path("/unused-model"), {"type": "lora"}, zero_stage=zero_stage)
    config = config.model_copy(
        update={
            "training": config.training.model_copy(update={"use_liger_kernel": switch}),
            "dataset": config.dataset.model_copy(
                update={"format": "classification" if classification else "text", "num_labels": 2}
            ),
        }
    )
    assert uses_liger(config, on_gpu=gpu) is applies


def test_an_image_without_liger_is_refused_on_a_gpu_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from finetune_trainer import recipe

    config = config_for(Path("/unused-model"), {"type": "lora"})
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else find_spec(name, *a)
    )
    with pytest.raises(ConfigurationError, match=r"training\.useLigerKernel: this image has no liger-kernel"):
        recipe.check_combination(config)


def test_liger_patches_every_causal_family_the_estimator_counts_its_loss_for() -> None:
    """The planner counts Liger's small loss for every causal LM it knows; Liger must patch each."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    from finetune_operator.core.architecture import _MODEL_TYPE_DEFAULTS, _SUPPORTED

    causal = {t for t in _SUPPORTED if _MODEL_TYPE_DEFAULTS.get(t, {}).get("kind") != "encoder"}
    assert causal == {"llama", "mistral", "qwen2", "gemma2", "phi3"}
    assert causal <= set(MODEL_TYPE_TO_APPLY_LIGER_FN)


def test_pure_bf16_leaves_no_fp32_parameter(tiny_llama_dir: Path) -> None:
    from finetune_trainer.recipe import cast_fp32_to_bf16

    config = config_for(tiny_llama_dir, {"type": "lora"})
    model = build(config)  # fp32 base, fp32 adapters
    assert cast_fp32_to_bf16(model) > 0
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert cast_fp32_to_bf16(model) == 0
