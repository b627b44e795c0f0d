"""The default kube-scheduler: nothing to add (pods carry their GPU requests and node affinity)."""

from __future__ import annotations

from finetune_operator.api.models import FineTuneJob
from finetune_operator.core.gang import Gang


class DefaultScheduler:
    name = "default"

    def applies(self, job: FineTuneJob) -> bool:
        return True

    def refine(self, gang: Gang, job: FineTuneJob) -> Gang:
        return gang
