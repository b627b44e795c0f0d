"""`python -m finetune_trainer.export ADAPTER --output DIR [--base MODEL]`, which `ftctl export` runs: merge
a trained adapter (LoRA, DoRA, QLoRA's LoRA) into its base model and save a plain model that loads
without PEFT, with the tokenizer, ready for vLLM or `from_pretrained`. The job's own `output.saveMerged`
does the same at the end of training.

The base is loaded unquantized (a 4-bit base cannot absorb the update exactly): by default the model the
adapter records (`base_model_name_or_path` in adapter_config.json); `--base` when that path was the
pod's and the model is elsewhere here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from finetune_trainer.exit_codes import ConfigurationError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def merge(base: str, adapter: Path, output: Path, dtype: torch.dtype, num_labels: int | None = None) -> None:
    """Base + adapter → a merged model in `output` (no tokenizer: the caller has the right one)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    loader: Any = AutoModelForSequenceClassification if num_labels else AutoModelForCausalLM
    kwargs: dict[str, Any] = {"dtype": dtype, **({"num_labels": num_labels} if num_labels else {})}
    model = loader.from_pretrained(base, **kwargs)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(output))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ftctl export", description=__doc__)
    parser.add_argument("adapter", type=Path, help="the job's output directory (adapter_config.json)")
    parser.add_argument("--output", type=Path, required=True, help="where the merged model goes")
    parser.add_argument(
        "--base", help="the base model (a directory or hub id); default: the adapter's record"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the merged weights")
    parser.add_argument("--num-labels", type=int, help="classification adapters: the number of labels")
    args = parser.parse_args(argv)
    try:
        config_file = args.adapter / "adapter_config.json"
        if not config_file.is_file():
            raise ConfigurationError(f"{args.adapter} is not an adapter (no adapter_config.json)")
        recorded = json.loads(config_file.read_text())
        base = args.base or recorded.get("base_model_name_or_path")
        if not base or (base.startswith("/") and not Path(base).is_dir()):
            raise ConfigurationError(f"the base model {base!r} the adapter records is not here: pass --base")
        num_labels = args.num_labels if recorded.get("task_type") == "SEQ_CLS" else None
        merge(base, args.adapter, args.output, DTYPES[args.dtype], num_labels)
        from transformers import AutoTokenizer

        has_tokenizer = (args.adapter / "tokenizer_config.json").is_file()
        AutoTokenizer.from_pretrained(str(args.adapter) if has_tokenizer else base).save_pretrained(
            str(args.output)
        )
    except (ConfigurationError, OSError, ValueError) as exc:
        print(f"ftctl export: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    print(f"ftctl export: merged {args.adapter} into {base}: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
