"""What a worker's exit status means, so the operator can decide between retry and fail without logs.

The numbers come from BSD sysexits(3) where one fits, so they never collide with a Python traceback (1),
a shell usage error (2), or a signal death (128 + N, e.g. 137 for SIGKILL by the OOM killer):

| code | name            | meaning                                              | operator            |
|------|-----------------|------------------------------------------------------|---------------------|
| 0    | SUCCESS         | trained and saved                                    | Succeeded           |
| 75   | RETRYABLE       | preempted/suspended (SIGTERM, checkpoint saved) or a | restart the gang,   |
|      |                 | transient failure (network, storage, NCCL)           | counts to backoff   |
| 78   | CONFIG_ERROR    | bad trainer config, bad data, unsupported method ×   | Failed, permanent   |
|      |                 | ZeRO combination: retrying cannot help               |                     |
| 79   | OUT_OF_MEMORY   | torch.OutOfMemoryError: the plan under-estimated     | Failed with a hint  |
|      |                 |                                                      | (re-plan, more GPUs)|

Any other non-zero status (1, 128+N) is an unexpected crash; the operator treats it as retryable.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    SUCCESS = 0
    #: EX_TEMPFAIL: try again later; a checkpoint was written when the cause was a signal.
    RETRYABLE = 75
    #: EX_CONFIG: the job as written cannot run.
    CONFIG_ERROR = 78
    #: Not in sysexits; the next free number. Retrying the same plan would fail the same way.
    OUT_OF_MEMORY = 79


class ConfigurationError(ValueError):
    """The job cannot run as configured (bad config, bad data, unsupported combination); never retried."""


class PreemptedError(RuntimeError):
    """SIGTERM arrived (preemption, suspend, eviction); a checkpoint was saved and the run can resume."""


def is_retryable(code: int) -> bool:
    """Whether the operator should restart the gang after a worker exited with `code`.

    Configuration errors and out-of-memory are permanent: the same config fails the same way again.
    """
    return code not in (ExitCode.SUCCESS, ExitCode.CONFIG_ERROR, ExitCode.OUT_OF_MEMORY)


def describe(code: int) -> str:
    """A short reason for a status condition, e.g. `ConfigError`; unknown codes read as crashes."""
    if code >= 128:
        return f"KilledBySignal{code - 128}"
    try:
        return {
            ExitCode.SUCCESS: "Succeeded",
            ExitCode.RETRYABLE: "Retryable",
            ExitCode.CONFIG_ERROR: "ConfigError",
            ExitCode.OUT_OF_MEMORY: "OutOfMemory",
        }[ExitCode(code)]
    except ValueError:
        return f"Crashed{code}"


def exit_code_for(error: BaseException) -> ExitCode:
    """Map an exception escaping the recipe to the worker's exit status.

    Checked by class name for torch's OOM so this module stays importable without torch (the operator
    imports it to interpret exit codes).
    """
    from pydantic import ValidationError
    from yaml import YAMLError

    for cls in type(error).__mro__:
        if cls.__name__ == "OutOfMemoryError" and cls.__module__.startswith("torch"):
            return ExitCode.OUT_OF_MEMORY
    if isinstance(error, ConfigurationError | ValidationError | YAMLError):
        return ExitCode.CONFIG_ERROR
    # The data package raises DataError(ValueError) for unreadable or malformed data: permanent.
    if type(error).__name__ == "DataError":
        return ExitCode.CONFIG_ERROR
    return ExitCode.RETRYABLE
