"""`ftctl` as a user runs it: the installed console script, its JSON contract and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_operator.cli import main

EXAMPLE = "examples/llama2-7b-alpaca-lora.yaml"
FTCTL = str(Path(sys.executable).with_name("ftctl"))


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    assert main([*argv, "-o", "json"]) == 0
    data: dict[str, object] = json.loads(capsys.readouterr().out)
    return data


def test_estimate_json_contract(capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(
        capsys,
        "estimate",
        "--model", "meta-llama/Llama-2-7b-hf",
        "--method", "lora",
        "--micro-batch-size", "2",
        "--seq-len", "512",
        "--gradient-checkpointing",
        "--lora-r", "8",
        "--lora-target-modules", "q_proj,v_proj",
        "--zero-stage", "0",
        "--gpus", "1",
    )  # fmt: skip
    breakdown = data["breakdown"]
    assert isinstance(breakdown, dict)
    assert set(breakdown) >= {"weights", "gradients", "optimizer", "activations", "overhead"}
    assert sum(breakdown.values()) == data["per_gpu_bytes"]
    assert data["total_params"] == 6_738_415_616
    assert data["trainable_params"] == 4_194_304  # r=8 on q,v: 32 layers x 2 x 8 x (4096 + 4096)


def test_estimate_reads_a_local_config_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = {
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "tie_word_embeddings": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    local = run_json(capsys, "estimate", "--model-config", str(tmp_path), "--method", "full")
    named = run_json(capsys, "estimate", "--model", "meta-llama/Llama-2-7b-hf", "--method", "full")
    assert local["per_gpu_bytes"] == named["per_gpu_bytes"]


def test_plan_json_contract(capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(capsys, "plan", "-f", EXAMPLE)
    for key in ("gpus", "nodes", "gpus_per_node", "zero_stage", "offload", "per_gpu_bytes", "fits"):
        assert key in data
    assert data["fits"] is True and data["gpus"] == 1


def test_plan_that_does_not_fit_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = Path(EXAMPLE).read_text().replace("gpus: auto", "gpus: 1").replace("type: lora", "type: full")
    job = job.replace("lora: {r: 16, alpha: 32, dropout: 0.05, targetModules: [q_proj, v_proj]}", "")
    (tmp_path / "job.yaml").write_text(job.replace("Llama-2-7b-hf", "Llama-2-70b-hf"))
    assert main(["plan", "-f", str(tmp_path / "job.yaml")]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["estimate", "--model", "acme/nope"], "ftctl estimate: unknown model 'acme/nope'"),
        (["estimate", "--model", "meta-llama/Llama-2-7b-hf", "--micro-batch-size", "0"], "micro_batch_size"),
        (["plan", "-f", "/nonexistent.yaml"], "ftctl plan: [Errno 2]"),
    ],
)
def test_bad_input_is_one_line_without_traceback(argv: list[str], message: str) -> None:
    result = subprocess.run([FTCTL, *argv], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_invalid_job_names_the_field(tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text(Path(EXAMPLE).read_text().replace("type: lora", "type: banana"))
    result = subprocess.run([FTCTL, "plan", "-f", str(tmp_path / "job.yaml")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "spec.method.type: Input should be 'full'" in result.stderr


def test_models_lists_the_catalogues(capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(capsys, "models")
    models, gpus = data["models"], data["gpus"]
    assert isinstance(models, dict) and isinstance(gpus, dict)
    assert "meta-llama/Llama-2-7b-hf" in models and "A100-80GB" in gpus


def test_help_lists_every_subcommand() -> None:
    result = subprocess.run([FTCTL, "--help"], capture_output=True, text=True, check=True)
    for command in ("estimate", "plan", "train", "models"):
        assert command in result.stdout


def test_render_prints_the_objects_the_pipeline_makes_in_the_namespace_asked(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml

    monkeypatch.setenv("FINETUNE_TRAINER_IMAGE", "registry.example/trainer:1")
    assert main(["render", "-f", EXAMPLE, "-n", "team-a", "--attempt", "2"]) == 0
    objects = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [(o["kind"], o["metadata"]["namespace"]) for o in objects] == [
        ("ConfigMap", "team-a"),
        ("Service", "team-a"),
        ("Pod", "team-a"),
    ]
    pod = objects[2]
    assert pod["metadata"]["labels"]["finetune.dev/attempt"] == "2"
    assert pod["spec"]["containers"][0]["image"] == "registry.example/trainer:1"  # the operator's setting
    trainer_config = yaml.safe_load(objects[0]["data"]["trainer_config.yaml"])
    assert trainer_config["jobName"] == "llama2-7b-alpaca-lora"
    assert main(["render", "-f", EXAMPLE, "-o", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["kind"] == "List" and [o["kind"] for o in listed["items"]] == [
        "ConfigMap",
        "Service",
        "Pod",
    ]


def test_render_of_a_job_that_cannot_run_prints_why_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    job = yaml.safe_load(Path(EXAMPLE).read_text())
    job["spec"]["resources"] |= {"gpus": 9, "gpusPerNode": 8}
    path = tmp_path / "uneven.yaml"
    path.write_text(yaml.safe_dump(job))
    assert main(["render", "-f", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("ftctl render: InvalidSpec: resources.gpus 9 cannot be spread evenly")
