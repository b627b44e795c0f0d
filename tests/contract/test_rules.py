"""Every CEL rule has examples, and the Python twin agrees with each (tests/e2e checks the API server).

Also: a minimal job of each method (only required fields, with or without its settings blocks) is
accepted by the models and planned by `ftctl plan`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from contract.rule_examples import (
    EXAMPLES,
    applied,
    crd_rules,
    is_update_rule,
    minimal_job,
    minimal_method_jobs,
)
from finetune_operator.api.models import FineTuneJobSpec, parse_job
from finetune_operator.cli import main as ftctl


def test_every_cel_rule_has_examples() -> None:
    rules = {(path, message) for path, _, message in crd_rules()}
    assert len(rules) >= 20
    assert sorted(rules - set(EXAMPLES)) == [], "CEL rules without a rejected and an accepted example"
    assert sorted(set(EXAMPLES) - rules) == [], "examples for rules the CRD no longer has"


UPDATE_RULES = {(path, message) for path, cel, message in crd_rules() if is_update_rule(cel)}


@pytest.mark.parametrize("key", sorted(set(EXAMPLES) - UPDATE_RULES), ids=lambda k: f"{k[0]}: {k[1][:40]}")
def test_the_python_twin_rejects_and_accepts_each_example(key: tuple[str, str]) -> None:
    _, message = key
    example = EXAMPLES[key]
    with pytest.raises(ValidationError) as error:
        parse_job(applied(example.reject))
    assert message in str(error.value)
    parse_job(applied(example.accept))


@pytest.mark.parametrize("key", sorted(UPDATE_RULES), ids=lambda k: k[1][:40])
def test_the_python_twin_of_each_update_rule_judges_its_examples(key: tuple[str, str]) -> None:
    """Each edit is a valid job on its own; as an update of the minimal job, the rule refuses the
    rejected one, and no update rule refuses the accepted one."""
    _, message = key
    (rule,) = [r for r in FineTuneJobSpec.transition_rules if r.message == message]
    old = parse_job(minimal_job()).spec
    assert not rule.check(old, parse_job(applied(EXAMPLES[key].reject)).spec)
    accepted = parse_job(applied(EXAMPLES[key].accept)).spec
    assert all(r.check(old, accepted) for r in FineTuneJobSpec.transition_rules)


@pytest.mark.parametrize(
    ("name", "job"), list(minimal_method_jobs()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_a_minimal_job_of_each_method_is_accepted_and_planned_by_ftctl(
    name: str, job: dict[str, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    code = ftctl(["plan", "-f", str(path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "fits" in out and "DOES NOT FIT" not in out
