"""scheduler-plugins' Coscheduling: each gang attempt is one PodGroup, placed all or nothing.

The Coscheduling plugin (sigs.k8s.io/scheduler-plugins, in a kube-scheduler of its own beside the default
one) holds every pod labelled `scheduling.x-k8s.io/pod-group: <group>` in Permit, without binding it, until
`minMember` of the group's pods have found a node; if they do not within the group's timeout it releases
them all and retries the group later. So a gang that cannot fully place holds no GPUs, where the default
scheduler would bind the workers that fit and leave them idle until the rendezvous times out. `minMember`
is the whole gang: one missing rank stops every other. Like Kueue's pod group, the PodGroup is per attempt
(`Gang.group_name`), so a restarted or resumed gang is a new group rather than the members of a finished
one; the job owns each (they go with it).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from finetune_operator.api.enums import GangScheduling
from finetune_operator.api.models import FineTuneJob
from finetune_operator.core.gang import Companion, Gang
from finetune_operator.scheduling.options import SchedulingOptions

GROUP, VERSION, PLURAL, KIND = "scheduling.x-k8s.io", "v1alpha1", "podgroups", "PodGroup"
POD_GROUP_LABEL = f"{GROUP}/pod-group"


class Coscheduling:
    name = "coscheduling"

    def applies(self, job: FineTuneJob, options: SchedulingOptions) -> bool:
        chosen = job.spec.run_policy.gang_scheduling or options.gang_scheduling
        return chosen == GangScheduling.COSCHEDULING

    def refine(self, gang: Gang, job: FineTuneJob, options: SchedulingOptions) -> Gang:
        spec: dict[str, Any] = {"minMember": gang.nodes}
        timeout = job.spec.run_policy.schedule_timeout_seconds
        if timeout is not None:
            spec["scheduleTimeoutSeconds"] = timeout
        group = Companion(f"{GROUP}/{VERSION}", KIND, gang.group_name, spec)
        return replace(
            gang,
            # A job naming its own scheduler runs its own Coscheduling instance; otherwise the operator's.
            scheduler_name=gang.scheduler_name or options.coscheduling_scheduler_name,
            labels={**gang.labels, POD_GROUP_LABEL: gang.group_name},
            companions=(*gang.companions, group),
        )
