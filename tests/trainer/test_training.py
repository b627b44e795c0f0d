"""Every method trains under torchrun --nproc_per_node 2 with DeepSpeed on gloo (CPU), as a pod runs it.

Matrix (each method once, each ZeRO stage at least twice; the full cross product would take ~4 minutes
more on 2 cores for no new code path):

    stage 0: full (Llama), prompt (Llama), lora (BERT classifier, with evaluation and early stopping)
    stage 2: lora (Llama, also kill/resume, SIGTERM and ftctl train), qlora (Llama), prefix (BERT classifier)
    stage 3: freeze (Llama), qlora (Llama), dora (Llama), lora (Llama, saved adapter vs in-memory logits)

QLoRA runs with gradient checkpointing, as it is used in practice, and with a compute dtype other than the
training precision (bf16 training with fp32 compute under ZeRO-2, the reverse under ZeRO-3).

prefix and prompt under ZeRO-3 are refused (see methods/prompt.py); that refusal is tested too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import yaml
from safetensors import safe_open

from finetune_operator.api.exit_codes import ExitCode
from finetune_operator.api.trainer import CONFIG_FILE
from finetune_trainer import checkpoints
from finetune_trainer.config import load_config

from . import harness

pytestmark = pytest.mark.trainer

LLAMA_STEP_LR = {"full": 2e-3, "freeze": 2e-3, "lora": 3e-2, "qlora": 3e-2, "dora": 3e-2, "prompt": 1e-1}


def adapter_keys(out: Path) -> list[str]:
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        return list(f.keys())


def assert_trained(workdir: Path, expect_steps: int = 30) -> dict[str, Any]:
    summary = harness.summary(workdir)
    losses = [loss for _, loss in summary["lossHistory"]]
    assert summary["steps"] == expect_steps
    assert len(losses) >= 4, summary
    # Falls over the run: the last two logged losses average clearly below the first two.
    assert (losses[-1] + losses[-2]) / 2 < (losses[0] + losses[1]) / 2 - 0.02, losses
    assert summary["finalLoss"] == losses[-1] and summary["bestLoss"] == min(losses)
    assert 0 < summary["trainableParams"] <= summary["totalParams"]
    assert summary["tokens"] > 0 and summary["tokensPerSecond"] > 0
    assert summary["peakGpuMemoryAllocatedBytes"] is None  # CPU: no GPU memory to report
    found = checkpoints.list_checkpoints(workdir / "out" / "checkpoints")
    assert [(c.step, c.complete) for c in found] == [(20, True), (30, True)]  # saveTotalLimit 2
    progress = harness.progress(workdir)
    assert progress is not None and progress["state"] == "completed" and progress["step"] == expect_steps
    return summary


def assert_loss_plot(picture: Path) -> None:
    """A PNG of the size plots.py draws (8 x 4.5 in at 100 dpi)."""
    header = picture.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", header
    width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    assert (width, height) == (800, 450)


def assert_tracked(out: Path, job: str, losses: list[float]) -> None:
    """Each tracker of training.reportTo wrote the run's losses into the output directory, offline."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "runs"))
    events.Reload()
    assert [round(e.value, 4) for e in events.Scalars("train/loss")] == [round(v, 4) for v in losses]

    with mock.patch.dict(os.environ, {"MLFLOW_ALLOW_FILE_STORE": "true"}):  # the trainer's default store
        client = MlflowClient(tracking_uri=str(out / "mlruns"))
        experiment = client.get_experiment_by_name(job)
        assert experiment is not None
        (run,) = client.search_runs([experiment.experiment_id])
        history = client.get_metric_history(run.info.run_id, "loss")
    assert [round(m.value, 4) for m in history] == [round(v, 4) for v in losses]

    (offline,) = (out / "wandb").glob("offline-run-*")
    assert any(offline.glob("*.wandb")), sorted(p.name for p in offline.iterdir())


def train_ok(workdir: Path, **kwargs: Any) -> dict[str, Any]:
    config = harness.write_trainer_config(workdir, **kwargs)
    code = harness.run(config)
    assert code == 0, harness.tail(workdir)
    return assert_trained(workdir)


@pytest.mark.parametrize(
    ("method", "stage"),
    [("full", 0), ("freeze", 3), ("lora", 2), ("qlora", 2), ("qlora", 3), ("dora", 3), ("prompt", 0)],
)
def test_llama_method_trains_and_checkpoints(
    tmp_path: Path, tiny_llama_dir: Path, text_data: Path, method: str, stage: int
) -> None:
    spec: dict[str, Any] = {"type": method}
    training: dict[str, Any] = {"learningRate": LLAMA_STEP_LR[method]}
    if method == "qlora":
        # compute dtype and precision differ both ways (the packed weights once took the compute dtype,
        # and DeepSpeed's cast to the precision broke them); with checkpointing, as QLoRA runs in practice
        training["precision"], compute = ("bf16", "fp32") if stage == 2 else ("fp32", "bf16")
        spec["qlora"] = {"computeDtype": compute}
        training["gradientCheckpointing"] = True
    if method == "freeze":
        spec["freeze"] = {"trainableLayers": 1}
    # packed rows (whole examples, position ids, one flattened row per micro batch) for the methods
    # that take them
    packing = method in ("full", "lora", "dora")
    summary = train_ok(
        tmp_path,
        model_dir=tiny_llama_dir,
        data=text_data,
        method=spec,
        zero_stage=stage,
        training=training,
        dataset={"packing": packing},
    )
    out = tmp_path / "out"
    assert (out / "tokenizer_config.json").is_file()
    if method in ("full", "freeze"):
        assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
        # the KV cache is off while training (packed rows need that) and on again in the saved model
        assert json.loads((out / "config.json").read_text())["use_cache"] is True
        if method == "full":
            assert summary["trainableParams"] == summary["totalParams"]
        else:  # one of two layers, no embeddings or head: well under half
            assert summary["trainableParams"] < summary["totalParams"] / 2
        return
    keys = adapter_keys(out)
    expected = {
        "lora": "lora_A",
        "qlora": "lora_A",
        "dora": "lora_magnitude_vector",
        "prompt": "prompt_embeddings",
    }
    assert any(expected[method] in k for k in keys), keys
    assert summary["trainableParams"] < summary["totalParams"] / 10
    # QLoRA's base was 4-bit in the run itself: all 7 projections of both layers (the head stays).
    assert summary["quantizedLayers"] == (14 if method == "qlora" else 0)


@pytest.mark.parametrize(("method", "stage"), [("lora", 0), ("prefix", 2)])
def test_bert_classifier_method_trains(
    tmp_path: Path, tiny_bert_dir: Path, classification_data: Path, method: str, stage: int
) -> None:
    spec: dict[str, Any] = {"type": method}
    if method == "lora":
        spec["lora"] = {"targetModules": ["query", "value"]}
    summary = train_ok(
        tmp_path,
        model_dir=tiny_bert_dir,
        data=classification_data,
        method=spec,
        zero_stage=stage,
        classification=True,
        dataset={"validationSplit": 0.25},
        training={"learningRate": 1e-2, "evalSteps": 10, "earlyStopping": {"patience": 5}},
    )
    # Evaluated every 10 steps on the held-out quarter; patience 5 never ran out in 3 evaluations.
    assert summary["finalEvalLoss"] is not None and summary["bestEvalLoss"] <= summary["finalEvalLoss"]
    progress = harness.progress(tmp_path)
    assert progress is not None and progress["evalLoss"] == summary["finalEvalLoss"]
    keys = adapter_keys(tmp_path / "out")
    # SEQ_CLS: PEFT trains and saves the new classifier head next to the adapter.
    assert any("classifier" in k for k in keys), keys


def test_early_stopping_ends_the_run_when_eval_loss_stops_improving(
    tmp_path: Path, tiny_bert_dir: Path, classification_data: Path
) -> None:
    """A threshold no change can beat: the first evaluation sets the best, the next two are not
    improvements, so patience 2 stops the run at step 15 of 30."""
    config = harness.write_trainer_config(
        tmp_path,
        model_dir=tiny_bert_dir,
        data=classification_data,
        method={"type": "lora", "lora": {"targetModules": ["query", "value"]}},
        zero_stage=0,
        classification=True,
        dataset={"validationSplit": 0.25},
        training={"evalSteps": 5, "earlyStopping": {"patience": 2, "threshold": 100.0}},
        checkpointing={"saveSteps": 5},
    )
    assert harness.run(config) == ExitCode.SUCCESS, harness.tail(tmp_path)
    summary = harness.summary(tmp_path)
    assert summary["steps"] == 15, summary
    assert summary["finalEvalLoss"] is not None


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_unsupported_combination_exits_with_the_configuration_error_code(
    tmp_path: Path, tiny_llama_dir: Path, text_data: Path, method: str
) -> None:
    config = harness.write_trainer_config(
        tmp_path, model_dir=tiny_llama_dir, data=text_data, method={"type": method}, zero_stage=3
    )
    assert harness.run(config) == ExitCode.CONFIG_ERROR
    assert "does not run under ZeRO-3" in harness.tail(tmp_path)


PROBE = Path(__file__).with_name("logits_probe.py")


def test_saved_adapter_and_merged_model_reproduce_the_trained_logits_under_zero3(
    tmp_path: Path, tiny_llama_dir: Path, text_data: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = harness.write_trainer_config(
        tmp_path,
        model_dir=tiny_llama_dir,
        data=text_data,
        method={"type": "lora", "lora": {"dropout": 0.0}},
        zero_stage=3,
        training={"maxSteps": 10, "learningRate": 3e-2},
        output={"saveMerged": True},
    )
    log = tmp_path / "probe.log"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "finetune_trainer.launch", "--standalone", "--nproc_per_node", "2"]
    with log.open("wb") as handle:
        code = subprocess.call(
            [*command, str(PROBE), str(config)], stdout=handle, stderr=subprocess.STDOUT, env=env, timeout=240
        )
    assert code == 0, log.read_text()[-4000:]
    probe = torch.load(tmp_path / "out" / "probe.pt")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    untrained = base(input_ids=probe["input_ids"]).logits
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "out")).eval()
    with torch.no_grad():
        logits = reloaded(input_ids=probe["input_ids"]).logits
    assert not torch.allclose(untrained, probe["logits"], atol=1e-3)  # training changed the model
    torch.testing.assert_close(logits, probe["logits"], atol=1e-5, rtol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=probe["input_ids"]).logits, probe["logits"], atol=1e-4, rtol=1e-4
        )
    # ftctl export makes the same model from the output directory, later and elsewhere
    from finetune_operator.cli import main

    exported = tmp_path / "exported"
    assert main(["export", str(tmp_path / "out"), "--output", str(exported), "--dtype", "fp32"]) == 0
    assert (exported / "tokenizer_config.json").is_file() and not (exported / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=probe["input_ids"]).logits, probe["logits"], atol=1e-4, rtol=1e-4
        )
    assert main(["export", str(tmp_path), "--output", str(tmp_path / "nothing")]) == 2  # not an adapter


def long_lora_run(workdir: Path, llama: Path, data: Path, save_steps: int) -> Path:
    return harness.write_trainer_config(
        workdir,
        model_dir=llama,
        data=data,
        method={"type": "lora"},
        zero_stage=2,
        training={"maxSteps": 300, "learningRate": 3e-2, "loggingSteps": 1},
        checkpointing={"saveSteps": save_steps, "saveTotalLimit": 3},
    )


def test_sigkill_then_restart_resumes_from_the_latest_complete_checkpoint(
    tmp_path: Path, tiny_llama_dir: Path, text_data: Path
) -> None:
    config = long_lora_run(tmp_path, tiny_llama_dir, text_data, save_steps=10)
    root = tmp_path / "out" / "checkpoints"
    process = harness.start(config, tmp_path / "run-1.log")
    try:
        harness.wait_for(
            lambda: (c := checkpoints.latest_complete(root)) is not None and c.step >= 20,
            180,
            "checkpoint-20",
        )
    finally:
        harness.kill_gang(process)  # launcher and workers, as a node loss would
    latest = checkpoints.latest_complete(root)
    assert latest is not None and 20 <= latest.step < 300, "the run finished before it could be killed"
    partial = root / f"checkpoint-{latest.step + 5}"  # a save cut short: no COMPLETE marker
    (partial / "global_step").mkdir(parents=True)
    assert harness.run(config) == 0, harness.tail(tmp_path)
    summary = harness.summary(tmp_path)
    assert summary["resumedFromStep"] == latest.step
    assert (summary["steps"], summary["stepsThisAttempt"]) == (300, 300 - latest.step)
    assert not partial.exists()
    assert [c.step for c in checkpoints.list_checkpoints(root)] == [280, 290, 300]


def test_sigterm_saves_a_checkpoint_and_exits_retryable(
    tmp_path: Path, tiny_llama_dir: Path, text_data: Path
) -> None:
    config = long_lora_run(tmp_path, tiny_llama_dir, text_data, save_steps=100_000)  # only SIGTERM saves
    process = harness.start(config, tmp_path / "run-1.log")
    try:
        harness.wait_for(
            lambda: (p := harness.progress(tmp_path)) is not None and p["step"] >= 5, 180, "step 5"
        )
        process.send_signal(signal.SIGTERM)  # to the launcher only, as the kubelet signals PID 1
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            harness.kill_gang(process)
    assert code == ExitCode.RETRYABLE, harness.tail(tmp_path)
    saved = checkpoints.list_checkpoints(tmp_path / "out" / "checkpoints")
    assert len(saved) == 1 and saved[0].complete and 5 <= saved[0].step < 300, saved
    progress = harness.progress(tmp_path)
    assert progress is not None and progress["lastCheckpointStep"] == saved[0].step
    assert not (tmp_path / "out" / "training_summary.json").exists()  # it did not pretend to finish


def test_ftctl_train_runs_a_finetunejob_locally(
    tmp_path: Path, tiny_llama_dir: Path, text_data: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """On a laptop: no GPU type to name, readable lines, a log and a summary; a finished run is not
    overwritten by accident, and a checkpoint of another configuration is a one-line configuration error."""
    from finetune_operator.cli import main

    job = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "local-lora"},
        "spec": {
            "model": {"uri": f"file://{tiny_llama_dir}"},
            "dataset": {"uri": str(text_data), "format": "text", "maxSeqLength": 32},
            "method": {"type": "lora"},
            "training": {
                "maxSteps": 30,
                "learningRate": 3e-2,
                "lrScheduler": "constant",
                "precision": "fp32",
                "microBatchSize": 4,
                "loggingSteps": 5,
                "reportTo": ["tensorboard", "mlflow", "wandb"],
            },
            "checkpointing": {"saveSteps": 10, "saveTotalLimit": 2},
            "resources": {"gpusPerNode": 1},  # planned for this machine's memory
            "distributed": {"zeroStage": 2},
            "output": {"uri": "/nonexistent/replaced-by-output-dir"},
        },
    }
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    code = main(
        ["train", "-f", str(job_file), "--nproc-per-node", "2", "--output-dir", str(tmp_path / "out")]
    )
    assert code == 0
    rendered = load_config(tmp_path / "out" / CONFIG_FILE)
    assert (rendered.zero_stage, rendered.world_size, rendered.paths.model) == (2, 2, str(tiny_llama_dir))
    assert rendered.estimate_bytes is not None and rendered.estimate_bytes > 0
    summary = assert_trained(tmp_path)
    assert (summary["jobName"], summary["worldSize"], summary["zeroStage"]) == ("local-lora", 2, 2)
    assert summary["estimatedPerGpuBytes"] == rendered.estimate_bytes
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["peft_type"] == "LORA"

    err = capfd.readouterr().err
    assert "tokenised before" not in err and len(list((tmp_path / "out" / ".tokenized").iterdir())) == 1
    assert "step 30/30 (100%) loss " in err and "tokens/s" in err  # one plain line per log: not a terminal
    assert "{'loss'" not in err  # HF's raw dicts of strings are gone
    assert f"ftctl train: saved to {tmp_path / 'out'}" in err and "plot training_loss.png" in err
    logged = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [5, 10, 15, 20, 25, 30] and all("loss" in r for r in logged)
    assert_loss_plot(tmp_path / "out" / "training_loss.png")
    assert_tracked(tmp_path / "out", "local-lora", [r["loss"] for r in logged])

    # the same output again: refused, the finished run is kept
    again = ["train", "-f", str(job_file), "--nproc-per-node", "2", "--output-dir", str(tmp_path / "out")]
    assert main(again) == 2
    assert "holds a finished run (training_summary.json); use another --output-dir, or --overwrite" in (
        capfd.readouterr().err
    )
    # an interrupted run (no summary) resumes; with another LoRA rank its checkpoint cannot load
    (tmp_path / "out" / "training_summary.json").unlink()
    job["spec"]["method"] = {"type": "lora", "lora": {"r": 16}}
    job_file.write_text(yaml.safe_dump(job))
    assert main(again) == ExitCode.CONFIG_ERROR
    err = capfd.readouterr().err
    assert "data: tokenised before, loaded from" in err  # the same data: the first run's tokens
    assert "was saved by a different configuration" in err and "size mismatch" in err, err[-3000:]
    assert "Traceback" not in err  # the one line says it all
    # another precision: DeepSpeed looks for optimizer shards of that precision, which are not there
    job["spec"]["method"] = {"type": "lora"}
    job["spec"]["training"]["precision"] = "bf16"
    job_file.write_text(yaml.safe_dump(job))
    assert main(again) == ExitCode.CONFIG_ERROR
    err = capfd.readouterr().err
    assert "was saved by a different configuration" in err and "bf16_zero_pp_rank_0" in err, err[-3000:]
