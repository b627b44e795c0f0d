"""The pure renderer: whole built objects compared against what the worker gang must look like."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from typing import Any

import pytest
import yaml
from operator_fixtures import OPTIONS, UID, job, ref

from finetune_operator.api.trainer import CONFIG_FILE, TrainerConfig
from finetune_operator.core import names
from finetune_operator.core.desire import Desired, SpecProblem, desire, parse_job
from finetune_operator.core.gang import build_gang
from finetune_operator.core.placement import placement
from finetune_operator.core.plan import plan
from finetune_operator.core.render import render_configmap, render_pod, render_service, template_hash
from finetune_operator.core.torch_env import Rendezvous, torch_env

OWNER = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "name": "tiny",
    "uid": UID,
    "controller": True,
    "blockOwnerDeletion": True,
}

#: Workers stay on a node that stopped being Ready for the operator's node-loss grace, not Kubernetes'
#: 300 s: the eviction that follows is what makes the operator look at the node.
NODE_LOSS = [
    {
        "key": f"node.kubernetes.io/{taint}",
        "operator": "Exists",
        "effect": "NoExecute",
        "tolerationSeconds": 120,
    }
    for taint in ("not-ready", "unreachable")
]


def desired(**spec_updates: Any) -> Desired:
    result = desire(job(**spec_updates), ref(), OPTIONS, attempt=0)
    assert isinstance(result, Desired), result
    return result


def expected_worker(index: int, hash_: str) -> dict[str, Any]:
    """Worker `index` of the base job (8 GPUs on 2 nodes of 4), written out in full."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"tiny-worker-{index}",
            "namespace": "team-a",
            "labels": {
                "finetune.dev/job-name": "tiny",
                "app.kubernetes.io/name": "finetune-trainer",
                "app.kubernetes.io/managed-by": "finetune-operator",
                "app.kubernetes.io/component": "worker",
                "finetune.dev/replica-index": str(index),
                "finetune.dev/attempt": "0",
            },
            "annotations": {"finetune.dev/generation": "1", "finetune.dev/template-hash": hash_},
            "ownerReferences": [OWNER],
        },
        "spec": {
            "restartPolicy": "Never",
            "hostname": f"tiny-worker-{index}",
            "subdomain": "tiny-workers",
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 120,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 10001,
                "runAsGroup": 10001,
                "fsGroup": 10001,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "trainer",
                    "image": "trainer:test",
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["finetune-launch"],
                    "args": [
                        "--nnodes=$(NNODES)",
                        "--nproc_per_node=$(NPROC_PER_NODE)",
                        "--node_rank=$(NODE_RANK)",
                        "--master_addr=$(MASTER_ADDR)",
                        "--master_port=$(MASTER_PORT)",
                        "--no-python",
                        "finetune-train",
                        "--config",
                        f"/etc/finetune/{CONFIG_FILE}",
                    ],
                    "env": [
                        {"name": "MASTER_ADDR", "value": "tiny-worker-0.tiny-workers"},
                        {"name": "MASTER_PORT", "value": "29500"},
                        {"name": "NNODES", "value": "2"},
                        {"name": "NODE_RANK", "value": str(index)},
                        {"name": "NPROC_PER_NODE", "value": "4"},
                        {"name": "WORLD_SIZE", "value": "8"},
                        {"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": "90"},
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {
                            "name": "POD_NAMESPACE",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
                        },
                    ],
                    "ports": [
                        {"name": "rendezvous", "containerPort": 29500},
                        {"name": "metrics", "containerPort": 9464},  # what the chart's PodMonitor scrapes
                    ],
                    # host memory from the plan (16Gi /dev/shm + 4 processes x 6 GiB), requested not limited;
                    # local disk for logs and compiled ops (the model is on a PVC: nothing to download)
                    "resources": {
                        "requests": {
                            "nvidia.com/gpu": "4",
                            "memory": "40Gi",
                            "ephemeral-storage": "2049Mi",
                        },
                        "limits": {"nvidia.com/gpu": "4"},
                    },
                    "volumeMounts": [
                        {"name": "config", "mountPath": "/etc/finetune", "readOnly": True},
                        {"name": "dshm", "mountPath": "/dev/shm"},
                        {"name": "pvc-datasets", "mountPath": "/mnt/pvc/datasets", "readOnly": True},
                        {"name": "pvc-models", "mountPath": "/mnt/pvc/models"},
                    ],
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                        "runAsNonRoot": True,
                    },
                }
            ],
            "volumes": [
                {"name": "config", "configMap": {"name": "tiny-config"}},
                {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}},
                {
                    "name": "pvc-datasets",
                    "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True},
                },
                {"name": "pvc-models", "persistentVolumeClaim": {"claimName": "models"}},
            ],
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                *NODE_LOSS,
            ],
            "serviceAccountName": "finetune-trainer",
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {
                                        "key": "nvidia.com/gpu.product",
                                        "operator": "In",
                                        "values": ["NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-80GB-PCIe"],
                                    }
                                ]
                            }
                        ]
                    }
                },
                # two workers, one node each: the plan gives each all of a node's planned GPUs
                "podAntiAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "labelSelector": {"matchLabels": {"finetune.dev/job-name": "tiny"}},
                            "topologyKey": "kubernetes.io/hostname",
                        }
                    ]
                },
            },
        },
    }


def test_workers_of_the_base_job_are_the_whole_expected_pods() -> None:
    result = desired()
    assert result.plan.nodes == 2 and result.plan.gpus_per_node == 4
    assert [p["metadata"]["name"] for p in result.pods] == ["tiny-worker-0", "tiny-worker-1"]
    for index, pod in enumerate(result.pods):
        assert pod == expected_worker(index, result.template_hash)


def test_a_desired_job_holds_its_gang_and_renders_fresh_objects_on_each_read() -> None:
    """The controller keeps a Desired per running job: a caller that edits what it read (the scheduler
    refiner's PodGroup, a pod before its create) must not change what the next pass creates."""
    result = desired()
    assert result.pod_names == tuple(p["metadata"]["name"] for p in result.pods)
    first = result.pods
    first[0]["metadata"]["labels"]["edited"] = "yes"
    first[1]["spec"]["containers"][0]["env"].clear()
    result.configmap["data"].clear()
    assert result.pods == tuple(expected_worker(i, result.template_hash) for i in range(2))
    assert result.configmap["data"]
    assert not any(isinstance(v, dict) for v in vars(result).values())


def test_service_is_headless_and_selects_the_job() -> None:
    assert desired().service == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "tiny-workers",
            "namespace": "team-a",
            "labels": {
                "finetune.dev/job-name": "tiny",
                "app.kubernetes.io/name": "finetune-trainer",
                "app.kubernetes.io/managed-by": "finetune-operator",
                "app.kubernetes.io/component": "rendezvous",
            },
            "ownerReferences": [OWNER],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"finetune.dev/job-name": "tiny"},
            "ports": [{"name": "rendezvous", "port": 29500, "targetPort": 29500}],
        },
    }


def test_configmap_holds_a_trainer_config_the_trainer_parses_with_the_plan_and_mounts() -> None:
    configmap = desired().configmap
    assert configmap["metadata"]["name"] == "tiny-config"
    assert configmap["metadata"]["ownerReferences"] == [OWNER]
    # One file: the trainer renders the DeepSpeed config from it (one copy, one owner).
    assert set(configmap["data"]) == {CONFIG_FILE}
    trainer = TrainerConfig.model_validate(yaml.safe_load(configmap["data"][CONFIG_FILE]))
    assert trainer.world_size == 8
    assert trainer.mounts == {"datasets": "/mnt/pvc/datasets", "models": "/mnt/pvc/models"}
    assert trainer.paths.dataset == "/mnt/pvc/datasets/alpaca.jsonl"
    assert trainer.paths.output == "/mnt/pvc/models/tiny-lora"
    assert trainer.progress.reporter == "pod-annotation"


@pytest.mark.parametrize(
    ("resources", "expression"),
    [
        (
            {"gpuType": "A100-80GB"},
            # every board variant: SXM4 and PCIe nodes both serve an A100 80GB job
            {
                "key": "nvidia.com/gpu.product",
                "operator": "In",
                "values": ["NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-80GB-PCIe"],
            },
        ),
        ({"gpuMemoryGiB": 40}, {"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["40959"]}),
        ({"gpuMemoryGiB": 23.5}, {"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["24063"]}),
        # the API says gpuMemoryGiB overrides the product: any GPU with that much memory will do
        (
            {"gpuType": "A100-80GB", "gpuMemoryGiB": 48},
            {"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["49151"]},
        ),
    ],
)
def test_placement_by_product_or_by_memory(resources: dict[str, Any], expression: dict[str, Any]) -> None:
    result = desired(resources={**resources, "gpusPerNode": 4, "gpus": 8})
    terms = result.pods[0]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert terms == {"nodeSelectorTerms": [{"matchExpressions": [expression]}]}


def test_placement_without_gpu_preference_has_no_affinity() -> None:
    assert placement(None, None).affinity is None


def test_scheduling_knobs_credentials_and_user_env_reach_every_worker() -> None:
    result = desired(
        secrets={"hfToken": {"name": "hf", "key": "token"}, "storage": "s3-creds"},
        env=[{"name": "NCCL_DEBUG", "value": "INFO"}],
        nodeSelector={"pool": "training"},
        tolerations=[
            {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"},
            # the job's own toleration of a node-loss taint replaces the operator's
            {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"},
        ],
        priorityClassName="batch-high",
        serviceAccountName="team-a-trainer",
        image="registry.example/trainer:2",
        resources={"gpuType": "A100-80GB", "gpusPerNode": 4, "gpus": 8, "cpu": "32", "memory": "256Gi"},
    )
    for pod in result.pods:
        spec = pod["spec"]
        container = spec["containers"][0]
        assert container["env"][-2:] == [
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
            {"name": "NCCL_DEBUG", "value": "INFO"},
        ]
        assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
        assert container["image"] == "registry.example/trainer:2"
        assert container["resources"] == {
            "requests": {
                "nvidia.com/gpu": "4",
                "cpu": "32",
                "memory": "256Gi",
                "ephemeral-storage": "2049Mi",
            },
            "limits": {"nvidia.com/gpu": "4", "memory": "256Gi"},  # the job's own memory: request = limit
        }
        assert spec["nodeSelector"] == {"pool": "training"}
        assert spec["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            NODE_LOSS[0],
            {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"},
            {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"},
        ]
        assert spec["priorityClassName"] == "batch-high"
        assert spec["serviceAccountName"] == "team-a-trainer"


@pytest.mark.parametrize(
    ("spec_updates", "reason", "fragment"),
    [
        ({"env": [{"name": "MASTER_ADDR", "value": "x"}]}, "InvalidSpec", "MASTER_ADDR"),
        (
            {"env": [{"name": "RANK", "value": "0"}, {"name": "WORLD_SIZE", "value": "9"}]},
            "InvalidSpec",
            "RANK, WORLD_SIZE",
        ),
        ({"resources": {"gpuType": "NoSuchGPU-1GB", "gpus": 1}}, "InvalidSpec", "unknown GPU"),
        (
            {"resources": {"gpuType": "A100-80GB", "gpusPerNode": 4, "gpus": 5}},
            "InvalidSpec",
            "spread evenly",
        ),
    ],
)
def test_specs_that_cannot_run_are_spec_problems(
    spec_updates: dict[str, Any], reason: str, fragment: str
) -> None:
    result = desire(job(**spec_updates), ref(), OPTIONS, attempt=0)
    assert isinstance(result, SpecProblem)
    assert result.reason == reason
    assert fragment in result.message


def test_a_model_that_fits_nowhere_is_a_memory_fits_problem_with_the_plan() -> None:
    big = job(
        model={"name": "meta-llama/Meta-Llama-3-70B"},
        method={"type": "full"},
        resources={"gpuType": "L4", "gpusPerNode": 1, "gpus": 1},
    )
    result = desire(big, ref(), OPTIONS, attempt=0)
    assert isinstance(result, SpecProblem)
    assert result.reason == "MemoryFits"
    assert result.plan is not None and not result.plan.fits
    assert result.message == result.plan.message and "does not fit" in result.message


def test_parse_job_reports_invalid_fields_by_camel_case_path() -> None:
    document = job().model_dump(mode="json", by_alias=True, exclude_none=True)
    document["spec"]["training"] = {"learningRate": -1}
    problem = parse_job(document)
    assert isinstance(problem, SpecProblem) and problem.reason == "InvalidSpec"
    assert "spec.training.learningRate" in problem.message


def test_template_hash_ignores_the_attempt_but_follows_the_spec() -> None:
    base_job = job()
    planned = plan(base_job.spec)
    gang = build_gang(base_job, ref(), planned, OPTIONS, attempt=0)
    assert template_hash(gang) == template_hash(replace(gang, attempt=3, labels={"x": "y"}))
    changed = job(training={"learningRate": 1e-5})
    assert template_hash(build_gang(changed, ref(), plan(changed.spec), OPTIONS, 0)) != template_hash(gang)


def test_attempt_label_and_plugin_labels_land_on_pods_but_not_on_the_service() -> None:
    base_job = job()
    gang = build_gang(base_job, ref(), plan(base_job.spec), OPTIONS, attempt=2)
    gang = replace(gang, labels={"kueue.x-k8s.io/queue-name": "q"}, annotations={"a": "b"})
    pod = render_pod(gang, 1)
    assert pod["metadata"]["labels"][names.LABEL_ATTEMPT] == "2"
    assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "q"
    assert pod["metadata"]["annotations"]["a"] == "b"
    assert "kueue.x-k8s.io/queue-name" not in render_service(gang)["metadata"]["labels"]
    assert render_configmap(gang)["data"] == dict(gang.config_data)


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:8]


@pytest.mark.parametrize(
    ("job_name", "base"),
    [
        ("tiny", "tiny"),
        ("a" * 51, "a" * 51),  # the longest name kept as it is
        ("a" * 52, "a" * 42 + "-" + _digest("a" * 52)),
        ("llama.v2", "llama-v2-" + _digest("llama.v2")),  # dots are not allowed in a hostname
        ("Upper", "upper-" + _digest("Upper")),
    ],
)
def test_names_are_dns_labels_for_any_job_name(job_name: str, base: str) -> None:
    assert names.job_base(job_name) == base
    assert len(names.worker_name(job_name, 9999)) <= 63
    assert names.master_addr(job_name) == f"{base}-worker-0.{base}-workers"


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_rendezvous_env_per_rank(rank: int) -> None:
    env = torch_env(Rendezvous("m.svc", 29500, nnodes=3, nproc_per_node=8), rank)
    assert env == [
        {"name": "MASTER_ADDR", "value": "m.svc"},
        {"name": "MASTER_PORT", "value": "29500"},
        {"name": "NNODES", "value": "3"},
        {"name": "NODE_RANK", "value": str(rank)},
        {"name": "NPROC_PER_NODE", "value": "8"},
        {"name": "WORLD_SIZE", "value": "24"},
    ]


def test_rendezvous_rejects_a_rank_outside_the_gang() -> None:
    with pytest.raises(ValueError, match="outside"):
        torch_env(Rendezvous("m", 1, nnodes=2, nproc_per_node=1), 2)


# --- the trainer's access in the job's namespace ---------------------------------------------------------


def test_the_trainer_account_and_its_binding_are_provided_where_the_operator_manages_access() -> None:
    assert desired().access == ()  # access not managed: the accounts exist already
    options = replace(OPTIONS, trainer_cluster_role="finetune-trainer")
    result = desire(job(), ref(), options, attempt=0)
    assert isinstance(result, Desired)
    account, binding = result.access
    namespace = ref().namespace
    assert account == {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {
            "name": "finetune-trainer",
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/name": "finetune-trainer",
                "app.kubernetes.io/managed-by": "finetune-operator",
            },
        },
    }
    assert binding["kind"] == "RoleBinding" and binding["metadata"] == account["metadata"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "finetune-trainer",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "finetune-trainer", "namespace": namespace}
    ]
    # Shared by the namespace's jobs: deleting one job must not take the account with it.
    assert "ownerReferences" not in account["metadata"]
    assert all(p["spec"]["serviceAccountName"] == "finetune-trainer" for p in result.pods)


def test_a_job_with_its_own_account_gets_no_managed_access() -> None:
    options = replace(OPTIONS, trainer_cluster_role="finetune-trainer")
    result = desire(job(serviceAccountName="team-trainer"), ref(), options, attempt=0)
    assert isinstance(result, Desired)
    assert result.access == ()
    assert result.pods[0]["spec"]["serviceAccountName"] == "team-trainer"


def test_every_rendered_object_is_already_the_json_the_operator_sends() -> None:
    """The operator's client (adapters/rest.py) sends each body through json.dumps as it is: no dates, no
    client models, nothing the API server would read differently from what was rendered."""
    built = desired()
    objects = [built.configmap, built.service, *built.pods, *built.access, *built.companions]
    for obj in objects:
        assert json.loads(json.dumps(obj)) == obj
