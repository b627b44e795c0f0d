"""Gang-scheduling plug-ins: each refines the worker gang (`core.gang.Gang`) for one scheduler.

One protocol, one explicit registry (no registration as an import side effect). A plug-in is pure: it
adds labels, annotations or other fields to the IR and never reads the cluster. Which one applies is a
property of the job: `runPolicy.queueName` asks for Kueue, anything else runs on the default scheduler.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from finetune_operator.api.models import FineTuneJob
from finetune_operator.core.gang import Gang, Refine
from finetune_operator.scheduling.kueue import Kueue
from finetune_operator.scheduling.none import DefaultScheduler


class SchedulingPlugin(Protocol):
    """Refines the gang for one scheduler."""

    name: str

    def applies(self, job: FineTuneJob) -> bool:
        """Whether the job asks for this scheduler."""
        ...

    def refine(self, gang: Gang, job: FineTuneJob) -> Gang:
        """The gang with what this scheduler needs added; never mutates its input."""
        ...


#: In order of precedence: the first plug-in that applies to a job wins; the default always applies.
REGISTRY: Mapping[str, SchedulingPlugin] = {"kueue": Kueue(), "default": DefaultScheduler()}


def plugin_for(job: FineTuneJob) -> SchedulingPlugin:
    return next(plugin for plugin in REGISTRY.values() if plugin.applies(job))


def refiner_for(job: FineTuneJob) -> Refine:
    """The refinement `core.desire.desire` applies to this job's gang."""
    plugin = plugin_for(job)

    def refine(gang: Gang) -> Gang:
        return plugin.refine(gang, job)

    return refine
