"""`ftctl` as a user runs it: the installed console script, its JSON contract and its one-line errors."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune_operator.api.enums import Method
from finetune_operator.cli import main
from finetune_operator.core.calibration import underestimate_margins
from finetune_operator.core.plan import plan as plan_job
from finetune_operator.manifests import ManifestError, load_job, load_jobs

EXAMPLE = "examples/llama2-7b-alpaca-lora.yaml"
FTCTL = str(Path(sys.executable).with_name("ftctl"))


def first_line(text: str) -> int:
    """The line a YAML document's content starts on (after its leading comments)."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if line.strip() and not line.startswith("#"))


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
    assert (data["apiVersion"], data["kind"]) == ("ftctl.finetune.dev/v1", "Estimate")
    breakdown = data["breakdown"]
    assert isinstance(breakdown, dict)
    assert set(breakdown) >= {"weights", "gradients", "optimizer", "activations", "overhead"}
    assert sum(breakdown.values()) == data["perGpuBytes"]
    assert data["totalParams"] == 6_738_415_616
    assert data["trainableParams"] == 4_194_304  # r=8 on q,v: 32 layers x 2 x 8 x (4096 + 4096)
    setup = data["setup"]
    assert isinstance(setup, dict) and setup["microBatchSize"] == 2 and setup["loraR"] == 8


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
    assert local["perGpuBytes"] == named["perGpuBytes"]


def test_plan_json_is_status_plan_in_a_versioned_document(capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(capsys, "plan", "-f", EXAMPLE)
    assert (data["apiVersion"], data["kind"]) == ("ftctl.finetune.dev/v1", "Plan")
    first = first_line(Path(EXAMPLE).read_text())
    assert data["metadata"] == {"name": "llama2-7b-alpaca-lora", "source": f"{EXAMPLE}:{first}"}
    plan = data["plan"]
    assert isinstance(plan, dict)
    # exactly what the operator writes to status.plan (camelCase)
    job = load_jobs(EXAMPLE)[0].job
    assert plan == plan_job(job.spec).to_status().model_dump(mode="json", by_alias=True, exclude_none=True)
    assert plan["fits"] is True and plan["gpus"] == 1 and "gpusPerNode" in plan and "perGpuBytes" in plan
    assert plan["memoryPerGpu"] == "14.2 GiB of 73.6 GiB"  # what kubectl describe and get -o wide show
    assert main(["plan", "-f", EXAMPLE, "-o", "yaml"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == data


def test_plan_reads_stdin_directories_and_every_document(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = Path(EXAMPLE).read_text()
    piped = subprocess.run(
        [FTCTL, "plan", "-f", "-", "-o", "json"], input=text, capture_output=True, text=True
    )
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["metadata"]["source"] == f"<stdin>:{first_line(text)}"

    examples = run_json(capsys, "plan", "-f", "examples")  # a directory: each file, name order
    assert examples["kind"] == "List"
    items = examples["items"]
    assert isinstance(items, list)
    assert [i["metadata"]["name"] for i in items] == [
        yaml.safe_load(p.read_text())["metadata"]["name"] for p in sorted(Path("examples").glob("*.yaml"))
    ]

    other = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n"
    second = text.replace("name: llama2-7b-alpaca-lora", "name: second")
    (tmp_path / "two.yaml").write_text(f"{text}---\n{other}---\n{second}")
    both = run_json(capsys, "plan", "-f", str(tmp_path / "two.yaml"))
    names = [(i["metadata"]["name"], i["metadata"]["source"].rsplit(":", 1)[1]) for i in both["items"]]  # type: ignore[union-attr]
    second_at = text.count("\n") + other.count("\n") + 2 + first_line(second)
    assert names == [("llama2-7b-alpaca-lora", str(first_line(text))), ("second", str(second_at))]
    # a command that runs one job says so rather than dropping the second
    with pytest.raises(ManifestError, match="ftctl train takes one FineTuneJob"):
        load_job(str(tmp_path / "two.yaml"), "ftctl train")


def test_the_table_counts_in_words(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "-f", EXAMPLE]) == 0
    out = capsys.readouterr().out
    assert "1 GPU = 1 node x 1" in out and "GPUs" not in out.split("\n")[1]


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


def position_of(text: str, needle: str) -> str:
    """line:column (1-based) of `needle` in `text`."""
    before = text[: text.index(needle)]
    return f"{before.count(chr(10)) + 1}:{len(before) - before.rfind(chr(10))}"


def test_invalid_job_names_the_field_and_where_it_is(tmp_path: Path) -> None:
    text = Path(EXAMPLE).read_text().replace("type: lora", "type: banana")
    (tmp_path / "job.yaml").write_text(text)
    result = subprocess.run([FTCTL, "plan", "-f", str(tmp_path / "job.yaml")], capture_output=True, text=True)
    assert result.returncode == 2
    where = f"{tmp_path / 'job.yaml'}:{position_of(text, 'banana')}"
    assert f"{where}: spec.method.type: Input should be 'full'" in result.stderr
    # an unknown field points at its key
    typo = Path(EXAMPLE).read_text().replace("learningRate:", "learningRat:")
    (tmp_path / "typo.yaml").write_text(typo)
    with pytest.raises(
        ManifestError,
        match=rf"typo.yaml:{position_of(typo, 'learningRat:')}: spec.training.learningRat: unknown field",
    ):
        load_jobs(str(tmp_path / "typo.yaml"))


def test_yaml_that_does_not_parse_says_where(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("kind: FineTuneJob\nspec:\n  model: [unclosed\n")
    with pytest.raises(ManifestError, match=r"bad.yaml:4:1: not YAML: "):
        load_jobs(str(tmp_path / "bad.yaml"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    with pytest.raises(ManifestError, match="other: no FineTuneJob document"):
        load_jobs(str(tmp_path / "other"))


def test_models_lists_the_catalogues(capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(capsys, "models")
    models, gpus = data["models"], data["gpus"]
    assert isinstance(models, dict) and isinstance(gpus, dict)
    assert "meta-llama/Llama-2-7b-hf" in models and "A100-80GB" in gpus


def test_help_lists_every_subcommand_and_every_default() -> None:
    result = subprocess.run([FTCTL, "--help"], capture_output=True, text=True, check=True)
    for command in ("estimate", "plan", "render", "submit", "get", "status", "logs", "wait", "train", "export",
                    "models", "completion"):  # fmt: skip
        assert command in result.stdout
    estimate = subprocess.run(
        [FTCTL, "estimate", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for default in ("(default: lora)", "(default: bf16)", "(default: 512)", "(default: table)"):
        assert default in " ".join(estimate.split()), estimate


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["ftctl", "pl"], "plan"),
        (["ftctl", "plan", "-o", ""], "table json yaml"),
        (["ftctl", "render", "-o", ""], "yaml json"),
        (["ftctl", "estimate", "--method", "q"], "qlora"),
        (["ftctl", "plan", "--fi"], "--filename"),
        (["ftctl", "completion", ""], "bash zsh"),
        (["ftctl", "plan", "-f", "examples/llama2"], "examples/llama2-7b-alpaca-lora.yaml"),
    ],
)
def test_the_completion_script_completes_in_bash(words: list[str], expected: str) -> None:
    script = subprocess.run([FTCTL, "completion", "bash"], capture_output=True, text=True, check=True).stdout
    words_literal = " ".join(shlex.quote(w) for w in words)
    probe = f'{script}\nCOMP_WORDS=({words_literal}); COMP_CWORD={len(words) - 1}; _ftctl; echo "${{COMPREPLY[*]}}"'
    result = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == expected


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
    assert captured.err.startswith(
        f"ftctl render: {path}:1: InvalidSpec: resources.gpus 9 cannot be spread evenly"
    )


def test_estimates_explain_their_peak_and_their_uncertainty(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["estimate", "--model", "meta-llama/Llama-2-7b-hf", "--method", "full"]) == 0
    table = capsys.readouterr().out
    assert "peak at the optimizer step" in table and "(3.01 GiB at their own peak, in backward)" in table
    assert "20.0 B per parameter, not the rule of thumb's 16" in table and "temporary" not in table
    assert (
        main(["estimate", "--model", "meta-llama/Llama-2-7b-hf", "--method", "full", "--no-fused-optimizer"])
        == 0
    )
    assert "24.0 B per parameter" in capsys.readouterr().out  # foreach AdamW's step temporary
    data = run_json(capsys, "estimate", "--model", "meta-llama/Llama-2-7b-hf", "--method", "full")
    assert data["peakPhase"] == "optimizer_step" and data["activationBytesAtTheirPeak"] > 0
    # a QLoRA plan with less headroom than QLoRA's published measurements ran above estimates says so:
    # the L4 example without Liger's small loss (with it, 7.8 of 20.7 GiB: room enough)
    tight = tmp_path / "tight.yaml"
    example = Path("examples/qwen2.5-7b-qlora-l4.yaml").read_text()
    tight.write_text(
        example.replace("gradientCheckpointing: true,", "gradientCheckpointing: true, useLigerKernel: false,")
    )
    qlora = run_json(capsys, "plan", "-f", str(tight))["plan"]
    assert isinstance(qlora, dict) and qlora["peakPhase"] == "backward"
    assert qlora["estimateMargin"] == round(underestimate_margins()[Method.QLORA], 3) > 0.3
    assert "within the estimate's uncertainty: measured qlora peaks ran up to" in qlora["message"]
    roomy = run_json(capsys, "plan", "-f", EXAMPLE)["plan"]
    assert isinstance(roomy, dict) and "uncertainty" not in roomy["message"]  # 5x headroom


def test_a_sequence_longer_than_the_models_context_is_refused(tmp_path: Path) -> None:
    (tmp_path / "long.yaml").write_text(
        Path(EXAMPLE).read_text().replace("maxSeqLength: 512", "maxSeqLength: 1000000")
    )
    result = subprocess.run(
        [FTCTL, "plan", "-f", str(tmp_path / "long.yaml")], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "dataset.maxSeqLength 1000000 is longer than the model's context (4096 tokens" in result.stderr
