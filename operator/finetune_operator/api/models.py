"""FineTuneJob (finetune.dev/v1alpha1): the one definition the CRD, ftctl, the operator and the trainer use.

Names follow HF TrainingArguments and PEFT in camelCase (`learningRate`, `microBatchSize`, `lora.r`,
`targetModules`) so a user can carry a LLaMA-Factory or PEFT config over without a glossary; status
follows Kubernetes conventions (`conditions`, `observedGeneration`).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field
from pydantic.config import JsonDict

from finetune_operator.api.base import ApiModel, Rule, TransitionRule
from finetune_operator.api.enums import (
    OFFLOAD_OPTIMIZERS,
    AttentionImpl,
    GangScheduling,
    Method,
    Offload,
    Optimizer,
    Phase,
    Precision,
    QuantType,
    ReportTo,
)
from finetune_operator.api.methods import SETTINGS_RULES, SPEC_RULES

GROUP = "finetune.dev"
VERSION = "v1alpha1"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SHORT_NAMES = ("ftj",)
CATEGORIES = ("all", "finetune")

URI_DESCRIPTION = (
    "Where it lives: pvc://CLAIM/PATH (mounted into the workers), hf://ORG/NAME (read from the hub), or a "
    "local path / file:// URI (ftctl train, or a path inside the trainer image). s3:// is refused until "
    "the trainer can sync from object storage."
)
#: s3:// stays in the grammar so that such a URI gets NOT_S3's message rather than a bare pattern error.
URI_PATTERN = (
    r"^(pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?|s3://[^/\s]+(/\S*)?|hf://\S+|file://\S+|/\S*|\.{1,2}/\S*)$"
)
INT_OR_STRING: JsonDict = {"x-kubernetes-int-or-string": True}
#: A non-negative resource.Quantity (apimachinery's grammar without a sign): 32, 500m, 256Gi, 1e3.
QUANTITY_PATTERN = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)(([KMGTPE]i)|[numkMGTPE]|[eE][0-9]+)?$"
Quantity = Annotated[
    str,
    Field(
        max_length=32, pattern=QUANTITY_PATTERN, description="A Kubernetes quantity, e.g. 32, 500m, 256Gi."
    ),
]
#: A Kubernetes label value: what Kueue's queue-name label holds.
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"

Uri = Annotated[str, Field(pattern=URI_PATTERN, max_length=1024, description=URI_DESCRIPTION)]

#: The trainer has no object-storage sync step: refuse s3:// at apply time, not when the pods start.
NOT_S3 = Rule(
    cel="!has(self.uri) || !self.uri.startsWith('s3://')",
    message="uri: s3:// is not supported yet; copy the data to a PVC and use pvc://CLAIM/PATH",
    check=lambda s: not (s.uri or "").startswith("s3://"),
)
#: Outputs and checkpoints are written; the hub is read-only to the trainer.
WRITABLE = Rule(
    cel="!has(self.uri) || !self.uri.startsWith('hf://')",
    message="uri: hf:// is read-only; write to pvc://CLAIM/PATH (push to the hub after the job)",
    check=lambda s: not (s.uri or "").startswith("hf://"),
)


# --- model --------------------------------------------------------------------------------------------


class ArchitectureSpec(ApiModel):
    """The numbers of a model's config.json that decide its memory; lets a job plan a model we don't know."""

    vocab_size: int = Field(ge=1, description="Vocabulary size (config.json vocab_size).")
    hidden_size: int = Field(ge=1, description="Hidden size (config.json hidden_size).")
    intermediate_size: int = Field(ge=1, description="MLP inner size (config.json intermediate_size).")
    num_layers: int = Field(ge=1, description="Transformer layers (config.json num_hidden_layers).")
    num_heads: int = Field(ge=1, description="Attention heads (config.json num_attention_heads).")
    num_kv_heads: int | None = Field(
        default=None,
        ge=1,
        alias="numKVHeads",
        description="Key/value heads for grouped-query attention (num_key_value_heads); default numHeads.",
    )
    tie_embeddings: bool = Field(
        default=False, description="Whether the LM head shares the embedding matrix (tie_word_embeddings)."
    )
    head_dim: int | None = Field(
        default=None, ge=1, description="Per-head size when not hiddenSize/numHeads."
    )
    mlp: Literal["gated", "plain"] = Field(
        default="gated",
        description="gated: SwiGLU/GeGLU with three matrices (Llama); plain: two (BERT, GPT-2).",
    )
    max_position_embeddings: int | None = Field(
        default=None,
        ge=1,
        description="Context length (max_position_embeddings); when set, dataset.maxSeqLength may not exceed it.",
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!has(self.numKVHeads) || self.numHeads % self.numKVHeads == 0",
            message="numKVHeads must divide numHeads",
            check=lambda s: s.num_kv_heads is None or s.num_heads % s.num_kv_heads == 0,
        ),
    )


class ModelSpec(ApiModel):
    """The base model to fine-tune."""

    name: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Hugging Face hub name (e.g. meta-llama/Llama-2-7b-hf); also selects the built-in "
        "architecture catalogue used for planning.",
    )
    uri: Uri | None = None
    revision: str | None = Field(
        default=None, max_length=256, description="Hub revision (branch, tag or commit)."
    )
    architecture: ArchitectureSpec | None = Field(
        default=None, description="Architecture numbers for planning when the name is not in the catalogue."
    )
    trust_remote_code: bool = Field(
        default=False, description="Run the model repository's own Python code. Off unless you trust it."
    )
    attention_implementation: AttentionImpl = Field(
        default=AttentionImpl.SDPA, description="Attention kernel: sdpa, flash_attention_2 or eager."
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="has(self.name) || has(self.uri)",
            message="set model.name (hub name) or model.uri (where the weights are)",
            check=lambda s: s.name is not None or s.uri is not None,
        ),
        NOT_S3,
    )


# --- data ---------------------------------------------------------------------------------------------


class DatasetSpec(ApiModel):
    """Training data and how to turn records into tokens."""

    uri: Uri
    format: Literal["alpaca", "sharegpt", "chat", "text", "classification"] = Field(
        default="alpaca",
        description="alpaca: instruction/input/output (through the chat template when the tokenizer has "
        "one, else the Stanford prompt); sharegpt or chat: a messages list through the chat template; text: "
        "plain language modelling; classification: text/label with a classification head.",
    )
    max_seq_length: int = Field(
        default=512, ge=8, le=1_048_576, description="Tokens per example after truncation (and packing)."
    )
    packing: bool = Field(
        default=False,
        description=(
            "Fill maxSeqLength blocks with whole examples (best-fit; plain text is cut into block-sized "
            "pieces first); position ids restart per example so packed examples never attend to each other."
        ),
    )
    padding_free: bool = Field(
        default=True,
        description=(
            "With flash_attention_2, batch unpacked examples one after another in a single row, position "
            "ids restarting per example, instead of right-padding them to the longest: no compute on "
            "padding, the same targets. SDPA and eager attention would pay for the row's length squared, so "
            "their batches stay padded, as do prefix and prompt tuning and classification."
        ),
    )
    validation_split: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="Fraction of the data held out for evaluation (0 = none)."
    )
    split: str = Field(default="train", max_length=64, description="Split to read from a hub data set.")
    num_labels: int | None = Field(default=None, ge=2, description="Classes, for the classification format.")

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.format != 'classification' || has(self.numLabels)",
            message="dataset.numLabels is required for the classification format",
            check=lambda s: s.format != "classification" or s.num_labels is not None,
        ),
        NOT_S3,
    )


# --- method -------------------------------------------------------------------------------------------


class LoraSpec(ApiModel):
    """PEFT LoraConfig fields; also used by qlora and dora."""

    r: int = Field(default=8, ge=1, le=4096, description="Rank of the update matrices.")
    alpha: int = Field(default=16, ge=1, description="Scaling numerator (lora_alpha); the update is alpha/r.")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        min_length=1,
        max_length=64,
        description="Module names to adapt (q_proj, v_proj, …) or the single entry all-linear.",
    )
    bias: Literal["none", "all", "lora_only"] = Field(default="none", description="Which biases train.")

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!has(self.targetModules) || !('all-linear' in self.targetModules) || "
            "size(self.targetModules) == 1",
            message="lora.targetModules: all-linear must be the only entry",
            check=lambda s: "all-linear" not in s.target_modules or len(s.target_modules) == 1,
        ),
    )


class QLoraSpec(ApiModel):
    """bitsandbytes 4-bit quantisation of the frozen base model (BitsAndBytesConfig)."""

    quant_type: QuantType = Field(default=QuantType.NF4, description="4-bit data type: nf4 or fp4.")
    double_quant: bool = Field(
        default=True, description="Quantise the quantisation constants too (~0.37 bit)."
    )
    compute_dtype: Precision = Field(
        default=Precision.BF16, description="Dtype the 4-bit matmuls compute in."
    )


class FreezeSpec(ApiModel):
    """Freeze tuning: only the last layers train."""

    trainable_layers: int = Field(default=2, ge=1, description="How many of the last decoder layers train.")
    train_embeddings: bool = Field(default=False, description="Also train the input embeddings.")


class VirtualTokensSpec(ApiModel):
    """Prefix and prompt tuning (PEFT PrefixTuningConfig / PromptTuningConfig)."""

    num_virtual_tokens: int = Field(default=20, ge=1, le=4096, description="Learned virtual tokens.")


class MethodSpec(ApiModel):
    """How the model is tuned. Each method reads only its own block; blocks of other methods are refused."""

    type: Method = Field(description="full, freeze, lora, qlora, dora, prefix or prompt.")
    lora: LoraSpec | None = Field(default=None, description="Adapter settings for lora, qlora and dora.")
    qlora: QLoraSpec | None = Field(default=None, description="Quantisation settings for qlora.")
    freeze: FreezeSpec | None = Field(default=None, description="Settings for freeze.")
    prefix: VirtualTokensSpec | None = Field(default=None, description="Settings for prefix.")
    prompt: VirtualTokensSpec | None = Field(default=None, description="Settings for prompt.")

    #: Each method reads only its own blocks (the method table in `api/methods.py`).
    rules: ClassVar[tuple[Rule, ...]] = SETTINGS_RULES

    def lora_settings(self) -> LoraSpec:
        """The adapter settings in force, PEFT's defaults where the block is left out."""
        return self.lora or LoraSpec()

    def qlora_settings(self) -> QLoraSpec:
        return self.qlora or QLoraSpec()

    def freeze_settings(self) -> FreezeSpec:
        return self.freeze or FreezeSpec()

    def virtual_tokens(self) -> int:
        block = self.prefix if self.type == Method.PREFIX else self.prompt
        return (block or VirtualTokensSpec()).num_virtual_tokens


# --- training -----------------------------------------------------------------------------------------


class EarlyStoppingSpec(ApiModel):
    """Stop when the evaluation metric stops improving (transformers EarlyStoppingCallback)."""

    patience: int = Field(default=3, ge=1, description="Evaluations without improvement before stopping.")
    threshold: float = Field(default=0.0, ge=0.0, description="Smallest change that counts as improvement.")
    metric: str = Field(default="eval_loss", max_length=128, description="Metric to watch (lower is better).")


class TrainingSpec(ApiModel):
    """Hyperparameters, named as HF TrainingArguments in camelCase."""

    epochs: float = Field(default=3.0, gt=0, le=1000, description="Passes over the data (num_train_epochs).")
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimizer steps.")
    learning_rate: float = Field(default=2.0e-4, gt=0, le=1.0, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        default="cosine", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Fraction of steps spent warming up."
    )
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0, description="Decoupled weight decay (AdamW).")
    max_grad_norm: float = Field(default=1.0, ge=0.0, description="Gradient clipping norm; 0 disables it.")
    micro_batch_size: int = Field(default=1, ge=1, le=4096, description="Examples per GPU per forward pass.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=4096, description="Micro batches per step.")
    precision: Precision = Field(default=Precision.BF16, description="bf16, fp16 (loss scaling) or fp32.")
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations in backward.")
    optimizer: Optimizer = Field(
        default=Optimizer.ADAMW, description="adamw, adamw_8bit, paged_adamw_8bit, sgd."
    )
    fused_optimizer: bool = Field(
        default=True,
        description="AdamW steps in torch's fused kernel (adamw_torch_fused), a few kernels for all "
        "parameters instead of several per tensor; false: the foreach implementation. Only adamw has "
        "one; under distributed.offload DeepSpeed's CPU Adam steps instead.",
    )
    pure_bf16: bool = Field(
        default=False,
        description="Train entirely in bf16: weights, gradients and AdamW's moments, with no fp32 master "
        "copy (LLaMA-Factory's pure_bf16; torchtune's and litgpt's bf16-true). A trained parameter costs 8 "
        "bytes on the GPU instead of 20; updates smaller than bf16 can hold are lost, which long runs at "
        "low learning rates feel. Needs precision bf16; not with distributed.offload.",
    )
    use_liger_kernel: bool = Field(
        default=True,
        description="On GPUs, Liger's Triton kernels for causal language models: the fused linear "
        "cross-entropy computes the loss in chunks and never holds the vocabulary-wide logits (the "
        "largest activation at a 128k vocabulary), plus fused RMSNorm, SwiGLU and RoPE. The estimate "
        "counts the smaller loss. Ignored on CPU, for classification and under ZeRO-3 (whose partitioned LM head "
        "the fused loss cannot read).",
    )
    seed: int = Field(default=42, ge=0, description="Random seed for data order and initialisation.")
    logging_steps: int = Field(default=10, ge=1, description="Report loss and progress every N steps.")
    eval_steps: int | None = Field(
        default=None, ge=1, description="Evaluate every N steps (default: per epoch)."
    )
    early_stopping: EarlyStoppingSpec | None = Field(
        default=None, description="Stop early on a plateau; needs dataset.validationSplit > 0."
    )
    report_to: list[ReportTo] = Field(
        default_factory=list,
        max_length=3,
        description="Experiment trackers rank 0 also logs to: tensorboard (event files in the output's runs/), "
        "mlflow (MLFLOW_TRACKING_URI, else a file store in the output's mlruns/) or wandb (offline into "
        "the output unless WANDB_API_KEY is set). The image must have the tracker's package; the trainer "
        "image ships tensorboard.",
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!has(self.pureBf16) || !self.pureBf16 || !has(self.precision) || self.precision == 'bf16'",
            message="training.pureBf16 needs training.precision bf16",
            check=lambda s: not s.pure_bf16 or s.precision == Precision.BF16,
        ),
    )


class CheckpointingSpec(ApiModel):
    """Checkpoints let a restarted gang resume where it stopped instead of at step 0."""

    save_steps: int = Field(default=200, ge=1, description="Save every N optimizer steps.")
    save_total_limit: int = Field(default=3, ge=1, description="Keep the newest N checkpoints.")
    uri: Uri | None = None

    rules: ClassVar[tuple[Rule, ...]] = (NOT_S3, WRITABLE)


# --- placement ----------------------------------------------------------------------------------------


class ResourcesSpec(ApiModel):
    """What GPUs the job runs on; the operator picks how many."""

    gpu_type: str | None = Field(
        default=None,
        max_length=64,
        description="GPU product (A100-80GB, H100-80GB, L40S, …); pods land on it.",
    )
    gpu_memory_gi_b: float | None = Field(
        default=None,
        gt=0,
        le=4096,
        alias="gpuMemoryGiB",
        description="Memory per GPU in GiB; overrides gpuType's and places pods on any GPU with at least this.",
    )
    gpus_per_node: int = Field(default=8, ge=1, le=64, description="GPUs a node offers; one worker per node.")
    gpus: int | Literal["auto"] = Field(
        default="auto",
        description="Total GPUs, or auto to use the fewest that fit in memory.",
        json_schema_extra=INT_OR_STRING,
    )
    memory_headroom: float = Field(
        default=0.08, ge=0.0, lt=0.9, description="Fraction of GPU memory the plan leaves free."
    )
    cpu: Quantity | None = Field(default=None, description="CPU request per worker (e.g. 32).")
    memory: Quantity | None = Field(default=None, description="Memory request per worker (e.g. 256Gi).")
    shared_memory: Quantity = Field(default="16Gi", description="Size of /dev/shm in each worker.")

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="has(self.gpuType) || has(self.gpuMemoryGiB)",
            message="set resources.gpuType or resources.gpuMemoryGiB",
            check=lambda s: s.gpu_type is not None or s.gpu_memory_gi_b is not None,
        ),
        Rule(
            cel="type(self.gpus) == string ? self.gpus == 'auto' : int(self.gpus) >= 1",
            message="resources.gpus must be a positive integer or auto",
            check=lambda s: s.gpus == "auto" or (isinstance(s.gpus, int) and s.gpus >= 1),
        ),
    )


class DistributedSpec(ApiModel):
    """DeepSpeed settings; auto lets the planner choose the fastest that fits."""

    zero_stage: int | Literal["auto"] = Field(
        default="auto", description="ZeRO stage 0-3, or auto.", json_schema_extra=INT_OR_STRING
    )
    offload: Offload | Literal["auto"] = Field(
        default=Offload.NONE,
        description="Move optimizer states (optimizer) or states and weights (all) to host.",
    )
    master_port: int = Field(default=29500, ge=1024, le=65535, description="torchrun rendezvous port.")

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="type(self.zeroStage) == string ? self.zeroStage == 'auto' : "
            "(int(self.zeroStage) >= 0 && int(self.zeroStage) <= 3)",
            message="distributed.zeroStage must be 0, 1, 2, 3 or auto",
            check=lambda s: (
                s.zero_stage == "auto" or (isinstance(s.zero_stage, int) and 0 <= s.zero_stage <= 3)
            ),
        ),
    )


class OutputSpec(ApiModel):
    """Where the trained adapter or model goes."""

    uri: Uri
    save_merged: bool = Field(default=False, description="Merge LoRA weights into the base model on save.")

    rules: ClassVar[tuple[Rule, ...]] = (NOT_S3, WRITABLE)


class RunPolicySpec(ApiModel):
    """Retries, deadlines, cleanup and queueing, as in Kubeflow's RunPolicy."""

    backoff_limit: int = Field(default=3, ge=0, le=100, description="Whole-gang restarts before Failed.")
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="Fail after this long running."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="Delete the job this long after it finishes."
    )
    suspend: bool = Field(
        default=False, description="Remove the workers but keep the job and its checkpoints."
    )
    termination_grace_period_seconds: int | None = Field(
        default=None,
        ge=1,
        le=604800,
        description="Seconds a worker gets after SIGTERM to write its checkpoint (default: the operator's, "
        "or longer when the plan's checkpoint needs it).",
    )
    progress_deadline_seconds: int | None = Field(
        default=None,
        ge=1,
        description="Seconds without a new training step, while every worker runs, before the job is marked "
        "Stalled (a hung collective, a dead data loader); the operator's default is 1800. Stalled does not "
        "stop the job: it raises the condition, an event and the FineTuneJobStalled alert.",
    )
    queue_name: str | None = Field(
        default=None,
        max_length=63,
        pattern=LABEL_VALUE_PATTERN,
        description="Kueue LocalQueue to admit through (a label value: at most 63 characters).",
    )
    gang_scheduling: GangScheduling | None = Field(
        default=None,
        description="coscheduling: place the workers all or nothing, as one scheduler-plugins PodGroup per "
        "attempt (a kube-scheduler with the Coscheduling plugin must run); none: the default scheduler "
        "places each worker as it can. Unset: the operator's default. Combines with queueName: Kueue admits "
        "the gang's quota, the PodGroup places it.",
    )
    schedule_timeout_seconds: int | None = Field(
        default=None,
        ge=1,
        le=86400,
        description="With coscheduling: seconds the placed workers wait for the rest of the gang before the "
        "scheduler releases them and tries the whole gang again (the PodGroup's scheduleTimeoutSeconds; "
        "default: the scheduler's).",
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!has(self.scheduleTimeoutSeconds) || !has(self.gangScheduling) || "
            "self.gangScheduling != 'none'",
            message="runPolicy.scheduleTimeoutSeconds: applies to gangScheduling coscheduling, not none",
            check=lambda s: s.schedule_timeout_seconds is None or s.gang_scheduling != GangScheduling.NONE,
        ),
    )


class SecretKeyRef(ApiModel):
    """A reference to one key of a Secret in the job's namespace (never a value)."""

    name: str = Field(min_length=1, max_length=253, description="Secret name.")
    key: str = Field(min_length=1, max_length=253, description="Key inside the Secret.")


class SecretsSpec(ApiModel):
    """Credentials by reference; the operator injects them into workers and never reads them."""

    hf_token: SecretKeyRef | None = Field(default=None, description="Hugging Face token (HF_TOKEN).")
    storage: str | None = Field(
        default=None,
        max_length=253,
        description="Secret whose keys become environment variables in every worker (e.g. for a "
        "custom data loader's credentials).",
    )


class EnvVar(ApiModel):
    """An extra environment variable for the trainer."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=256, description="Variable name.")
    value: str = Field(default="", max_length=32768, description="Literal value.")


class Toleration(ApiModel):
    """A pod toleration (core/v1 Toleration)."""

    key: str | None = Field(default=None, max_length=316, description="Taint key; empty matches all keys.")
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: str | None = Field(default=None, max_length=63, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; empty matches all."
    )
    toleration_seconds: int | None = Field(default=None, description="How long NoExecute is tolerated.")

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="has(self.key) || self.operator == 'Exists'",
            message="tolerations: a toleration without a key matches every taint and needs operator Exists",
            check=lambda s: s.key is not None or s.operator == "Exists",
        ),
        Rule(
            cel="self.operator != 'Exists' || !has(self.value)",
            message="tolerations: operator Exists takes no value",
            check=lambda s: s.operator != "Exists" or s.value is None,
        ),
    )


def _unchanged(block: str, what: str) -> TransitionRule:
    """`spec.<block>` is fixed once the job exists."""
    return TransitionRule(
        cel=f"self.{block} == oldSelf.{block}",
        message=f"spec.{block} cannot change once the job exists (its checkpoints belong to the old {what}); "
        "create a new FineTuneJob",
        check=lambda old, new: bool(getattr(old, block) == getattr(new, block)),
    )


def _training_field(spec: str, field: str) -> str:
    """CEL for one of a spec's training fields (by its API name), the API's default where it is left out."""
    default = next(f.default for f in TrainingSpec.model_fields.values() if f.alias == field)
    literal = f"'{default.value}'" if isinstance(default, Precision) else str(default).lower()
    return f"(has({spec}.training) && has({spec}.training.{field}) ? {spec}.training.{field} : {literal})"


class FineTuneJobSpec(ApiModel):
    """What to fine-tune, on what data, how, and with which resources."""

    model: ModelSpec = Field(description="The base model.")
    dataset: DatasetSpec = Field(description="The training data.")
    method: MethodSpec = Field(description="The fine-tuning method and its settings.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Hyperparameters.")
    checkpointing: CheckpointingSpec = Field(default_factory=CheckpointingSpec, description="Checkpoints.")
    resources: ResourcesSpec = Field(description="GPU type and count.")
    distributed: DistributedSpec = Field(default_factory=DistributedSpec, description="DeepSpeed settings.")
    output: OutputSpec = Field(description="Where results are written.")
    run_policy: RunPolicySpec = Field(default_factory=RunPolicySpec, description="Retries and lifecycle.")
    image: str | None = Field(
        default=None, max_length=512, description="Trainer image; default the operator's."
    )
    env: list[EnvVar] = Field(default_factory=list, max_length=128, description="Extra trainer environment.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Extra node labels workers need.")
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=64, description="Worker tolerations."
    )
    priority_class_name: str | None = Field(
        default=None, max_length=253, description="Worker priority class."
    )
    affinity: dict[str, Any] | None = Field(
        default=None,
        description="Worker affinity (core/v1 Affinity): its nodeAffinity replaces the GPU placement the "
        "operator derives from resources, its podAntiAffinity the operator's one-worker-per-node rule.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    scheduler_name: str | None = Field(
        default=None, max_length=253, description="Scheduler for the workers (default: the cluster's)."
    )
    image_pull_secrets: list[Annotated[str, Field(min_length=1, max_length=253)]] = Field(
        default_factory=list, max_length=32, description="Secrets to pull the trainer image with, by name."
    )
    pod_labels: dict[str, str] = Field(
        default_factory=dict, description="Extra labels on the worker pods (the operator's own win)."
    )
    pod_annotations: dict[str, str] = Field(
        default_factory=dict, description="Extra annotations on the worker pods (the operator's own win)."
    )
    service_account_name: str | None = Field(
        default=None,
        max_length=253,
        description="Service account for workers (default: the operator's trainer SA).",
    )
    secrets: SecretsSpec = Field(default_factory=SecretsSpec, description="Credentials, by reference only.")

    #: What a job's checkpoints are of: changing it could only resume from checkpoints of something else
    #: (another base model, adapter layout, data order or optimizer-state dtype), so it is fixed once
    #: the job exists, as a Kubernetes Job's template is. Everything else (learning rate, epochs,
    #: resources, ZeRO, run policy, …) may change; a running job restarts to apply it and resumes.
    transition_rules: ClassVar[tuple[TransitionRule, ...]] = (
        *(
            _unchanged(block, what)
            for block, what in (("model", "model"), ("method", "method"), ("dataset", "data"))
        ),
        TransitionRule(
            cel=f"{_training_field('self', 'precision')} == {_training_field('oldSelf', 'precision')}",
            message="spec.training.precision cannot change once the job exists (its optimizer states are "
            "in the old precision); create a new FineTuneJob",
            check=lambda old, new: bool(old.training.precision == new.training.precision),
        ),
        TransitionRule(
            cel=f"{_training_field('self', 'pureBf16')} == {_training_field('oldSelf', 'pureBf16')}",
            message="spec.training.pureBf16 cannot change once the job exists (its checkpoints hold optimizer "
            "states with or without fp32 master weights); create a new FineTuneJob",
            check=lambda old, new: bool(old.training.pure_bf16 == new.training.pure_bf16),
        ),
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!has(self.training) || !has(self.training.earlyStopping) || "
            "(has(self.dataset.validationSplit) && self.dataset.validationSplit > 0.0)",
            message="training.earlyStopping needs dataset.validationSplit > 0",
            check=lambda s: s.training.early_stopping is None or s.dataset.validation_split > 0,
        ),
        Rule(
            cel="!has(self.method.qlora) || !has(self.training) || !has(self.training.precision) || "
            "self.training.precision != 'fp16' || self.method.qlora.computeDtype != 'bf16'",
            message="method.qlora.computeDtype bf16 does not mix with training.precision fp16; use fp16 or bf16 for both",
            check=lambda s: (
                s.method.qlora is None
                or not (
                    s.training.precision == Precision.FP16 and s.method.qlora.compute_dtype == Precision.BF16
                )
            ),
        ),
        *SPEC_RULES,
        Rule(
            cel="!has(self.training) || !has(self.training.pureBf16) || !self.training.pureBf16 || "
            "!has(self.distributed) || !has(self.distributed.offload) || "
            "self.distributed.offload in ['none', 'auto']",
            message="training.pureBf16 does not run with distributed.offload optimizer/all (DeepSpeed's CPU "
            "Adam keeps fp32 states); use none or auto",
            check=lambda s: not s.training.pure_bf16 or s.distributed.offload in (Offload.NONE, "auto"),
        ),
        Rule(
            cel="!has(self.distributed) || !has(self.distributed.offload) || "
            "self.distributed.offload in ['none', 'auto'] || !has(self.training) || "
            "!has(self.training.optimizer) || self.training.optimizer == 'adamw'",
            message="distributed.offload optimizer/all needs training.optimizer adamw (DeepSpeed CPU Adam)",
            check=lambda s: (
                s.distributed.offload in (Offload.NONE, "auto") or s.training.optimizer in OFFLOAD_OPTIMIZERS
            ),
        ),
    )


# --- status -------------------------------------------------------------------------------------------


class Condition(ApiModel):
    """A Kubernetes condition (metav1.Condition)."""

    type: str = Field(max_length=316, description="Condition type, e.g. Planned, Running, Succeeded.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(default="", max_length=1024, description="CamelCase reason for the last change.")
    message: str = Field(default="", max_length=32768, description="Human-readable details.")
    last_transition_time: str | None = Field(default=None, description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(default=None, description="The spec generation this reflects.")


class PlanStatus(ApiModel):
    """What the planner chose and why it fits."""

    fits: bool = Field(description="Whether the per-GPU peak fits in usable GPU memory.")
    gpus: int = Field(ge=0, description="Total GPUs.")
    nodes: int = Field(ge=0, description="Worker pods (one per node).")
    gpus_per_node: int = Field(ge=0, description="GPUs per worker.")
    zero_stage: int = Field(ge=0, le=3, description="DeepSpeed ZeRO stage.")
    offload: Offload = Field(description="What ZeRO offloads to host memory.")
    gpu_type: str | None = Field(default=None, description="GPU product planned for.")
    per_gpu_bytes: int = Field(ge=0, description="Estimated peak memory per GPU.")
    usable_bytes: int = Field(ge=0, description="GPU memory less headroom.")
    memory_per_gpu: str | None = Field(
        default=None, description="The estimate against the usable memory, e.g. 14.7 GiB of 73.6 GiB."
    )
    host_bytes_per_node: int = Field(
        default=0, ge=0, description="Host memory offloaded states need per node."
    )
    worker_memory_bytes: int = Field(
        default=0, ge=0, description="Host memory each worker requests (offload, /dev/shm, processes)."
    )
    worker_ephemeral_storage_bytes: int = Field(
        default=0, ge=0, description="Local disk each worker requests (hub downloads, logs, compiled ops)."
    )
    checkpoint_seconds: int = Field(
        default=0, ge=0, description="Estimated time to write a checkpoint: the least termination grace."
    )
    breakdown: dict[str, int] = Field(
        default_factory=dict, description="Per-GPU bytes by component, at the peak moment."
    )
    peak_phase: str | None = Field(
        default=None,
        description="When the peak is reached: backward (activations alive) or optimizer_step (all gradients "
        "and the optimizer's temporaries; activations freed).",
    )
    estimate_margin: float | None = Field(
        default=None,
        description="How far published measured peaks of this method ran above the estimate at most "
        "(0.25 = 25%); a plan with less headroom than this says so in its message.",
    )
    total_params: int = Field(default=0, ge=0, description="Parameters in the model.")
    trainable_params: int = Field(default=0, ge=0, description="Parameters that train.")
    message: str = Field(default="", description="The planner's explanation.")


class WorkersStatus(ApiModel):
    """Worker pod counts by phase."""

    total: int = Field(default=0, ge=0, description="Workers the job wants.")
    pending: int = Field(default=0, ge=0, description="Workers not yet running.")
    running: int = Field(default=0, ge=0, description="Workers running.")
    succeeded: int = Field(default=0, ge=0, description="Workers that finished.")
    failed: int = Field(default=0, ge=0, description="Workers that failed.")


class ProgressStatus(ApiModel):
    """Training progress as reported by rank 0."""

    step: int = Field(default=0, ge=0, description="Optimizer steps done.")
    total_steps: int = Field(default=0, ge=0, description="Optimizer steps planned.")
    epoch: float = Field(default=0.0, ge=0, description="Epochs done (fractional).")
    percent: int = Field(default=0, ge=0, le=100, description="step / totalSteps in percent.")
    loss: float | None = Field(default=None, description="Latest training loss.")
    eval_loss: float | None = Field(default=None, description="Latest evaluation loss.")
    learning_rate: float | None = Field(default=None, description="Current learning rate.")
    tokens_per_second: float | None = Field(default=None, description="Training throughput, all GPUs.")
    peak_memory_bytes: int | None = Field(default=None, description="Measured peak GPU memory on rank 0.")
    peak_memory: str | None = Field(default=None, description="The same in GiB, e.g. 15.2 GiB.")
    eta: str | None = Field(default=None, description="Estimated time left, e.g. 1h02m (only while Running).")
    eta_seconds: int | None = Field(
        default=None, ge=0, description="The same in seconds, for tools and alerts."
    )
    display: str | None = Field(
        default=None, description="Percent and steps for kubectl get, e.g. 42% (420/1000)."
    )
    updated_at: str | None = Field(default=None, description="When rank 0 last reported (RFC 3339).")
    tokens: int | None = Field(
        default=None, description="Input tokens trained on over all workers (restored on resume)."
    )
    step_updated_at: str | None = Field(
        default=None,
        description="When the operator first saw the current step (RFC 3339): the Stalled clock starts here.",
    )


class CheckpointStatus(ApiModel):
    """The newest complete checkpoint."""

    step: int = Field(ge=0, description="Step it was saved at.")
    path: str = Field(description="Where it is.")
    time: str | None = Field(default=None, description="When it was saved (RFC 3339).")


class FineTuneJobStatus(ApiModel):
    """Observed state, written only by the operator."""

    phase: Phase | None = Field(
        default=None,
        description="Pending, Queued, Scheduling, Running, Restarting, Suspended, Succeeded, Failed.",
    )
    conditions: list[Condition] = Field(default_factory=list, description="Latest observations.")
    observed_generation: int | None = Field(default=None, description="The spec generation last acted on.")
    plan: PlanStatus | None = Field(default=None, description="The resource plan.")
    workers: WorkersStatus | None = Field(default=None, description="Worker pod counts.")
    progress: ProgressStatus | None = Field(default=None, description="Training progress.")
    restarts: int = Field(
        default=0,
        ge=0,
        description="Whole-gang restarts after the trainer's own failures (runPolicy.backoffLimit).",
    )
    disruptions: int = Field(
        default=0,
        ge=0,
        description="Whole-gang restarts after Kubernetes ended a worker (preemption, eviction, drain, node "
        "loss, a deleted worker): not counted against runPolicy.backoffLimit.",
    )
    relaunches: int = Field(
        default=0,
        ge=0,
        description="Gangs replaced whole with nothing wrong: on resume, and for a spec change that changes "
        "the workers. Each gang gets its own attempt number (and Kueue pod group).",
    )
    last_restart_time: str | None = Field(
        default=None,
        description="When the gang was last restarted (RFC 3339): the restart backoff counts from here.",
    )
    last_checkpoint: CheckpointStatus | None = Field(default=None, description="Newest complete checkpoint.")
    start_time: str | None = Field(
        default=None,
        description=(
            "When the activeDeadlineSeconds clock started (RFC 3339): when workers were first created, or "
            "for a job in a Kueue queue when its gang was admitted (time spent queued is not charged)."
        ),
    )
    completion_time: str | None = Field(default=None, description="When the job finished (RFC 3339).")
    message: str | None = Field(default=None, description="Summary of the current state.")

    @property
    def attempt(self) -> int:
        """The current gang's number (its pods' finetune.dev/attempt label): every whole-gang restart, for
        a failure, a disruption, a resume or a spec change, starts the next one."""
        return self.restarts + self.disruptions + self.relaunches


class ObjectMeta(ApiModel):
    """The metadata fields ftctl reads; the API server owns the rest."""

    model_config = ApiModel.model_config | {"extra": "allow"}

    name: str = Field(default="finetunejob", description="Object name.")
    namespace: str | None = Field(default=None, description="Object namespace.")
    generation: int | None = Field(default=None, description="Spec generation.")
    uid: str | None = Field(default=None, description="Object UID.")


class FineTuneJob(ApiModel):
    """A fine-tuning job: the operator plans GPUs and ZeRO, runs the workers and reports progress."""

    api_version: Literal["finetune.dev/v1alpha1"] = Field(
        default="finetune.dev/v1alpha1", description="API version."
    )
    kind: Literal["FineTuneJob"] = Field(default="FineTuneJob", description="FineTuneJob.")
    metadata: ObjectMeta = Field(default_factory=ObjectMeta, description="Standard object metadata.")
    spec: FineTuneJobSpec = Field(description="Desired job.")
    status: FineTuneJobStatus | None = Field(default=None, description="Observed state.")


def parse_job(document: dict[str, Any]) -> FineTuneJob:
    """Validate a FineTuneJob document (raises pydantic.ValidationError naming the camelCase fields)."""
    return FineTuneJob.model_validate(document)
