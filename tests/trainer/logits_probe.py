"""Run the recipe under torchrun, then record the in-memory model's logits on a fixed input.

Used by test_training: the saved adapter, reloaded with PEFT in the test, must give these logits, which
proves the save gathered the ZeRO-3 partitions of exactly the weights that trained.
Usage: python -m finetune_trainer.launch --nproc_per_node 2 logits_probe.py trainer.yaml
"""

from __future__ import annotations

import faulthandler
import signal
import sys
from pathlib import Path

import torch

from finetune_trainer.__main__ import select_accelerator
from finetune_trainer.config import load_config


def main() -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    config = load_config(sys.argv[1])
    select_accelerator()
    from finetune_trainer import recipe

    session = recipe.setup(config, recipe.Preemption())
    assert recipe.train(session)
    recipe.save(session)
    input_ids = torch.tensor([[5, 17, 42, 99, 123, 7, 64, 200]])
    session.model.eval()
    with torch.no_grad():  # every rank runs it: ZeRO-3 gathers the partitions collectively
        logits = session.model(input_ids=input_ids).logits
    if session.args.should_save:
        torch.save({"input_ids": input_ids, "logits": logits}, Path(config.paths.output) / "probe.pt")
    recipe.cleanup()


if __name__ == "__main__":
    main()
