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


#: What the Hugging Face hub answers for a model or data set this job cannot have, whatever the retry: a
#: misspelled or private repository (404, or 401 without a token), a gated one without access (403), a
#: revision or file that does not exist. transformers re-raises them as OSError `from` the hub's error.
HUB_PERMANENT_ERRORS = frozenset(
    {
        "RepositoryNotFoundError",
        "GatedRepoError",
        "DisabledRepoError",
        "RevisionNotFoundError",
        "EntryNotFoundError",
        "RemoteEntryNotFoundError",
        "DatasetNotFoundError",
    }
)
#: HTTP answers of the hub that a retry gets again (bad token, no access, not there); 429 and 5xx pass.
HUB_PERMANENT_STATUS = frozenset({401, 403, 404})
#: The packages those errors come from (a class of the same name elsewhere means something else).
HUB_MODULES = frozenset({"huggingface_hub", "datasets"})


def _causes(error: BaseException) -> list[BaseException]:
    """The error and what it was raised from or during, outermost first (cycles cut)."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _hub_refused(error: BaseException) -> bool:
    """The hub said no. By the error's own class name: the hub's LocalEntryNotFoundError (no network and
    nothing cached, which a retry may cure) is a subclass of EntryNotFoundError."""
    names = {cls.__name__ for cls in type(error).__mro__ if cls.__module__.split(".")[0] in HUB_MODULES}
    if type(error).__name__ in HUB_PERMANENT_ERRORS and names:
        return True
    response = getattr(error, "response", None)
    return "HfHubHTTPError" in names and getattr(response, "status_code", None) in HUB_PERMANENT_STATUS


def exit_code_for(error: BaseException) -> ExitCode:
    """Map an exception escaping the recipe to the worker's exit status.

    Checked by class name for torch's OOM, the data package's DataError and the hub's errors, so this
    module imports neither torch, the hub client nor the data stack before a worker has anything to report.
    """
    from pydantic import ValidationError
    from yaml import YAMLError

    for cls in type(error).__mro__:
        if cls.__name__ == "OutOfMemoryError" and cls.__module__.startswith("torch"):
            return ExitCode.OUT_OF_MEMORY
    if any(_hub_refused(cause) for cause in _causes(error)):
        return ExitCode.CONFIG_ERROR
    # A package the image lacks (flash-attn for attention flash_attention_2, a model's remote code's
    # imports): the same image fails the same way on every restart.
    if isinstance(error, ConfigurationError | ValidationError | YAMLError | ImportError):
        return ExitCode.CONFIG_ERROR
    # The data package raises DataError(ValueError) for unreadable or malformed data: permanent.
    if type(error).__name__ == "DataError":
        return ExitCode.CONFIG_ERROR
    return ExitCode.RETRYABLE
