"""The real API server says what the Python twin says: every CEL rule's rejected example is refused at
apply with the rule's message, its accepted example is admitted, and a minimal job of every method is
admitted (server-side dry run: nothing is stored). The pure half is tests/contract/test_rules.py."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes.client import CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from contract.rule_examples import EXAMPLES, applied, minimal_method_jobs
from finetune_operator.api.models import GROUP, PLURAL, VERSION

from .conftest import Cluster

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def api(cluster: Cluster) -> CustomObjectsApi:
    return CustomObjectsApi(cluster.api_client)


def dry_run_create(api: CustomObjectsApi, document: dict[str, Any]) -> None:
    api.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, document, dry_run="All")


@pytest.mark.parametrize("key", sorted(EXAMPLES), ids=lambda k: f"{k[0]}: {k[1][:40]}")
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
