"""Scheduling plug-ins through one suite: each refines the gang without mutating it or its identity, and
they compose (Kueue admits, Coscheduling places)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from operator_fixtures import OPTIONS, UID, job, ref
from pydantic import ValidationError

from finetune_operator.api.enums import GangScheduling
from finetune_operator.api.models import FineTuneJob
from finetune_operator.core import names
from finetune_operator.core.desire import Desired, desire
from finetune_operator.core.gang import Gang, build_gang
from finetune_operator.core.plan import plan
from finetune_operator.scheduling import REGISTRY, SchedulingOptions, plugins_for, refiner_for
from finetune_operator.scheduling.coscheduling import POD_GROUP_LABEL
from finetune_operator.settings import from_env

QUEUED = {"runPolicy": {"queueName": "team-a-queue"}}
COSCHEDULED = {"runPolicy": {"gangScheduling": "coscheduling"}}
NO_OPTIONS = SchedulingOptions()
BY_DEFAULT = SchedulingOptions(gang_scheduling=GangScheduling.COSCHEDULING)


def gang_of(the_job: FineTuneJob, attempt: int = 0) -> Gang:
    return build_gang(the_job, ref(), plan(the_job.spec), OPTIONS, attempt)


def desired(the_job: FineTuneJob, options: SchedulingOptions = NO_OPTIONS, attempt: int = 2) -> Desired:
    result = desire(the_job, ref(), OPTIONS, attempt=attempt, refine=refiner_for(the_job, options))
    assert isinstance(result, Desired), result
    return result


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_plugin_refines_without_mutating_or_renaming(name: str) -> None:
    plugin = REGISTRY[name]
    the_job = job(runPolicy={"queueName": "team-a-queue", "gangScheduling": "coscheduling"})
    gang = gang_of(the_job)
    before = replace(gang)
    refined = plugin.refine(gang, the_job, SchedulingOptions())
    assert gang == before
    assert (refined.job, refined.nodes, refined.attempt, refined.config_data) == (
        gang.job,
        gang.nodes,
        gang.attempt,
        gang.config_data,
    )
    assert set(gang.labels) <= set(refined.labels)


@pytest.mark.parametrize(
    ("updates", "options", "expected"),
    [
        ({}, SchedulingOptions(), []),
        (QUEUED, SchedulingOptions(), ["kueue"]),
        (COSCHEDULED, SchedulingOptions(), ["coscheduling"]),
        ({}, BY_DEFAULT, ["coscheduling"]),
        ({"runPolicy": {"gangScheduling": "none"}}, BY_DEFAULT, []),  # the job opts out of the default
        (
            {"runPolicy": {"queueName": "q", "gangScheduling": "coscheduling"}},
            SchedulingOptions(),
            ["kueue", "coscheduling"],
        ),
    ],
)
def test_the_job_and_the_operator_pick_the_plugins(
    updates: dict[str, object], options: SchedulingOptions, expected: list[str]
) -> None:
    assert [p.name for p in plugins_for(job(**updates), options)] == expected


def test_kueue_pods_form_one_pod_group_per_attempt() -> None:
    the_job = job(**QUEUED)
    result = desired(the_job)
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
    assert result.companions == ()


def test_a_coscheduled_attempt_is_one_pod_group_of_the_whole_gang_owned_by_the_job() -> None:
    the_job = job(runPolicy={"gangScheduling": "coscheduling", "scheduleTimeoutSeconds": 120})
    result = desired(the_job)
    group = f"tiny-{UID[:5]}-2"
    (pod_group,) = result.companions
    assert pod_group["apiVersion"] == "scheduling.x-k8s.io/v1alpha1" and pod_group["kind"] == "PodGroup"
    assert pod_group["metadata"]["name"] == group
    assert pod_group["metadata"]["namespace"] == ref().namespace
    (owner,) = pod_group["metadata"]["ownerReferences"]
    assert (owner["uid"], owner["controller"]) == (UID, True)
    assert pod_group["spec"] == {"minMember": len(result.pods), "scheduleTimeoutSeconds": 120}
    assert len(result.pods) == 2
    for pod in result.pods:
        assert pod["metadata"]["labels"][POD_GROUP_LABEL] == group
        assert pod["spec"]["schedulerName"] == "scheduler-plugins-scheduler"
    # the next attempt is a new group: a restarted gang never joins a finished one
    assert desired(the_job, attempt=3).companions[0]["metadata"]["name"] == f"tiny-{UID[:5]}-3"


def test_a_job_naming_its_scheduler_keeps_it_and_the_operator_names_its_own() -> None:
    own = desired(job(schedulerName="team-coscheduler", **COSCHEDULED))
    assert {p["spec"]["schedulerName"] for p in own.pods} == {"team-coscheduler"}
    named = desired(job(), SchedulingOptions(GangScheduling.COSCHEDULING, "gang-scheduler"))
    assert {p["spec"]["schedulerName"] for p in named.pods} == {"gang-scheduler"}
    assert "scheduleTimeoutSeconds" not in named.companions[0]["spec"]  # the scheduler's default


def test_kueue_and_coscheduling_compose_on_one_group_name() -> None:
    result = desired(job(runPolicy={"queueName": "q", "gangScheduling": "coscheduling"}))
    (pod_group,) = result.companions
    for pod in result.pods:
        labels = pod["metadata"]["labels"]
        assert labels["kueue.x-k8s.io/pod-group-name"] == labels[POD_GROUP_LABEL]
        assert labels[POD_GROUP_LABEL] == pod_group["metadata"]["name"]


def test_a_schedule_timeout_without_coscheduling_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"runPolicy.scheduleTimeoutSeconds"):
        job(runPolicy={"gangScheduling": "none", "scheduleTimeoutSeconds": 30})


def test_pod_group_names_are_label_values_for_long_job_names() -> None:
    gang = replace(gang_of(job()), job=replace(ref(), name="x" * 253), attempt=9999)
    assert len(gang.group_name) <= 63


def test_a_job_asking_for_nothing_is_rendered_as_built() -> None:
    the_job = job()
    gang = gang_of(the_job)
    assert refiner_for(the_job, NO_OPTIONS)(gang) == gang


def test_the_operator_default_comes_from_its_settings() -> None:
    settings = from_env({"FINETUNE_SCHEDULING_GANG_SCHEDULING": "coscheduling"})
    assert settings.scheduling_options() == BY_DEFAULT
    with pytest.raises(ValueError, match="gang_scheduling must be one of none, coscheduling"):
        from_env({"FINETUNE_SCHEDULING_GANG_SCHEDULING": "volcano"})
