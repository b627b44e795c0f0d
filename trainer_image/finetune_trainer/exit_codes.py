"""How the trainer leaves: exceptions escaping the recipe mapped to the exit-code table.

The table itself (codes, meanings, retryable or not) is the operator-trainer contract and lives in
`finetune_operator.api.exit_codes`; this module holds only the trainer's side: the exceptions it raises
and which code each one means.
"""

from __future__ import annotations

from finetune_operator.api.exit_codes import ExitCode


class ConfigurationError(ValueError):
    """The job cannot run as configured (bad config, bad data, unsupported combination); never retried."""


class PreemptedError(RuntimeError):
    """SIGTERM arrived (preemption, suspend, eviction); a checkpoint was saved and the run can resume."""


def exit_code_for(error: BaseException) -> ExitCode:
    """Map an exception escaping the recipe to the worker's exit status.

    Checked by class name for torch's OOM and the data package's DataError, so this module imports
    neither torch nor the data stack before a worker has anything to report.
    """
    from pydantic import ValidationError
    from yaml import YAMLError

    for cls in type(error).__mro__:
        if cls.__name__ == "OutOfMemoryError" and cls.__module__.startswith("torch"):
            return ExitCode.OUT_OF_MEMORY
    # A package the image lacks (flash-attn for attention flash_attention_2, a model's remote code's
    # imports): the same image fails the same way on every restart.
    if isinstance(error, ConfigurationError | ValidationError | YAMLError | ImportError):
        return ExitCode.CONFIG_ERROR
    # The data package raises DataError(ValueError) for unreadable or malformed data: permanent.
    if type(error).__name__ == "DataError":
        return ExitCode.CONFIG_ERROR
    return ExitCode.RETRYABLE
