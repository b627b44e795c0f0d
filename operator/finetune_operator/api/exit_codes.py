"""What a worker's exit status means: the one table the trainer exits by and the operator decides from.

The numbers come from BSD sysexits(3) where one fits, so they never collide with a Python traceback (1),
a shell usage error (2), or a signal death (128 + N, e.g. 137 for SIGKILL by the OOM killer):

| code | name            | meaning                                              | operator            |
|------|-----------------|------------------------------------------------------|---------------------|
| 0    | SUCCESS         | trained and saved                                    | Succeeded           |
| 75   | RETRYABLE       | preempted/suspended (SIGTERM, checkpoint saved) or a | restart the gang,   |
|      |                 | transient failure (network, storage, NCCL)           | counts to backoff   |
| 78   | CONFIG_ERROR    | bad trainer config, bad data, unsupported method ×   | Failed, permanent   |
|      |                 | ZeRO combination, a package the image lacks (e.g.    |                     |
|      |                 | flash-attn), a model or data set the hub refuses     |                     |
|      |                 | (404, 401, gated): retrying cannot help              |                     |
| 79   | OUT_OF_MEMORY   | torch.OutOfMemoryError: the plan under-estimated     | Failed with a hint  |
|      |                 |                                                      | (re-plan, more GPUs)|

Any other non-zero status (1, 128+N) is an unexpected crash; the operator treats it as retryable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from types import MappingProxyType


class ExitCode(IntEnum):
    SUCCESS = 0
    #: EX_TEMPFAIL: try again later; a checkpoint was written when the cause was a signal.
    RETRYABLE = 75
    #: EX_CONFIG: the job as written cannot run.
    CONFIG_ERROR = 78
    #: Not in sysexits; the next free number. Retrying the same plan would fail the same way.
    OUT_OF_MEMORY = 79


@dataclass(frozen=True)
class ExitMeaning:
    """One row of the table: the condition reason it reads as, and whether a restart can help."""

    reason: str
    meaning: str
    retryable: bool


EXIT_CODES: Mapping[ExitCode, ExitMeaning] = MappingProxyType(
    {
        ExitCode.SUCCESS: ExitMeaning("Succeeded", "trained and saved", retryable=False),
        ExitCode.RETRYABLE: ExitMeaning(
            "Retryable", "preempted (checkpoint saved) or a transient failure", retryable=True
        ),
        ExitCode.CONFIG_ERROR: ExitMeaning(
            "ConfigError",
            "the job as written cannot run (config, data, method × ZeRO, a missing package, a model the hub "
            "refuses)",
            retryable=False,
        ),
        ExitCode.OUT_OF_MEMORY: ExitMeaning(
            "OutOfMemory", "the GPU ran out of memory: the plan under-estimated", retryable=False
        ),
    }
)

#: Failures that the same spec would repeat: the operator fails the job instead of restarting the gang.
PERMANENT_EXIT_CODES = frozenset(
    code for code, row in EXIT_CODES.items() if code != ExitCode.SUCCESS and not row.retryable
)


def is_retryable(code: int) -> bool:
    """Whether the operator should restart the gang after a worker exited with `code`; unknown codes
    (tracebacks, signal deaths) are crashes, which a restart may cure."""
    return code != ExitCode.SUCCESS and code not in PERMANENT_EXIT_CODES


def describe(code: int) -> str:
    """A short reason for a status condition, e.g. `ConfigError`; unknown codes read as crashes."""
    if code >= 128:
        return f"KilledBySignal{code - 128}"
    try:
        return EXIT_CODES[ExitCode(code)].reason
    except ValueError:
        return f"Crashed{code}"
