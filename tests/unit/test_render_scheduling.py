"""Scheduling plug-ins through one suite: each refines the gang without mutating it or its identity."""

from __future__ import annotations

from dataclasses import replace

import pytest
from operator_fixtures import OPTIONS, UID, job, ref

from finetune_operator.api.models import FineTuneJob
from finetune_operator.core import names
from finetune_operator.core.desire import Desired, desire
from finetune_operator.core.gang import Gang, build_gang
from finetune_operator.core.plan import plan
from finetune_operator.scheduling import REGISTRY, plugin_for, refiner_for
from finetune_operator.scheduling.kueue import pod_group_name

QUEUED = {"runPolicy": {"queueName": "team-a-queue"}}


def gang_of(the_job: FineTuneJob, attempt: int = 0) -> Gang:
    return build_gang(the_job, ref(), plan(the_job.spec), OPTIONS, attempt)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_plugin_refines_without_mutating_or_renaming(name: str) -> None:
    plugin = REGISTRY[name]
    the_job = job(**QUEUED)
    gang = gang_of(the_job)
    before = replace(gang)
    refined = plugin.refine(gang, the_job)
    assert gang == before
    assert (refined.job, refined.nodes, refined.attempt, refined.config_data) == (
        gang.job,
        gang.nodes,
        gang.attempt,
        gang.config_data,
    )
    assert set(gang.labels) <= set(refined.labels)


@pytest.mark.parametrize(("updates", "expected"), [({}, "default"), (QUEUED, "kueue")])
def test_the_job_picks_its_plugin(updates: dict[str, object], expected: str) -> None:
    assert plugin_for(job(**updates)).name == expected


def test_kueue_pods_form_one_pod_group_per_attempt() -> None:
    the_job = job(**QUEUED)
    result = desire(the_job, ref(), OPTIONS, attempt=2, refine=refiner_for(the_job))
    assert isinstance(result, Desired)
    group = f"tiny-{UID[:5]}-2"
    for pod in result.pods:
        labels, annotations = pod["metadata"]["labels"], pod["metadata"]["annotations"]
        assert labels["kueue.x-k8s.io/queue-name"] == "team-a-queue"
        assert labels["kueue.x-k8s.io/pod-group-name"] == group
        assert annotations["kueue.x-k8s.io/pod-group-total-count"] == "2"
        assert annotations["kueue.x-k8s.io/retriable-in-group"] == "false"
        assert labels[names.LABEL_JOB_NAME] == "tiny"
    plain = desire(the_job, ref(), OPTIONS, attempt=2)
    assert isinstance(plain, Desired)
    assert result.template_hash == plain.template_hash  # queue bookkeeping is not a spec change


def test_pod_group_names_are_label_values_for_long_job_names() -> None:
    gang = replace(gang_of(job()), job=replace(ref(), name="x" * 253), attempt=9999)
    assert len(pod_group_name(gang)) <= 63


def test_default_scheduler_adds_nothing() -> None:
    the_job = job()
    gang = gang_of(the_job)
    assert REGISTRY["default"].refine(gang, the_job) == gang
