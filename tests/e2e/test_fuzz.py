"""Fuzzed specs (hypothesis) against the real API server and the operator.

Each example edits one to three fields of the minimal job, anywhere in the spec the CRD describes, to a
value drawn for that field's schema: its bounds and one past them, other values in and out of range, the
wrong type, enum members and strangers, odd strings. The API server (schema and CEL, server-side dry run)
either refuses it with a 422 that names the field, or admits it; what it admits, the operator's API models
admit too (the CRD is generated from them) and the admission verdict (`review`, the controller's own
pipeline) answers without raising. Then a sample of admitted jobs is created for real with the operator
running: each gets a phase for its generation, a failed one a reason, and the operator neither crashes
nor spins (its reconciles stop once the jobs settle).
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes.client import CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from contract.rule_examples import minimal_job
from finetune_operator.api.crd import build_crd
from finetune_operator.api.enums import Phase
from finetune_operator.core.admission import review
from finetune_operator.core.desire import SpecProblem, parse_job
from finetune_operator.settings import from_env

from .harness import GROUP, OPERATOR_ENV, PLURAL, VERSION, Operator, condition, create, get

pytestmark = pytest.mark.cluster

#: Admitted examples created for real with the operator watching (each a job of its own).
CREATED = 30


def spec_schema() -> dict[str, Any]:
    schema: dict[str, Any] = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return dict(schema["properties"]["spec"])


def leaves(
    schema: dict[str, Any], path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
    """Every field of the spec that holds a value rather than more fields, with its schema."""
    if schema.get("type") == "object" and "properties" in schema:
        for name, child in schema["properties"].items():
            yield from leaves(child, (*path, name))
    else:
        yield path, schema


FIELDS = sorted(leaves(spec_schema()))
ODD_STRINGS = [
    "",
    " ",
    "x" * 300,
    "../../etc",
    "pvc://",
    "s3://b/k",
    "hf://org/model",
    "UPPER",
    "a b",
    "\u00e9",
]


def near(bound: float | None, integer: bool) -> list[Any]:
    if bound is None:
        return []
    step = 1 if integer else 0.001
    return [bound - step, bound, bound + step]


def values_for(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values for one field: mostly its own type around its bounds, sometimes the wrong type."""
    kind = schema.get("type")
    wrong = st.sampled_from([None, "seven", -1, 1.5, True, [], {}])
    if schema.get("x-kubernetes-int-or-string"):
        own: st.SearchStrategy[Any] = st.one_of(
            st.integers(-2, 300), st.sampled_from(["auto", "", "3", "many"])
        )
    elif kind in ("integer", "number"):
        integer = kind == "integer"
        edges = near(schema.get("minimum"), integer) + near(schema.get("maximum"), integer)
        numbers = st.integers(-(10**6), 10**12) if integer else st.floats(-10.0, 1e6, allow_nan=False)
        own = st.one_of(st.sampled_from(edges or [0]), numbers)
    elif kind == "string":
        choices = [*schema.get("enum", []), "bogus", *ODD_STRINGS]
        own = st.one_of(st.sampled_from(choices), st.text(max_size=12))
    elif kind == "boolean":
        own = st.booleans()
    elif kind == "array":
        own = st.one_of(
            st.lists(st.text(max_size=8), max_size=3),
            st.lists(st.fixed_dictionaries({"name": st.sampled_from(["RANK", "HF_HOME", "MY_VAR", ""]),
                                             "value": st.text(max_size=8)}), max_size=2),
        )  # fmt: skip
    else:  # maps and free-form objects
        own = st.dictionaries(
            st.sampled_from(["a", "pool", "kubernetes.io/os", ""]), st.text(max_size=8), max_size=2
        )
    return st.one_of(own, own, own, wrong)


@st.composite
def fuzzed_jobs(draw: st.DrawFn) -> dict[str, Any]:
    job = minimal_job()
    for _ in range(draw(st.integers(1, 3))):
        path, schema = draw(st.sampled_from(FIELDS))
        node = job["spec"]
        for name in path[:-1]:
            if not isinstance(node.get(name), dict):
                node[name] = {}
            node = node[name]
        node[path[-1]] = draw(values_for(schema))
    return job


def dry_run(api: CustomObjectsApi, job: dict[str, Any]) -> dict[str, Any] | str:
    """The job as the API server would store it (pruned, defaulted; nothing is stored), or its refusal."""
    try:
        stored: dict[str, Any] = api.create_namespaced_custom_object(
            GROUP, VERSION, "default", PLURAL, job, dry_run="All"
        )
    except ApiException as exc:
        assert exc.status == 422, f"{exc.status} for {json.dumps(job['spec'])}: {exc.body}"
        return str(json.loads(exc.body)["message"])
    return stored


#: Every field and block of the spec as a refusal names it (`training.earlyStopping`, `spec.image`),
#: longest first: the API server prefixes schema errors with `spec.`, a CEL rule's message names its fields.
FIELD_NAMED = re.compile(
    r"\b("
    + "|".join(
        sorted(
            {re.escape(".".join(path[:n])) for path, _ in FIELDS for n in range(1, len(path) + 1)},
            key=len,
            reverse=True,
        )
    )
    + r")\b"
)


def test_fuzzed_specs_are_refused_naming_the_field_or_planned_or_failed_with_a_reason(
    api: CustomObjectsApi, operator: Operator
) -> None:
    options = from_env(OPERATOR_ENV).render_options()
    admitted: list[dict[str, Any]] = []
    refused = 0

    @settings(
        max_examples=250,
        deadline=None,
        derandomize=True,  # the same examples every run: CI reproduces what a developer saw
        suppress_health_check=[HealthCheck.too_slow],
        database=None,
    )
    @given(fuzzed_jobs())
    def judge(job: dict[str, Any]) -> None:
        nonlocal refused
        stored = dry_run(api, job)
        if isinstance(stored, str):
            refused += 1
            assert FIELD_NAMED.search(stored), f"the refusal names no field: {stored}"
            return
        parsed = parse_job(stored)  # what the operator reads: nulls pruned, defaults filled in
        assert not isinstance(parsed, SpecProblem), (
            f"the API server admits what the models refuse: {parsed.message}\n{json.dumps(stored['spec'])}"
        )
        review(stored, None, options)  # the webhook's verdict: an answer, never an exception
        admitted.append(job)

    judge()
    print(f"{refused} refused, {len(admitted)} admitted")
    assert refused and len(admitted) >= CREATED  # both sides of the schema were reached

    ns = operator.namespace
    names = [f"fuzz-{index}" for index in range(CREATED)]
    for name, job in zip(names, admitted, strict=False):
        document = copy.deepcopy(job)
        document["metadata"] = {"name": name}
        create(api, ns, document)

    def settled(name: str) -> bool:
        body = get(api, ns, name)
        status = body.get("status") or {}
        return status.get("observedGeneration") == body["metadata"]["generation"] and "phase" in status

    deadline = time.monotonic() + 120
    while unsettled := [name for name in names if not settled(name)]:
        if time.monotonic() > deadline:
            shown = {name: {k: get(api, ns, name).get(k) for k in ("spec", "status")} for name in unsettled}
            raise AssertionError(f"jobs without a status for their generation: {shown}\n{operator.tail()}")
        time.sleep(1)
    for name in names:
        status = get(api, ns, name)["status"]
        assert status["phase"] in set(Phase), status
        if status["phase"] == "Failed":
            failed = condition(status, "Failed")
            assert failed.get("reason") and failed.get("message"), (name, status)

    def reconciles() -> float:
        found = re.search(r"^finetune_reconcile_duration_seconds_count (\S+)$", operator.metrics(), re.M)
        return float(found.group(1)) if found else 0.0

    time.sleep(5)  # the last pod events of the jobs that placed workers
    before = reconciles()
    time.sleep(10)
    spun = reconciles() - before
    print(
        f"phases {Counter(get(api, ns, name)['status']['phase'] for name in names)}; {spun:g} reconciles idle"
    )
    assert spun <= CREATED, f"{spun} reconciles in 10 s with nothing changing: a hot loop\n{operator.tail()}"
    metrics = operator.metrics()
    assert 'finetune_reconcile_errors_total{kind="unexpected"}' not in metrics, metrics
    log = operator.log.read_text(errors="replace")
    assert "Traceback" not in log, operator.tail(120)
