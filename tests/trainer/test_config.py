"""The trainer-config schema, its rendering from a job and plan, the DeepSpeed config and exit codes.

Pure code only: no torch, so these run in the unit tier in a second.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from pydantic import ValidationError

from finetune_operator.api.enums import Method, Offload, Optimizer, Precision
from finetune_operator.api.exit_codes import ExitCode, describe, is_retryable
from finetune_operator.api.models import FineTuneJob, parse_job
from finetune_operator.api.trainer import DeepSpeedBuckets, ProgressReport, ProgressSettings, TrainerConfig
from finetune_operator.core.plan import plan
from finetune_operator.core.trainer_config import (
    TrainerConfigError,
    claims_of,
    render_trainer_config,
    resolve_uri,
)
from finetune_trainer.config import load_config
from finetune_trainer.deepspeed import render_deepspeed_config
from finetune_trainer.exit_codes import ConfigurationError, exit_code_for

EXAMPLE = Path("examples/llama2-7b-alpaca-lora.yaml")


@dataclass(frozen=True)
class FakePlan:
    """The four plan fields the renderer reads; the real planner is tested in tests/unit."""

    gpus: int = 16
    zero_stage: int = 2
    offload: Offload = Offload.NONE
    per_gpu_bytes: int = 40 * 1024**3
    buckets: DeepSpeedBuckets | None = None


def example_job(**spec_updates: Any) -> FineTuneJob:
    document = yaml.safe_load(EXAMPLE.read_text())
    document["spec"].update(spec_updates)
    return parse_job(document)


# --- render_trainer_config ---------------------------------------------------------------------------


def test_render_resolves_pvc_uris_to_mounts_and_embeds_the_spec_unchanged() -> None:
    job = example_job(model={"name": "meta-llama/Llama-2-7b-hf", "uri": "pvc://models/base/llama2"})
    config = render_trainer_config(job, FakePlan())
    assert config.model_dump(by_alias=True, mode="json", exclude={"progress"}) == {
        "jobName": "llama2-7b-alpaca-lora",
        "model": job.spec.model.model_dump(by_alias=True, mode="json"),
        "dataset": job.spec.dataset.model_dump(by_alias=True, mode="json"),
        "method": job.spec.method.model_dump(by_alias=True, mode="json"),
        "training": job.spec.training.model_dump(by_alias=True, mode="json"),
        "checkpointing": job.spec.checkpointing.model_dump(by_alias=True, mode="json"),
        "output": job.spec.output.model_dump(by_alias=True, mode="json"),
        "paths": {
            "model": "/mnt/pvc/models/base/llama2",
            "dataset": "/mnt/pvc/datasets/alpaca.jsonl",
            "output": "/mnt/pvc/models/llama2-7b-alpaca-lora",
            "checkpoints": "/mnt/pvc/models/llama2-7b-alpaca-lora/checkpoints",
        },
        "mounts": {"datasets": "/mnt/pvc/datasets", "models": "/mnt/pvc/models"},
        "zeroStage": 2,
        "offload": "none",
        "worldSize": 16,
        "estimateBytes": 40 * 1024**3,
        "buckets": None,
    }
    assert config.progress.reporter == "pod-annotation"


def test_render_for_a_local_run_keeps_paths_and_takes_the_process_count() -> None:
    job = example_job(
        model={"uri": "file:///data/tiny"},
        dataset={"uri": "./data/train.jsonl", "format": "text"},
        output={"uri": "/tmp/out"},
        checkpointing={"uri": "/tmp/ckpt", "saveSteps": 5},
    )
    config = render_trainer_config(
        job, FakePlan(), mounts={}, world_size=2, progress=ProgressSettings(reporter="file")
    )
    assert config.paths.model_dump() == {
        "model": "/data/tiny",
        "dataset": "./data/train.jsonl",
        "output": "/tmp/out",
        "checkpoints": "/tmp/ckpt",
    }
    assert (config.world_size, config.mounts, config.progress.reporter) == (2, {}, "file")


def test_hub_model_has_no_local_path_and_an_unmounted_claim_is_refused() -> None:
    assert resolve_uri("hf://org/name", {}, "model.uri") is None
    with pytest.raises(TrainerConfigError, match="claim 'other' is not mounted"):
        resolve_uri("pvc://other/x", {"models": "/m"}, "model.uri")


def test_an_output_on_the_hub_is_refused_even_after_validation() -> None:
    job = example_job()
    job.spec.output.uri = "hf://org/adapter"  # the API refuses this at apply; a later change must not slip by
    with pytest.raises(TrainerConfigError, match=r"output\.uri: hf:// is read-only"):
        render_trainer_config(job, FakePlan())


def test_claims_of_lists_each_claim_once() -> None:
    job = example_job(checkpointing={"uri": "pvc://models/ckpt"})
    assert claims_of(job) == {"datasets": "/mnt/pvc/datasets", "models": "/mnt/pvc/models"}


# --- the schema -------------------------------------------------------------------------------------


def test_config_round_trips_through_yaml_and_json(tmp_path: Path) -> None:
    config = render_trainer_config(example_job(), FakePlan(zero_stage=3, offload=Offload.ALL))
    path = tmp_path / "trainer.yaml"
    path.write_text(config.to_yaml())
    assert load_config(path) == config
    json_path = tmp_path / "trainer.json"
    json_path.write_text(json.dumps(config.model_dump(mode="json", by_alias=True)))
    assert load_config(json_path) == config
    assert "learningRate" in path.read_text() and "zeroStage: 3" in path.read_text()


@pytest.mark.parametrize(
    ("stage", "offload", "message"),
    [
        (0, Offload.OPTIMIZER, "offload needs ZeRO stage 1 or higher"),
        (2, Offload.ALL, "offload all (parameters) needs ZeRO stage 3"),
    ],
)
def test_config_refuses_offload_without_the_zero_stage_it_needs(
    stage: int, offload: Offload, message: str
) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        render_trainer_config(example_job(), FakePlan(zero_stage=stage, offload=offload))


def test_config_refuses_unknown_fields() -> None:
    document = render_trainer_config(example_job(), FakePlan()).model_dump(by_alias=True, mode="json")
    document["zeroStge"] = 1
    with pytest.raises(ValidationError, match="zeroStge"):
        TrainerConfig.model_validate(document)


# --- ProgressReport ---------------------------------------------------------------------------------


def test_progress_report_round_trips_and_derives_the_status_block() -> None:
    report = ProgressReport(
        step=420,
        total_steps=1000,
        epoch=1.26,
        loss=1.5,
        learning_rate=1e-4,
        elapsed_seconds=200.0,
        steps_this_attempt=100,
        updated_at="2025-01-01T00:00:00+00:00",
    )
    assert ProgressReport.from_json(report.to_json()) == report
    assert '"totalSteps":1000' in report.to_json()
    status = report.to_status()
    # 100 steps in 200 s → 0.5 steps/s; 580 steps left → 1160 s.
    assert (status.percent, status.display, status.eta) == (42, "42% (420/1000)", "19m20s")
    assert (status.loss, status.learning_rate, status.updated_at) == (1.5, 1e-4, "2025-01-01T00:00:00+00:00")


def test_progress_report_has_no_eta_before_the_first_step() -> None:
    status = ProgressReport(step=0, total_steps=10).to_status()
    assert (status.percent, status.eta) == (0, None)


# --- DeepSpeed config -------------------------------------------------------------------------------


def ds_for(
    stage: int, offload: Offload = Offload.NONE, device: str = "cuda", **training: Any
) -> dict[str, Any]:
    job = example_job(
        training={
            "microBatchSize": 4,
            "gradientAccumulationSteps": 8,
            "maxGradNorm": 0.5,
            "weightDecay": 0.01,
            **training,
        }
    )
    config = render_trainer_config(job, FakePlan(zero_stage=stage, offload=offload))
    return render_deepspeed_config(config, device)  # type: ignore[arg-type]


BASE = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 8,
    "gradient_clipping": 0.5,
    "steps_per_print": 1_000_000_000,
    "wall_clock_breakdown": False,
    "bf16": {"enabled": True},
    "fp16": {"enabled": False},
    "zero_allow_untested_optimizer": True,
}


@pytest.mark.parametrize(
    ("stage", "offload", "device", "zero", "extra"),
    [
        (0, Offload.NONE, "cuda", {"stage": 0}, {}),
        (2, Offload.NONE, "cuda", {"stage": 2, "overlap_comm": True, "contiguous_gradients": True}, {}),
        (2, Offload.NONE, "cpu", {"stage": 2, "overlap_comm": False, "contiguous_gradients": True}, {}),
        (
            3,
            Offload.NONE,
            "cuda",
            {
                "stage": 3,
                "overlap_comm": True,
                "contiguous_gradients": True,
                "stage3_gather_16bit_weights_on_model_save": True,
            },
            {},
        ),
        (
            2,
            Offload.OPTIMIZER,
            "cuda",
            {
                "stage": 2,
                "overlap_comm": True,
                "contiguous_gradients": True,
                "offload_optimizer": {"device": "cpu", "pin_memory": True},
            },
            {
                "optimizer": {
                    "type": "AdamW",
                    "params": {"lr": 2e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01},
                }
            },
        ),
        (
            3,
            Offload.ALL,
            "cpu",
            {
                "stage": 3,
                "overlap_comm": False,
                "contiguous_gradients": True,
                "stage3_gather_16bit_weights_on_model_save": True,
                "offload_optimizer": {"device": "cpu", "pin_memory": False},
                "offload_param": {"device": "cpu", "pin_memory": False},
            },
            {
                "optimizer": {
                    "type": "AdamW",
                    "params": {"lr": 2e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01},
                }
            },
        ),
    ],
)
def test_deepspeed_config_is_rendered_whole(
    stage: int, offload: Offload, device: str, zero: dict[str, Any], extra: dict[str, Any]
) -> None:
    assert ds_for(stage, offload, device) == BASE | {"zero_optimization": zero} | extra


@pytest.mark.parametrize(
    ("precision", "bf16", "fp16_enabled"),
    [(Precision.BF16, True, False), (Precision.FP16, False, True), (Precision.FP32, False, False)],
)
def test_deepspeed_precision_follows_the_spec(precision: Precision, bf16: bool, fp16_enabled: bool) -> None:
    ds = ds_for(0, precision=precision.value)
    assert ds["bf16"] == {"enabled": bf16}
    assert ds["fp16"]["enabled"] is fp16_enabled
    if fp16_enabled:
        assert ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling


@pytest.mark.parametrize(
    ("stage", "bf16"),
    [
        (0, {"enabled": False}),  # torch's AdamW steps the bf16 parameters (DeepSpeed's would keep fp32)
        (1, {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}),
        (3, {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}),
    ],
)
def test_pure_bf16_keeps_deepspeeds_master_states_in_bf16(stage: int, bf16: dict[str, bool]) -> None:
    assert ds_for(stage, pureBf16=True)["bf16"] == bf16
    assert ds_for(stage)["bf16"] == {"enabled": True}


@pytest.mark.parametrize("stage", [2, 3])
def test_the_deepspeed_buckets_are_the_ones_the_plans_estimate_counts(stage: int) -> None:
    job = example_job(distributed={"zeroStage": stage})
    planned = plan(job.spec)
    config = render_trainer_config(job, planned)
    zero = render_deepspeed_config(config)["zero_optimization"]
    assert config.buckets == planned.estimate.buckets
    # a LoRA's reduce bucket holds its gradients, not DeepSpeed's default 5e8 elements
    assert zero["reduce_bucket_size"] == planned.estimate.trainable_params < 500_000_000
    assert zero.get("stage3_prefetch_bucket_size") == (50_000_000 if stage == 3 else None)


def test_offload_with_an_optimizer_that_cannot_step_on_the_host_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match=r"needs training\.optimizer adamw"):
        ds_for(2, Offload.OPTIMIZER, optimizer=Optimizer.ADAMW_8BIT.value)


# --- exit codes ---------------------------------------------------------------------------------------


class OutOfMemoryError(RuntimeError):
    """Stands in for torch.OutOfMemoryError: same name, and made to look like torch's module."""


OutOfMemoryError.__module__ = "torch"


class DataError(ValueError):
    """Stands in for the data package's error."""


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (OutOfMemoryError("CUDA out of memory"), ExitCode.OUT_OF_MEMORY),
        (ConfigurationError("prefix + ZeRO-3"), ExitCode.CONFIG_ERROR),
        (DataError("no records"), ExitCode.CONFIG_ERROR),
        (ImportError("FlashAttention2 requires flash_attn"), ExitCode.CONFIG_ERROR),
        (ModuleNotFoundError("No module named 'flash_attn'"), ExitCode.CONFIG_ERROR),
        (RuntimeError("NCCL timeout"), ExitCode.RETRYABLE),
        (OSError("storage went away"), ExitCode.RETRYABLE),
    ],
)
def test_exceptions_map_to_exit_codes(error: BaseException, code: ExitCode) -> None:
    assert exit_code_for(error) is code


class FakeHub(http.server.BaseHTTPRequestHandler):
    """The hub's answers for repositories this job cannot have: /acme/missing does not exist, /acme/private
    wants a token, /acme/gated needs access granted (status and X-Error-Code as the real hub sends them)."""

    ANSWERS: ClassVar[dict[str, tuple[int, str | None]]] = {
        "missing": (404, "RepoNotFound"),
        "private": (401, None),
        "gated": (403, "GatedRepo"),
    }

    def do_HEAD(self) -> None:
        self.answer()

    def do_GET(self) -> None:
        self.answer()

    def answer(self) -> None:
        status, error_code = self.ANSWERS[self.path.split("/")[2]]
        body = b'{"error": "refused"}'
        self.send_response(status)
        if error_code:
            self.send_header("X-Error-Code", error_code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_hub_model_that_is_missing_private_or_gated_is_a_configuration_error(tmp_path: Path) -> None:
    """transformers against a hub on loopback that refuses: what the trainer exits with for each."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    script = (
        "from transformers import AutoTokenizer\n"
        "from finetune_trainer.exit_codes import exit_code_for\n"
        "for repo in ('missing', 'private', 'gated'):\n"
        "    try:\n"
        "        AutoTokenizer.from_pretrained(f'acme/{repo}')\n"
        "    except Exception as exc:\n"
        "        print(repo, int(exit_code_for(exc)), type(exc.__cause__).__name__)\n"
    )
    env = os.environ | {"HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HOME": str(tmp_path)}
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
        )
    finally:
        server.shutdown()
    assert done.stdout.splitlines() == [
        "missing 78 RepositoryNotFoundError",
        "private 78 HfHubHTTPError",
        "gated 78 GatedRepoError",
    ], done.stderr[-3000:]


def test_a_hub_that_cannot_be_reached_is_retried() -> None:
    """No network and nothing cached is the hub client's LocalEntryNotFoundError, a subclass of the
    EntryNotFoundError that a missing file raises: a retry may cure the first, never the second."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    def wrapped(cause: BaseException) -> OSError:
        try:
            raise OSError("transformers' message") from cause
        except OSError as error:
            return error

    assert exit_code_for(wrapped(LocalEntryNotFoundError("no connection"))) is ExitCode.RETRYABLE
    assert exit_code_for(wrapped(EntryNotFoundError("no such file"))) is ExitCode.CONFIG_ERROR


def test_the_first_failing_rank_writes_the_termination_message_in_a_pod_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetune_operator.api import trainer as contract
    from finetune_trainer.__main__ import write_termination_message

    absent = tmp_path / "absent"
    monkeypatch.setattr(contract, "TERMINATION_MESSAGE_PATH", str(absent))
    write_termination_message("CONFIG_ERROR: x")
    assert not absent.exists()  # outside a pod nothing is created

    log = tmp_path / "termination-log"
    log.write_text("")  # the kubelet makes it, empty
    monkeypatch.setattr(contract, "TERMINATION_MESSAGE_PATH", str(log))
    write_termination_message("CONFIG_ERROR: dataset.uri\n  names no file")
    write_termination_message("RETRYABLE: peer closed the connection")  # a rank that failed second
    assert log.read_text() == "CONFIG_ERROR: dataset.uri names no file"


def test_the_worker_exits_with_its_code_after_flushing_and_skips_teardown(tmp_path: Path) -> None:
    """exit_now keeps the run's code even where the interpreter's teardown would have changed it."""
    script = (
        "import atexit, logging, sys\n"
        "from finetune_trainer.__main__ import exit_now\n"
        "atexit.register(lambda: sys.stdout.write('teardown ran'))\n"
        "logging.basicConfig(filename=sys.argv[1], level=logging.INFO)\n"
        "logging.getLogger('t').info('logged before exit')\n"
        "sys.stdout.write('printed before exit')\n"
        "exit_now(78)\n"
    )
    log = tmp_path / "worker.log"
    done = subprocess.run(
        [sys.executable, "-c", script, str(log)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 78, done.stderr
    assert done.stdout == "printed before exit"  # flushed, and no atexit handler (teardown) ran
    assert "logged before exit" in log.read_text()


def test_validation_errors_are_configuration_errors() -> None:
    with pytest.raises(ValidationError) as caught:
        TrainerConfig.model_validate({"jobName": "x"})
    assert exit_code_for(caught.value) is ExitCode.CONFIG_ERROR


@pytest.mark.parametrize(
    ("code", "retry", "reason"),
    [
        (0, False, "Succeeded"),
        (75, True, "Retryable"),
        (78, False, "ConfigError"),
        (79, False, "OutOfMemory"),
        (1, True, "Crashed1"),
        (137, True, "KilledBySignal9"),
    ],
)
def test_operator_side_reading_of_exit_codes(code: int, retry: bool, reason: str) -> None:
    assert (is_retryable(code), describe(code)) == (retry, reason)


def test_method_enum_is_what_the_config_embeds() -> None:
    config = render_trainer_config(example_job(), FakePlan())
    assert config.method.type is Method.LORA and config.uses_peft and not config.is_classification
