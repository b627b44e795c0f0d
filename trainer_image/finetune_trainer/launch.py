"""`finetune-launch [torchrun options] --no-python finetune-train --config …`: torchrun that keeps exit codes.

torchrun itself exits 1 whatever its workers exited with, which would hide the difference between a
configuration error (78, never retry) and a preemption (75, retry). This wrapper runs torchrun's own
`run` and exits with the first failed worker's code; when the agent is itself signalled (SIGTERM on
the pod), the workers have been asked to checkpoint and the result is retryable. The pod command and
`ftctl train` both use it. Set `TORCH_ELASTIC_SHUTDOWN_TIMEOUT` (seconds) below the pod's termination
grace period so workers have time to save before torchrun escalates to SIGKILL.
"""

from __future__ import annotations

import os
import sys

from finetune_operator.api.exit_codes import ExitCode


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # Workers run as `--no-python` commands, so torchrun cannot add `python -u`: unbuffered output keeps
    # their log lines in order with the launcher's, and whole when a worker dies.
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    args = parse_args(argv if argv is not None else sys.argv[1:])  # type: ignore[no-untyped-call]
    try:
        run(args)  # type: ignore[no-untyped-call]
    except ChildFailedError as failed:
        _, failure = failed.get_first_failure()
        # A negative code is a signal death (-9: SIGKILL, e.g. the host OOM killer): report it as 128 + N.
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    except SignalException:
        return int(ExitCode.RETRYABLE)
    return int(ExitCode.SUCCESS)


if __name__ == "__main__":
    sys.exit(main())
