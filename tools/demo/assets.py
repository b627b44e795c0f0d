"""Write the demo's tiny model and data set where the local cluster's volumes are (nothing downloads).

    python tools/demo/assets.py DIR        -> DIR/models/tiny-llama/, DIR/datasets/sentences.jsonl
    python tools/demo/assets.py --generate OUTPUT_DIR MODEL_DIR "prompt"

The model is the trainer tests' tiny Llama (tests/trainer/tiny_models.py: 2 layers, hidden 64, a
512-token tokenizer trained here) and the data their four sentences: a LoRA adapter learns them in a few
dozen CPU steps, so the loss visibly falls and the adapter completes a sentence the base model cannot.
Files are made readable and the output directory writable by the trainer image's user (UID 10001).
`--generate` loads the base model with the adapter the job saved and completes a prompt with it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

TRAINER_UID = 10001


def write(root: Path) -> None:
    from trainer.tiny_models import build_tiny_llama, write_text_data
    from trainer.tokenizer import build_tiny_tokenizer

    models, datasets = root / "models", root / "datasets"
    for path in (models, datasets):
        path.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = root / "tokenizer"
    build_tiny_tokenizer(tokenizer_dir)
    build_tiny_llama(models / "tiny-llama", tokenizer_dir)
    write_text_data(datasets / "sentences.jsonl", repeats=64)
    for dirpath, _, files in os.walk(root):
        os.chown(dirpath, TRAINER_UID, TRAINER_UID)
        for name in files:
            os.chown(os.path.join(dirpath, name), TRAINER_UID, TRAINER_UID)
    print(f"wrote {models / 'tiny-llama'} and {datasets / 'sentences.jsonl'}")


def generate(adapter: Path, model: Path, prompt: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    base = AutoModelForCausalLM.from_pretrained(model)
    tuned = PeftModel.from_pretrained(base, adapter)
    inputs = tokenizer(prompt, return_tensors="pt")
    inputs.pop("token_type_ids", None)
    with torch.no_grad():
        out = tuned.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    print(tokenizer.decode(out[0], skip_special_tokens=True))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dir", type=Path, help="where the volumes are (or, with --generate, the adapter)")
    parser.add_argument("--generate", nargs=2, metavar=("MODEL_DIR", "PROMPT"), help="complete PROMPT")
    opts = parser.parse_args()
    if opts.generate:
        generate(opts.dir, Path(opts.generate[0]), opts.generate[1])
    else:
        write(opts.dir)


if __name__ == "__main__":
    main()
