"""A rejected and an accepted example for every CEL rule in the CRD, and a minimal job per method.

Keyed by where the rule sits in the schema and its message, so a rule added to the models without
examples here fails `test_every_cel_rule_has_examples`. Each example edits `minimal_job()` (only required
fields) in place. The pure tests check them against the Python twin; tests/e2e checks the same examples
against the real API server.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from finetune_operator.api.crd import build_crd
from finetune_operator.api.enums import Method
from finetune_operator.api.methods import METHODS

Edit = Callable[[dict[str, Any]], object]

MINIMAL: dict[str, Any] = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "minimal"},
    "spec": {
        "model": {"name": "meta-llama/Llama-2-7b-hf"},
        "dataset": {"uri": "pvc://datasets/alpaca.jsonl"},
        "method": {"type": "lora"},
        "resources": {"gpuType": "A100-80GB"},
        "output": {"uri": "pvc://models/out"},
    },
}


def minimal_job() -> dict[str, Any]:
    return copy.deepcopy(MINIMAL)


def minimal_method_jobs() -> Iterator[tuple[str, dict[str, Any]]]:
    """Per method: `{type}` alone, and with each settings block it reads at its first field's default."""
    first_fields = {"lora": {"r": 8}, "qlora": {"quantType": "nf4"}, "freeze": {"trainableLayers": 2}}
    for method, traits in METHODS.items():
        job = minimal_job()
        job["spec"]["method"] = {"type": method.value}
        yield method.value, job
        for block in traits.settings:
            job = minimal_job()
            job["spec"]["method"] = {
                "type": method.value,
                block: first_fields.get(block, {"numVirtualTokens": 8}),
            }
            yield f"{method.value}+{block}", job


@dataclass(frozen=True)
class RuleExample:
    """`reject` and `accept` edit the minimal job; for an update rule (`oldSelf`), they are updates of
    the minimal job as created."""

    reject: Edit
    accept: Edit


def _spec(**blocks: Any) -> Edit:
    """Merge blocks into spec (a dict value replaces a block wholesale)."""
    return lambda job: job["spec"].update(copy.deepcopy(blocks))


def _at(block: str, **fields: Any) -> Edit:
    """Set fields inside one spec block."""
    return lambda job: job["spec"].setdefault(block, {}).update(copy.deepcopy(fields))


def _method(**method: Any) -> Edit:
    return _spec(method=method)


def _both(*edits: Edit) -> Edit:
    return lambda job: [edit(job) for edit in edits]


ARCH = {"vocabSize": 8, "hiddenSize": 8, "intermediateSize": 8, "numLayers": 1, "numHeads": 4}
NOT_S3 = "uri: s3:// is not supported yet; copy the data to a PVC and use pvc://CLAIM/PATH"
READ_ONLY_HUB = "uri: hf:// is read-only; write to pvc://CLAIM/PATH (push to the hub after the job)"

EXAMPLES: dict[tuple[str, str], RuleExample] = {
    ("spec.model.architecture", "numKVHeads must divide numHeads"): RuleExample(
        reject=_at("model", architecture={**ARCH, "numKVHeads": 3}),
        accept=_at("model", architecture={**ARCH, "numKVHeads": 2}),
    ),
    ("spec.model", "set model.name (hub name) or model.uri (where the weights are)"): RuleExample(
        reject=_spec(model={"revision": "main"}),
        accept=_spec(model={"uri": "pvc://models/base"}),
    ),
    ("spec.model", NOT_S3): RuleExample(
        reject=_at("model", uri="s3://bucket/base"), accept=_at("model", uri="hf://org/base")
    ),
    ("spec.dataset", "dataset.numLabels is required for the classification format"): RuleExample(
        reject=_at("dataset", format="classification"),
        accept=_at("dataset", format="classification", numLabels=2),
    ),
    ("spec.dataset", NOT_S3): RuleExample(
        reject=_at("dataset", uri="s3://bucket/data.jsonl"), accept=_at("dataset", uri="hf://org/data")
    ),
    ("spec.method.lora", "lora.targetModules: all-linear must be the only entry"): RuleExample(
        reject=_method(type="lora", lora={"targetModules": ["all-linear", "q_proj"]}),
        accept=_method(type="lora", lora={"targetModules": ["all-linear"]}),
    ),
    ("spec.checkpointing", NOT_S3): RuleExample(
        reject=_at("checkpointing", uri="s3://bucket/ckpt"), accept=_at("checkpointing", uri="pvc://models/c")
    ),
    ("spec.checkpointing", READ_ONLY_HUB): RuleExample(
        reject=_at("checkpointing", uri="hf://org/ckpt"), accept=_at("checkpointing", uri="/ckpt")
    ),
    (
        "spec.tolerations[]",
        "tolerations: a toleration without a key matches every taint and needs operator Exists",
    ): RuleExample(
        reject=_spec(tolerations=[{"effect": "NoSchedule"}]),
        accept=_spec(tolerations=[{"operator": "Exists", "effect": "NoSchedule"}]),
    ),
    (
        "spec.runPolicy",
        "runPolicy.scheduleTimeoutSeconds: applies to gangScheduling coscheduling, not none",
    ): (
        RuleExample(
            reject=_spec(runPolicy={"gangScheduling": "none", "scheduleTimeoutSeconds": 30}),
            accept=_spec(runPolicy={"gangScheduling": "coscheduling", "scheduleTimeoutSeconds": 30}),
        )
    ),
    ("spec.tolerations[]", "tolerations: operator Exists takes no value"): RuleExample(
        reject=_spec(tolerations=[{"key": "gpu", "operator": "Exists", "value": "a100"}]),
        accept=_spec(tolerations=[{"key": "gpu", "operator": "Equal", "value": "a100"}]),
    ),
    ("spec.resources", "set resources.gpuType or resources.gpuMemoryGiB"): RuleExample(
        reject=_spec(resources={"gpusPerNode": 8}), accept=_spec(resources={"gpuMemoryGiB": 40})
    ),
    ("spec.resources", "resources.gpus must be a positive integer or auto"): RuleExample(
        reject=_at("resources", gpus=0), accept=_at("resources", gpus=8)
    ),
    ("spec.distributed", "distributed.zeroStage must be 0, 1, 2, 3 or auto"): RuleExample(
        reject=_spec(distributed={"zeroStage": 7}), accept=_spec(distributed={"zeroStage": 3})
    ),
    ("spec.output", NOT_S3): RuleExample(
        reject=_at("output", uri="s3://bucket/out"), accept=_at("output", uri="file:///out")
    ),
    ("spec.output", READ_ONLY_HUB): RuleExample(
        reject=_at("output", uri="hf://org/out"), accept=_at("output", uri="./out")
    ),
    ("spec", "training.earlyStopping needs dataset.validationSplit > 0"): RuleExample(
        reject=_spec(training={"earlyStopping": {"patience": 2}}),
        accept=_both(_spec(training={"earlyStopping": {}}), _at("dataset", validationSplit=0.1)),
    ),
    (
        "spec",
        "method.qlora.computeDtype bf16 does not mix with training.precision fp16; use fp16 or bf16 for both",
    ): RuleExample(
        reject=_both(
            _method(type="qlora", qlora={"computeDtype": "bf16"}), _spec(training={"precision": "fp16"})
        ),
        accept=_both(
            _method(type="qlora", qlora={"computeDtype": "fp16"}), _spec(training={"precision": "fp16"})
        ),
    ),
    (
        "spec",
        "prefix and prompt tuning do not run under distributed.zeroStage 3; use 0-2 or auto",
    ): RuleExample(
        reject=_both(_method(type="prompt"), _spec(distributed={"zeroStage": 3})),
        accept=_both(_method(type="prompt"), _spec(distributed={"zeroStage": 2})),
    ),
    (
        "spec",
        "prefix tuning does not run with training.gradientCheckpointing "
        "(recomputation drops its virtual keys and values)",
    ): RuleExample(
        reject=_both(_method(type="prefix"), _spec(training={"gradientCheckpointing": True})),
        accept=_both(_method(type="prompt"), _spec(training={"gradientCheckpointing": True})),
    ),
    (
        "spec",
        "prefix or prompt tuning does not train on dataset.packing rows "
        "(the virtual tokens would span every packed example)",
    ): RuleExample(
        reject=_both(_method(type="prompt"), _at("dataset", packing=True)),
        accept=_both(_method(type="lora"), _at("dataset", packing=True)),
    ),
    ("spec", "output.saveMerged only applies to lora, qlora or dora"): RuleExample(
        reject=_both(_method(type="full"), _at("output", saveMerged=True)),
        accept=_both(_method(type="dora"), _at("output", saveMerged=True)),
    ),
    ("spec.training", "training.pureBf16 needs training.precision bf16"): RuleExample(
        reject=_at("training", pureBf16=True, precision="fp16"),
        accept=_at("training", pureBf16=True),
    ),
    (
        "spec",
        "training.pureBf16 does not run with distributed.offload optimizer/all (DeepSpeed's CPU Adam keeps "
        "fp32 states); use none or auto",
    ): RuleExample(
        reject=_both(_spec(distributed={"offload": "optimizer"}), _spec(training={"pureBf16": True})),
        accept=_both(_spec(distributed={"offload": "auto"}), _spec(training={"pureBf16": True})),
    ),
    (
        "spec",
        "distributed.offload optimizer/all needs training.optimizer adamw (DeepSpeed CPU Adam)",
    ): RuleExample(
        reject=_both(_spec(distributed={"offload": "optimizer"}), _spec(training={"optimizer": "sgd"})),
        accept=_both(_spec(distributed={"offload": "optimizer"}), _spec(training={"optimizer": "adamw"})),
    ),
}

# Update rules: what a job's checkpoints are of is fixed once it exists; anything else may change.
IMMUTABLE = "cannot change once the job exists"
EXAMPLES |= {
    (
        "spec",
        f"spec.model {IMMUTABLE} (its checkpoints belong to the old model); create a new FineTuneJob",
    ): RuleExample(
        reject=_spec(model={"name": "meta-llama/Meta-Llama-3-8B"}), accept=_at("training", learningRate=1e-4)
    ),
    (
        "spec",
        f"spec.method {IMMUTABLE} (its checkpoints belong to the old method); create a new FineTuneJob",
    ): RuleExample(reject=_method(type="dora"), accept=_at("resources", gpus=8)),
    (
        "spec",
        f"spec.dataset {IMMUTABLE} (its checkpoints belong to the old data); create a new FineTuneJob",
    ): RuleExample(reject=_at("dataset", maxSeqLength=1024), accept=_spec(runPolicy={"backoffLimit": 1})),
    (
        "spec",
        f"spec.training.precision {IMMUTABLE} (its optimizer states are in the old precision); "
        "create a new FineTuneJob",
    ): RuleExample(
        reject=_at("training", precision="fp32"), accept=_at("training", precision="bf16", epochs=1)
    ),
    (
        "spec",
        f"spec.training.pureBf16 {IMMUTABLE} (its checkpoints hold optimizer states with or without fp32 "
        "master weights); create a new FineTuneJob",
    ): RuleExample(
        reject=_at("training", pureBf16=True), accept=_at("training", pureBf16=False, useLigerKernel=False)
    ),
}


def is_update_rule(cel: str) -> bool:
    return "oldSelf" in cel


# One example per settings block the method table derives (`method.<block> is only for type …`).
for _block, _owner, _other in (
    ("lora", Method.DORA, Method.FULL),
    ("qlora", Method.QLORA, Method.LORA),
    ("freeze", Method.FREEZE, Method.FULL),
    ("prefix", Method.PREFIX, Method.PROMPT),
    ("prompt", Method.PROMPT, Method.PREFIX),
):
    _readers = [m.value for m in METHODS if _block in METHODS[m].settings]
    _spoken = _readers[0] if len(_readers) == 1 else f"{', '.join(_readers[:-1])} or {_readers[-1]}"
    EXAMPLES[("spec.method", f"method.{_block} is only for type {_spoken}")] = RuleExample(
        reject=_method(type=_other.value, **{_block: {}}), accept=_method(type=_owner.value, **{_block: {}})
    )


def crd_rules() -> Iterator[tuple[str, str, str]]:
    """(schema path, CEL rule, message) for every x-kubernetes-validations entry of the generated CRD."""
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

    def walk(node: dict[str, Any], path: str) -> Iterator[tuple[str, str, str]]:
        for rule in node.get("x-kubernetes-validations", []):
            yield path, rule["rule"], rule["message"]
        for name, child in node.get("properties", {}).items():
            yield from walk(child, f"{path}.{name}" if path else name)
        if "items" in node:
            yield from walk(node["items"], f"{path}[]")

    yield from walk(schema, "")


def applied(edit: Edit) -> dict[str, Any]:
    job = minimal_job()
    edit(job)
    return job
