"""Trainer benchmark: each method's measured peak GPU memory and tokens/s next to the estimator's prediction.

Run on one GPU (what `device` lends a session), from the repository root:

    python bench/trainer_methods.py --write bench/results/trainer-methods-h100.json

It builds a randomly initialised model with the shapes of a catalogue model (default Qwen/Qwen2.5-0.5B:
its vocabulary, widths, layers and heads; nothing is downloaded), writes synthetic text, and trains each
method through `ftctl train`, the rendering and trainer the pods run. Each run's `training_summary.json`
holds the peak memory torch measured (`max_memory_allocated`/`max_memory_reserved`) and the plan's
per-GPU estimate; this script puts them side by side, with tokens/s beside a plain HF Trainer run of the
same settings (`hf_baseline.py`; `--no-baseline` skips it) and the model FLOPs utilisation of both.
Without a GPU, `--tiny` runs the same path on CPU with a two-layer model (no GPU memory or MFU to
report): that is how tests/trainer checks the script.

MFU = tokens/s x FLOPs per token / the GPU's dense bf16 peak. FLOPs per token, as PaLM's appendix B
counts them: 2N forward and 2N backward through the N matmul parameters (input embeddings excluded),
2 more per trainable parameter for its weight gradient (6N for full fine-tuning), and 12·L·h·s for
attention over a sequence of s (recomputation under gradient checkpointing is not counted).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen2Config

from finetune_operator.api.enums import Method
from finetune_operator.api.methods import METHODS
from finetune_operator.cli import main as ftctl
from finetune_operator.core.architecture import ModelArchitecture, catalogue_architecture

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the trainer tests' offline tokenizer (tests/trainer/tokenizer.py)
from bench.hf_baseline import run_baseline  # noqa: E402
from tests.trainer.tokenizer import build_tiny_tokenizer, corpus  # noqa: E402

GIB = 2**30
#: Dense bf16 tensor-core peak FLOP/s by device name (vendor data sheets), for MFU.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
}
#: Adapter methods learn faster than the whole model; the numbers are typical, not tuned.
LEARNING_RATES = {Method.FULL: 1e-5, Method.FREEZE: 1e-5}


def hf_config(architecture: ModelArchitecture, vocab_size: int) -> PretrainedConfig:
    """A transformers config with the catalogue's shapes: Qwen2 where q/k/v carry a bias, Llama otherwise."""
    shapes: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": architecture.hidden_size,
        "intermediate_size": architecture.intermediate_size,
        "num_hidden_layers": architecture.num_layers,
        "num_attention_heads": architecture.num_heads,
        "num_key_value_heads": architecture.num_kv_heads,
        "tie_word_embeddings": architecture.tie_embeddings,
        "max_position_embeddings": architecture.max_position_embeddings,
    }
    if architecture.head_dim is not None:
        shapes["head_dim"] = architecture.head_dim
    return Qwen2Config(**shapes) if architecture.qkv_bias else LlamaConfig(**shapes)


def build_model(workdir: Path, name: str, tiny: bool) -> Path:
    """A randomly initialised model directory with the offline tokenizer, usable as `model.uri`."""
    path = workdir / "model"
    tokenizer = build_tiny_tokenizer(path)
    architecture = catalogue_architecture(name)
    if tiny:
        architecture = dataclasses.replace(  # two layers, 64 wide: seconds on CPU
            architecture,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=None,
            max_position_embeddings=2048,
        )
    vocab_size = len(tokenizer) if tiny else architecture.vocab_size
    config = hf_config(architecture, vocab_size)
    for token in ("pad", "bos", "eos"):
        setattr(config, f"{token}_token_id", getattr(tokenizer, f"{token}_token_id"))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # type: ignore[no-untyped-call]
    model.save_pretrained(path)
    return path


def write_data(path: Path, records: int) -> Path:
    """Plain text records, long enough that packing fills every block."""
    sentences = corpus()
    lines = (
        json.dumps({"text": " ".join(sentences[(i + k) % len(sentences)] for k in range(24))})
        for i in range(records)
    )
    path.write_text("\n".join(lines) + "\n")
    return path


def job_document(method: Method, model: Path, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    on_gpu = torch.cuda.is_available()
    precision = "bf16" if on_gpu else "fp32"
    spec: dict[str, Any] = {"type": method.value}
    if method == Method.QLORA:
        spec["qlora"] = {"computeDtype": precision}
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / GIB if on_gpu else 80
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": f"bench-{method.value}"},
        "spec": {
            "model": {"uri": f"file://{model}"},
            "dataset": {
                "uri": str(data),
                "format": "text",
                "maxSeqLength": args.seq_len,
                "packing": METHODS[method].packing,  # prefix and prompt tuning cannot pack
            },
            "method": spec,
            "training": {
                "maxSteps": args.steps,
                "microBatchSize": args.micro_batch,
                "learningRate": LEARNING_RATES.get(method, 2e-4),
                "precision": precision,
                "gradientCheckpointing": args.gradient_checkpointing,
                "pureBf16": args.pure_bf16 and on_gpu,
                "useLigerKernel": args.liger_kernel,
                "loggingSteps": max(1, args.steps // 10),
            },
            "checkpointing": {"saveSteps": args.steps * 10},  # no checkpoint I/O inside the measurement
            "resources": {"gpuMemoryGiB": int(gpu_gib), "gpus": 1, "gpusPerNode": 1},
            "distributed": {"zeroStage": args.zero_stage},
            "output": {"uri": "/unused/replaced-by-output-dir"},
        },
    }


def run_method(method: Method, model: Path, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    workdir = args.workdir / method.value
    workdir.mkdir(parents=True, exist_ok=True)
    job = workdir / "job.yaml"
    job.write_text(yaml.safe_dump(job_document(method, model, data, args), sort_keys=False))
    code = ftctl(["train", "-f", str(job), "--nproc-per-node", "1", "--output-dir", str(workdir / "out")])
    if code != 0:
        return {"method": method.value, "exitCode": code}
    summary = json.loads((workdir / "out" / "training_summary.json").read_text())
    measured = row(summary)
    flops = flops_per_token(model, summary["totalParams"], summary["trainableParams"], args.seq_len)
    measured["mfu"] = mfu(measured["tokensPerSecond"], flops)
    if args.baseline:
        settings = {
            k: getattr(args, k) for k in ("steps", "seq_len", "micro_batch", "gradient_checkpointing")
        }
        hf = run_baseline(method, model, data, settings, args.workdir)
        measured |= {
            "hfTokensPerSecond": hf["tokensPerSecond"],
            "speedupOverHf": round(measured["tokensPerSecond"] / hf["tokensPerSecond"], 3),
            "hfMfu": mfu(hf["tokensPerSecond"], flops),
            "hfPeakReservedGiB": hf["peakReservedGiB"],
        }
    return measured


def flops_per_token(model: Path, total: int, trainable: int, seq_len: int) -> float:
    """Training FLOPs per token of the saved model (see the module docstring)."""
    config = json.loads((model / "config.json").read_text())
    hidden, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
    matmul = total - int(config["vocab_size"]) * hidden  # the input embeddings are a lookup
    return 4.0 * matmul + 2 * trainable + 12 * layers * hidden * seq_len


def mfu(tokens_per_second: float, flops: float) -> float | None:
    """Model FLOPs utilisation on this machine's GPU; None on CPU or an unknown GPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    peak = next((value for key, value in PEAK_BF16_FLOPS.items() if key in name), None)
    return None if peak is None else round(tokens_per_second * flops / peak, 4)


def row(summary: dict[str, Any]) -> dict[str, Any]:
    """One method's measurement; `estimateError` is (estimate − reserved) / reserved, the planner's margin."""

    def gib(value: int | None) -> float | None:
        return None if value is None else round(value / GIB, 3)

    reserved, estimate = summary["peakGpuMemoryReservedBytes"], summary["estimatedPerGpuBytes"]
    return {
        "method": summary["method"],
        "exitCode": 0,
        "zeroStage": summary["zeroStage"],
        "trainableParams": summary["trainableParams"],
        "totalParams": summary["totalParams"],
        "tokensPerSecond": round(summary["tokensPerSecond"], 1),
        "peakAllocatedGiB": gib(summary["peakGpuMemoryAllocatedBytes"]),
        "peakReservedGiB": gib(reserved),
        "estimatedGiB": gib(estimate),
        "estimateError": None if not reserved else round((estimate - reserved) / reserved, 3),
        "finalLoss": summary["finalLoss"],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B", help="catalogue model whose shapes to build")
    parser.add_argument(
        "--methods", nargs="+", default=[m.value for m in Method], choices=[m.value for m in Method]
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--pure-bf16",
        action="store_true",
        help="training.pureBf16: bf16 weights, gradients and Adam moments (GPU only; the CPU runs fp32)",
    )
    parser.add_argument(
        "--liger-kernel",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="training.useLigerKernel (the API's default); --no-liger-kernel measures the plain loss",
    )
    parser.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train each method with a plain HF Trainer (bench/hf_baseline.py) for tokens/s",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="a two-layer model: a CPU smoke run of this script"
    )
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "bench-trainer")
    parser.add_argument("--write", type=Path, help="write the results here as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = build_model(args.workdir, args.model, args.tiny)
    records = args.steps * args.micro_batch * 2  # packed blocks to spare
    data = write_data(args.workdir / "train.jsonl", records)
    rows = [run_method(Method(name), model, data, args) for name in args.methods]
    result = {
        "command": shlex.join(
            ["python", "bench/trainer_methods.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "device": torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"cpu ({platform.processor()})",
        "torch": torch.__version__,
        "model": args.model + (" (tiny shapes)" if args.tiny else ""),
        "settings": {
            k: getattr(args, k)
            for k in (
                "steps",
                "seq_len",
                "micro_batch",
                "zero_stage",
                "gradient_checkpointing",
                "pure_bf16",
                "liger_kernel",
            )
        },
        "rows": rows,
    }
    text = json.dumps(result, indent=2) + "\n"
    if args.write:
        args.write.write_text(text)
    sys.stdout.write(text)
    return 0 if all(r["exitCode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
