"""The committed CRD is what the models generate, is structural, and documents every field."""

from __future__ import annotations

import glob
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from finetune_operator.api.crd import CRD_TARGETS, build_crd, main, render_crd
from finetune_operator.api.models import parse_job

ROOT = Path(__file__).resolve().parents[2]


def walk(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    for name, prop in schema.get("properties", {}).items():
        yield f"{path}.{name}", prop
        yield from walk(prop, f"{path}.{name}")
    if "items" in schema:
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


def root_schema() -> dict[str, Any]:
    schema: dict[str, Any] = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def test_committed_crds_are_fresh() -> None:
    for target in CRD_TARGETS:
        assert (ROOT / target).read_text() == render_crd(), f"{target} is stale: run `make crds`"
    assert main(["--check", "--root", str(ROOT)]) == 0


def test_check_flags_a_stale_copy(tmp_path: Path) -> None:
    for target in CRD_TARGETS:
        (tmp_path / target).parent.mkdir(parents=True)
        (tmp_path / target).write_text("stale")
    assert main(["--check", "--root", str(tmp_path)]) == 1


def test_every_spec_and_status_field_has_a_description() -> None:
    schema = root_schema()
    missing = [
        path
        for top in ("spec", "status")
        for path, prop in walk(schema["properties"][top], top)
        if not prop.get("description")
    ]
    assert missing == []


def test_schema_is_structural() -> None:
    """No $ref, anyOf or null types: the API server refuses non-structural schemas."""
    text = yaml.safe_dump(root_schema())
    for forbidden in ("$ref", "anyOf", "type: 'null'", "title:"):
        assert forbidden not in text
    for path, prop in walk(root_schema()):
        assert "type" in prop or prop.get("x-kubernetes-int-or-string"), f"{path} has no type"


def test_int_or_string_fields_and_cel_rules() -> None:
    spec = root_schema()["properties"]["spec"]["properties"]
    assert spec["resources"]["properties"]["gpus"]["x-kubernetes-int-or-string"] is True
    assert spec["distributed"]["properties"]["zeroStage"]["x-kubernetes-int-or-string"] is True
    assert spec["distributed"]["properties"]["offload"]["enum"] == ["none", "optimizer", "all", "auto"]
    rules = {r["message"] for r in spec["method"]["x-kubernetes-validations"]}
    assert "method.qlora is only for type qlora" in rules


def test_printer_columns_cover_what_kubectl_get_shows() -> None:
    version = build_crd()["spec"]["versions"][0]
    names = [c["name"] for c in version["additionalPrinterColumns"] if c.get("priority", 0) == 0]
    assert names == ["Phase", "Method", "GPUs", "Nodes", "Progress", "Loss", "ETA", "Restarts", "Age"]
    assert version["subresources"] == {"status": {}}


def test_every_example_validates() -> None:
    files = sorted(glob.glob(str(ROOT / "examples" / "**" / "*.yaml"), recursive=True))
    assert len(files) >= 3
    for name in files:
        with open(name) as f:
            for document in yaml.safe_load_all(f):
                if document and document.get("kind") == "FineTuneJob":
                    parse_job(document)


def test_every_example_plans_and_renders_a_trainer_config() -> None:
    """What the README and examples/ show must be something the operator can actually launch."""
    from finetune_operator.core.plan import plan
    from finetune_operator.core.trainer_config import render_trainer_config

    files = sorted(glob.glob(str(ROOT / "examples" / "*.yaml")))
    for name in files:
        with open(name) as f:
            job = parse_job(yaml.safe_load(f))
        result = plan(job.spec)
        assert result.fits, (name, result.message)
        config = render_trainer_config(job, result)
        assert config.world_size == result.gpus and config.zero_stage == result.zero_stage


def test_workers_run_as_the_trainer_images_own_user() -> None:
    """The image keeps its Hugging Face cache and DeepSpeed's compiled ops in its user's home; a worker
    running as another UID cannot write there (every offload job compiles CPU Adam on first use)."""
    import re

    from finetune_operator.settings import Settings

    dockerfile = (ROOT / "Dockerfile.trainer").read_text()
    image_uid = int(re.search(r"useradd --uid (\d+)", dockerfile).group(1))  # type: ignore[union-attr]
    assert f"USER {image_uid}:{image_uid}" in dockerfile
    assert Settings().render_options().run_as_user == image_uid
