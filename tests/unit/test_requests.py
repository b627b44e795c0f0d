"""Requests from the plan: host memory, local disk and checkpoint time, and what a job overrides."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from operator_fixtures import OPTIONS, job, ref

from finetune_operator.api.models import parse_job
from finetune_operator.core.desire import Desired, desire
from finetune_operator.core.plan import plan
from finetune_operator.core.requests import GIB, HOST_BYTES_PER_PROCESS, binary_quantity, quantity_bytes

EXAMPLES = "examples"


@pytest.mark.parametrize(
    ("quantity", "value"),
    [
        ("16Gi", 16 * GIB),
        ("500M", 500_000_000),
        ("1.5Gi", 3 * GIB // 2),
        ("1e9", 10**9),
        ("32", 32),
        ("250m", 1),
    ],
)
def test_quantities_read_as_kubernetes_reads_them(quantity: str, value: int) -> None:
    assert quantity_bytes(quantity) == value


@pytest.mark.parametrize(
    ("value", "quantity"),
    [(64 * GIB, "64Gi"), (2 * GIB + 1, "2049Mi"), (40 * GIB, "40Gi"), (1, "1Mi"), (3 * 1024**4, "3Ti")],
)
def test_requests_are_written_as_the_api_server_stores_them(value: int, quantity: str) -> None:
    assert binary_quantity(value) == quantity
    assert quantity_bytes(quantity) >= value


def example(name: str) -> Any:
    with open(f"{EXAMPLES}/{name}.yaml") as f:
        return parse_job(yaml.safe_load(f)).spec


def test_offloaded_states_shared_memory_and_processes_add_up_to_the_host_memory_request() -> None:
    spec = example("llama2-7b-alpaca-lora")
    spec = spec.model_copy(
        update={
            "method": spec.method.model_copy(update={"type": "full", "lora": None}),
            "distributed": spec.distributed.model_copy(update={"zero_stage": 2, "offload": "optimizer"}),
        }
    )
    planned = plan(spec)
    assert planned.offload.value == "optimizer" and planned.host_bytes_per_node > 0
    expected = planned.host_bytes_per_node + 16 * GIB + HOST_BYTES_PER_PROCESS * planned.gpus_per_node
    assert planned.requests.memory_bytes == expected
    assert planned.to_status().worker_memory_bytes == expected


def test_a_hub_model_asks_for_disk_to_download_into_and_a_pvc_model_does_not() -> None:
    hub = plan(example("llama2-7b-alpaca-lora"))  # model.name only: downloaded from the hub
    assert hub.requests.ephemeral_storage_bytes > 13 * GIB  # 6.7 B parameters in 16 bits
    spec = example("llama2-7b-alpaca-lora")
    on_pvc = spec.model_copy(
        update={"model": spec.model.model_copy(update={"uri": "pvc://models/llama2-7b"})}
    )
    assert plan(on_pvc).requests.ephemeral_storage_bytes == 2 * GIB


def test_a_large_full_checkpoint_gets_a_grace_period_long_enough_to_write_it() -> None:
    planned = plan(example("llama3-70b-full"))
    # Rank 0's node writes 70 B 16-bit weights plus its share of the optimizer: minutes, not 120 s.
    assert planned.requests.checkpoint_seconds > 1200
    lora = plan(example("llama2-7b-alpaca-lora"))
    assert lora.requests.checkpoint_seconds < 120  # an adapter is megabytes


def test_a_pure_bf16_checkpoint_holds_bf16_moments_and_takes_less_time() -> None:
    """14 B of optimizer and weights per parameter in mixed precision; pure bf16 writes 2 + 4 without ZeRO
    and 2 + 6 with it (its bf16 master partition)."""
    from finetune_operator.core.requests import CHECKPOINT_SETUP_SECONDS, worker_requests

    spec = example("llama2-7b-alpaca-lora")
    pure = spec.model_copy(update={"training": spec.training.model_copy(update={"pure_bf16": True})})
    params = 8_000_000_000

    def seconds(job: Any, zero_stage: int) -> int:
        layout = {"gpus": 1, "gpus_per_node": 1, "host_offload_bytes_per_node": 0}
        requests = worker_requests(
            job, zero_stage=zero_stage, total_params=params, trainable_params=params, **layout
        )
        return requests.checkpoint_seconds - CHECKPOINT_SETUP_SECONDS

    mixed = seconds(spec, 0)
    assert seconds(pure, 0) == pytest.approx(mixed * 6 / 14, abs=1)
    assert seconds(pure, 1) == pytest.approx(mixed * 8 / 14, abs=1)
    assert seconds(spec, 1) == mixed  # one GPU: the whole optimizer either way


def rendered(**spec: Any) -> Desired:
    result = desire(job(**spec), ref(), OPTIONS, attempt=0)
    assert isinstance(result, Desired), result
    return result


def test_the_termination_grace_is_the_operators_unless_the_checkpoint_needs_more_or_the_job_says() -> None:
    assert rendered().pods[0]["spec"]["terminationGracePeriodSeconds"] == OPTIONS.termination_grace_seconds
    own = rendered(runPolicy={"terminationGracePeriodSeconds": 45})
    assert own.pods[0]["spec"]["terminationGracePeriodSeconds"] == 45
    env = {e["name"]: e.get("value") for e in own.pods[0]["spec"]["containers"][0]["env"]}
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "33"  # three quarters to save, the rest to exit


def test_a_large_checkpoint_lengthens_the_pods_grace_period() -> None:
    with open(f"{EXAMPLES}/llama3-70b-full.yaml") as f:
        big = parse_job(yaml.safe_load(f))
    result = desire(big, ref(), OPTIONS, attempt=0)
    assert isinstance(result, Desired)
    assert result.pods[0]["spec"]["terminationGracePeriodSeconds"] == result.plan.checkpoint_seconds > 1200
