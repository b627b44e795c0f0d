"""The API's closed vocabularies, shared by the CRD, the estimator, the planner and the trainer config.

Values are the strings users write in YAML and HF/PEFT/DeepSpeed use, so a value can be passed through
to those libraries without a translation table.
"""

from enum import StrEnum


class Method(StrEnum):
    FULL = "full"
    FREEZE = "freeze"
    LORA = "lora"
    QLORA = "qlora"
    DORA = "dora"
    PREFIX = "prefix"
    PROMPT = "prompt"


class Phase(StrEnum):
    """A FineTuneJob's phase (`status.phase`), as `kubectl get` shows it."""

    PENDING = "Pending"
    QUEUED = "Queued"  # workers created and held by Kueue until it admits their Workload
    SCHEDULING = "Scheduling"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class Precision(StrEnum):
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


class Optimizer(StrEnum):
    ADAMW = "adamw"
    ADAMW_8BIT = "adamw_8bit"
    PAGED_ADAMW_8BIT = "paged_adamw_8bit"
    SGD = "sgd"


class Offload(StrEnum):
    """What ZeRO moves to host memory; `all` is optimizer states and (under ZeRO-3) parameters."""

    NONE = "none"
    OPTIMIZER = "optimizer"
    ALL = "all"


class AttentionImpl(StrEnum):
    SDPA = "sdpa"
    EAGER = "eager"
    FLASH_ATTENTION_2 = "flash_attention_2"


class ReportTo(StrEnum):
    """Experiment trackers rank 0 can log to, by HF TrainingArguments' `report_to` names."""

    TENSORBOARD = "tensorboard"
    MLFLOW = "mlflow"
    WANDB = "wandb"


class QuantType(StrEnum):
    NF4 = "nf4"
    FP4 = "fp4"


class GangScheduling(StrEnum):
    """How a job's workers are placed (runPolicy.gangScheduling; unset: the operator's default)."""

    #: The default scheduler places each worker as it can: a gang that only partly fits holds the GPUs
    #: of the workers placed until the rest can follow.
    NONE = "none"
    #: All or nothing: each attempt is a scheduler-plugins PodGroup, placed by a kube-scheduler running
    #: the Coscheduling plugin only once every worker fits.
    COSCHEDULING = "coscheduling"


#: Optimizers that can step offloaded states: DeepSpeed swaps AdamW for its CPU Adam; 8-bit and SGD have
#: no CPU implementation.
OFFLOAD_OPTIMIZERS = frozenset({Optimizer.ADAMW})
