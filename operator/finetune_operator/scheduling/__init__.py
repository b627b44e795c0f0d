"""Gang-scheduling plug-ins: each refines the worker gang (`core.gang.Gang`) for one scheduler.

One protocol, one explicit registry (no registration as an import side effect). A plug-in is pure: it
adds labels, annotations, a scheduler name or companion objects to the IR and never reads the cluster.
Which apply is a property of the job and the operator's defaults (`SchedulingOptions`), and they
compose: `runPolicy.queueName` asks Kueue to admit the gang's quota, `gangScheduling: coscheduling` (or
the operator's default) asks scheduler-plugins' Coscheduling to place it all or nothing; a job asking for
neither runs on the default scheduler as rendered.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from finetune_operator.api.models import FineTuneJob
from finetune_operator.core.gang import Gang, Refine
from finetune_operator.scheduling.coscheduling import Coscheduling
from finetune_operator.scheduling.kueue import Kueue
from finetune_operator.scheduling.options import SchedulingOptions


class SchedulingPlugin(Protocol):
    """Refines the gang for one scheduler."""

    name: str

    def applies(self, job: FineTuneJob, options: SchedulingOptions) -> bool:
        """Whether the job (or, where it does not say, the operator) asks for this scheduler."""
        ...

    def refine(self, gang: Gang, job: FineTuneJob, options: SchedulingOptions) -> Gang:
        """The gang with what this scheduler needs added; never mutates its input."""
        ...


#: Applied in this order, each that applies to a job over the previous one's gang.
REGISTRY: Mapping[str, SchedulingPlugin] = {"kueue": Kueue(), "coscheduling": Coscheduling()}


def plugins_for(job: FineTuneJob, options: SchedulingOptions) -> tuple[SchedulingPlugin, ...]:
    return tuple(plugin for plugin in REGISTRY.values() if plugin.applies(job, options))


def refiner_for(job: FineTuneJob, options: SchedulingOptions) -> Refine:
    """The refinement `core.desire.desire` applies to this job's gang, under the operator's scheduling
    settings (required: a default here would silently ignore the cluster's configured gang scheduler)."""
    plugins = plugins_for(job, options)

    def refine(gang: Gang) -> Gang:
        for plugin in plugins:
            gang = plugin.refine(gang, job, options)
        return gang

    return refine


__all__ = ["REGISTRY", "SchedulingOptions", "SchedulingPlugin", "plugins_for", "refiner_for"]
