"""The operator-wide scheduling defaults a job's runPolicy can override (from settings)."""

from __future__ import annotations

from dataclasses import dataclass

from finetune_operator.api.enums import GangScheduling

#: The schedulerName scheduler-plugins' own chart gives the kube-scheduler it installs beside the default
#: one ("as a second scheduler"), whose profile runs Coscheduling.
SCHEDULER_NAME = "scheduler-plugins-scheduler"


@dataclass(frozen=True)
class SchedulingOptions:
    #: For jobs whose runPolicy.gangScheduling is unset.
    gang_scheduling: GangScheduling = GangScheduling.NONE
    #: The schedulerName coscheduled workers name, unless the job's spec.schedulerName names another.
    coscheduling_scheduler_name: str = SCHEDULER_NAME
