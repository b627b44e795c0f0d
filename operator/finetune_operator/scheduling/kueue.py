"""Kueue's plain-pod integration, with each gang attempt admitted as one pod group.

Kueue (integration `pod`) gates every pod carrying `kueue.x-k8s.io/queue-name` and admits a group as
one Workload once it has seen `kueue.x-k8s.io/pod-group-total-count` pods with the same
`kueue.x-k8s.io/pod-group-name` label (KEP-976, "Groups of Pods created beforehand"). The operator
replaces a failed gang whole, so each attempt is its own group (the name carries the attempt), and
every pod says `kueue.x-k8s.io/retriable-in-group: "false"`: once a worker of an attempt fails and the
others are deleted, Kueue finishes that Workload and releases its quota during the backoff, and the
next attempt queues afresh instead of waiting for replacements Kueue would expect under the old name.
"""

from __future__ import annotations

from dataclasses import replace

from finetune_operator.api.models import FineTuneJob
from finetune_operator.core.gang import Gang
from finetune_operator.scheduling.options import SchedulingOptions

QUEUE_NAME = "kueue.x-k8s.io/queue-name"
POD_GROUP_NAME = "kueue.x-k8s.io/pod-group-name"
POD_GROUP_TOTAL_COUNT = "kueue.x-k8s.io/pod-group-total-count"
RETRIABLE_IN_GROUP = "kueue.x-k8s.io/retriable-in-group"


class Kueue:
    name = "kueue"

    def applies(self, job: FineTuneJob, options: SchedulingOptions) -> bool:
        return job.spec.run_policy.queue_name is not None

    def refine(self, gang: Gang, job: FineTuneJob, options: SchedulingOptions) -> Gang:
        queue = job.spec.run_policy.queue_name
        assert queue is not None, "Kueue.refine is only called for jobs it applies to"
        return replace(
            gang,
            labels={**gang.labels, QUEUE_NAME: queue, POD_GROUP_NAME: gang.group_name},
            annotations={
                **gang.annotations,
                POD_GROUP_TOTAL_COUNT: str(gang.nodes),
                RETRIABLE_IN_GROUP: "false",
            },
        )
