"""The real API server says what the Python twin says: every CEL rule's rejected example is refused at
apply with the rule's message, its accepted example is admitted, and a minimal job of every method is
admitted (server-side dry run: nothing is stored). The pure half is tests/contract/test_rules.py."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes.client import CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from contract.rule_examples import (
    EXAMPLES,
    Edit,
    applied,
    crd_rules,
    is_update_rule,
    minimal_job,
    minimal_method_jobs,
)
from finetune_operator.api.models import GROUP, PLURAL, VERSION

from .conftest import Cluster

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def api(cluster: Cluster) -> CustomObjectsApi:
    return CustomObjectsApi(cluster.api_client)


def dry_run_create(api: CustomObjectsApi, document: dict[str, Any]) -> None:
    api.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, document, dry_run="All")


UPDATE_RULES = {(path, message) for path, cel, message in crd_rules() if is_update_rule(cel)}


@pytest.mark.parametrize("key", sorted(set(EXAMPLES) - UPDATE_RULES), ids=lambda k: f"{k[0]}: {k[1][:40]}")
def test_the_api_server_rejects_and_accepts_each_example(api: CustomObjectsApi, key: tuple[str, str]) -> None:
    _, message = key
    example = EXAMPLES[key]
    with pytest.raises(ApiException) as error:
        dry_run_create(api, applied(example.reject))
    assert error.value.status == 422
    assert message in json.loads(error.value.body)["message"]  # decoded: the server escapes < > &
    dry_run_create(api, applied(example.accept))


@pytest.mark.parametrize(
    ("name", "job"), list(minimal_method_jobs()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_a_minimal_job_of_each_method_is_admitted(
    api: CustomObjectsApi, name: str, job: dict[str, Any]
) -> None:
    job["metadata"]["name"] = f"minimal-{name.replace('+', '-')}"
    dry_run_create(api, job)


@pytest.mark.parametrize("key", sorted(UPDATE_RULES), ids=lambda k: k[1][:40])
def test_the_api_server_judges_each_update_rules_examples(
    api: CustomObjectsApi, key: tuple[str, str]
) -> None:
    """The minimal job is created for real; each example is then tried as its update (dry run)."""
    _, message = key
    name = f"update-{abs(hash(message)) % 10**8}"
    job = minimal_job()
    job["metadata"]["name"] = name
    created = api.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, job)
    try:

        def update(edit: Edit) -> None:
            changed = applied(edit)
            changed["metadata"] = {"name": name, "resourceVersion": created["metadata"]["resourceVersion"]}
            api.replace_namespaced_custom_object(
                GROUP, VERSION, "default", PLURAL, name, changed, dry_run="All"
            )

        with pytest.raises(ApiException) as error:
            update(EXAMPLES[key].reject)
        assert error.value.status == 422
        assert message in json.loads(error.value.body)["message"]
        update(EXAMPLES[key].accept)
    finally:
        api.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, name)
