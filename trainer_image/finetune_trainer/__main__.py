"""`finetune-train --config trainer.yaml` (one worker, under `finetune-launch ... --no-python`): parse → run
the recipe → exit code.

Every failure leaves through `exit_codes.exit_code_for`, so the operator reads retry-or-fail from the
worker's status alone (see exit_codes.py for the table).
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sys
import traceback


def select_accelerator() -> str:
    """DeepSpeed picks its accelerator on first import: CPU when there is no GPU (gloo process group)."""
    import torch

    if "DS_ACCELERATOR" not in os.environ:
        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    return os.environ["DS_ACCELERATOR"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune-train", description=__doc__)
    parser.add_argument(
        "--config", required=True, help="trainer config (YAML or JSON) rendered by the operator"
    )
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
    )
    log = logging.getLogger("finetune_trainer")
    # `kill -USR1 <worker>` prints every thread's stack: the first thing to look at in a hung gang.
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    from finetune_operator.api.exit_codes import ExitCode
    from finetune_trainer.exit_codes import exit_code_for

    try:
        from finetune_trainer.config import load_config

        config = load_config(args.config)
        if select_accelerator() == "cpu":
            log.info("no CUDA device: training on CPU, gloo process group (DeepSpeed's CPU accelerator)")
        from finetune_trainer import recipe

        return int(recipe.run(config))
    except BaseException as exc:
        if isinstance(exc, SystemExit | KeyboardInterrupt):
            raise
        code = exit_code_for(exc)
        log.error("failed (%s, exit %d): %s", code.name, code, exc)
        write_termination_message(f"{code.name}: {exc}")
        if code != ExitCode.CONFIG_ERROR:  # a configuration error's one line says it all
            traceback.print_exc()
        return int(code if code != ExitCode.SUCCESS else ExitCode.RETRYABLE)


def write_termination_message(message: str) -> None:
    """The reason into the pod's termination message, so `kubectl get ftj` says why without logs.

    Only in a pod, where the kubelet made the file, and only the first failing rank's (every rank of a
    broken gang fails, most of them only because a peer went away). Kubernetes keeps 4 KiB of it."""
    from finetune_operator.api.trainer import TERMINATION_MESSAGE_PATH

    try:  # never created here: outside a pod the file does not exist
        fd = os.open(TERMINATION_MESSAGE_PATH, os.O_WRONLY | os.O_APPEND)
    except OSError:
        return  # not in a pod (`ftctl train`), or not writable: the log line says it all
    with os.fdopen(fd, "w") as out:
        if os.fstat(fd).st_size == 0:
            out.write(" ".join(message.split())[:4000])


def exit_now(code: int) -> None:
    """Leave with `code` without the interpreter's teardown.

    By now the run's outputs, checkpoints and summary are on disk and the process group is destroyed.
    What teardown still does is destroy native objects, and one CI run saw it abort a worker that had
    finished (SIGABRT, "terminate called without an active exception" from a C++ thread), which torchrun
    reports as exit 134: a failed worker and a gang restart for a job that succeeded, or a retry for a
    config error. Skipping teardown keeps the code the run chose."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cli() -> None:
    """The `finetune-train` command."""
    exit_now(main())


if __name__ == "__main__":
    cli()
