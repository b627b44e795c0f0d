"""Model shapes the estimator needs, read from a Hugging Face config.json or from the bundled catalogue.

The estimator never downloads weights: every byte it predicts follows from these few integers, so the
catalogue (`data/models.json`) copies them from each model's published config.json rather than from
parameter counts in model cards, which round.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal


class UnknownModelError(ValueError):
    """A model name the catalogue does not hold; the message lists the closest names."""


@dataclass(frozen=True)
class ModelArchitecture:
    """The shape of a decoder (Llama family) or encoder (BERT) transformer.

    `head_dim` is set only where it is not `hidden_size // num_heads` (Gemma 2, Llama 3.2 keep it explicit).
    `norms_per_layer` is 4 for Gemma 2 (pre- and post-norms around attention and MLP), 2 elsewhere.
    `linear_bias` means every linear layer has a bias (BERT); `qkv_bias` only q/k/v do (Qwen2).
    `type_vocab_size` > 0 marks BERT-style token-type embeddings; encoders also learn position embeddings.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tie_embeddings: bool
    mlp: Literal["gated", "plain"] = "gated"
    kind: Literal["causal_lm", "encoder"] = "causal_lm"
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norms_per_layer: int = 2
    qkv_bias: bool = False
    linear_bias: bool = False
    type_vocab_size: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}"
            )

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def q_dim(self) -> int:
        """Width of the query projection (differs from hidden_size in Gemma 2)."""
        return self.num_heads * self.dim_per_head

    @property
    def kv_dim(self) -> int:
        """Width of the key and of the value projection: below q_dim under grouped-query attention."""
        return self.num_kv_heads * self.dim_per_head

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one block, keyed by canonical module name.

        Canonical names are the Llama ones; `methods.lora` maps BERT and Phi-3 module names onto them.
        A plain (GELU) MLP has no `gate`.
        """
        h, i = self.hidden_size, self.intermediate_size
        shapes = {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }
        if self.mlp == "gated":
            shapes["gate_proj"] = (h, i)
        return shapes

    def layer_params(self) -> int:
        """Parameters of one transformer block: linear weights, biases and norm weights (and biases)."""
        shapes = self.linear_shapes()
        weights = sum(fan_in * fan_out for fan_in, fan_out in shapes.values())
        if self.linear_bias:
            biases = sum(fan_out for _, fan_out in shapes.values())
        elif self.qkv_bias:
            biases = self.q_dim + 2 * self.kv_dim
        else:
            biases = 0
        per_norm = 2 if self.norm == "layernorm" else 1
        return weights + biases + self.norms_per_layer * per_norm * self.hidden_size

    def embedding_params(self) -> int:
        """Input embeddings, plus learned positions, token types and their norm for BERT-style encoders."""
        params = self.vocab_size * self.hidden_size
        if self.kind == "encoder":
            params += (self.max_position_embeddings + self.type_vocab_size + 2) * self.hidden_size
        return params

    def head_params(self) -> int:
        """What sits after the last block: the final norm and an untied LM head; BERT's pooler instead."""
        if self.kind == "encoder":
            return self.hidden_size * self.hidden_size + self.hidden_size
        final_norm = self.hidden_size
        lm_head = 0 if self.tie_embeddings else self.vocab_size * self.hidden_size
        return final_norm + lm_head

    def total_params(self) -> int:
        return self.embedding_params() + self.num_layers * self.layer_params() + self.head_params()

    def largest_layer_params(self) -> int:
        """The largest single module's own parameters, as DeepSpeed's ZeRO-3 estimator defines it."""
        linear = max(fan_in * fan_out for fan_in, fan_out in self.linear_shapes().values())
        return max(self.vocab_size * self.hidden_size, linear)


_MODEL_TYPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2": {"qkv_bias": True},
    "gemma2": {"norms_per_layer": 4},
    "bert": {"mlp": "plain", "kind": "encoder", "norm": "layernorm", "linear_bias": True, "qkv_bias": True},
}
_SUPPORTED = ("llama", "mistral", "qwen2", "gemma2", "phi3", "bert")


def architecture_from_hf_config(config: Mapping[str, Any]) -> ModelArchitecture:
    """Read the fields every supported family names the same way, plus each family's quirks.

    Families outside `_SUPPORTED` are refused rather than guessed: a wrong shape gives a confident,
    wrong memory estimate, which is worse than an error.
    """
    model_type = str(config.get("model_type", ""))
    if model_type not in _SUPPORTED:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(_SUPPORTED)}")
    try:
        heads = int(config["num_attention_heads"])
        fields: dict[str, Any] = {
            "vocab_size": int(config["vocab_size"]),
            "hidden_size": int(config["hidden_size"]),
            "intermediate_size": int(config["intermediate_size"]),
            "num_layers": int(config["num_hidden_layers"]),
            "num_heads": heads,
            "num_kv_heads": int(config.get("num_key_value_heads") or heads),
            # BERT ties its MLM decoder to the word embeddings; decoders default to tying in HF too.
            "tie_embeddings": bool(config.get("tie_word_embeddings", True)),
            "max_position_embeddings": int(config.get("max_position_embeddings", 4096)),
        }
    except KeyError as exc:
        raise ValueError(f"config.json lacks {exc.args[0]!r}") from exc
    fields.update(_MODEL_TYPE_DEFAULTS.get(model_type, {}))
    head_dim = config.get("head_dim")
    if head_dim is not None and int(head_dim) * heads != fields["hidden_size"]:
        fields["head_dim"] = int(head_dim)
    if config.get("attention_bias"):
        fields["qkv_bias"] = True
    if config.get("mlp_bias"):
        fields["linear_bias"] = True
    if model_type == "bert":
        fields["type_vocab_size"] = int(config.get("type_vocab_size", 2))
    return ModelArchitecture(**fields)


def load_hf_config(path: Path) -> ModelArchitecture:
    """A config.json file, or a model directory (as `save_pretrained` writes it) holding one."""
    file = path / "config.json" if path.is_dir() else path
    with file.open(encoding="utf-8") as handle:
        config = json.load(handle)
    if not isinstance(config, dict):
        raise ValueError(f"{file} does not hold a JSON object")
    return architecture_from_hf_config(config)


@cache
def _catalogue() -> tuple[dict[str, ModelArchitecture], dict[str, str]]:
    """(architectures by lower-cased name, display name by lower-cased name), aliases included."""
    raw = json.loads(
        resources.files("finetune_operator.core").joinpath("data/models.json").read_text("utf-8")
    )
    by_key: dict[str, ModelArchitecture] = {}
    display: dict[str, str] = {}
    for name, fields in raw["models"].items():
        by_key[name.lower()] = ModelArchitecture(**fields)
        display[name.lower()] = name
    for alias, target in raw["aliases"].items():
        by_key[alias.lower()] = by_key[target.lower()]
        display[alias.lower()] = alias
    return by_key, display


def catalogue_names() -> list[str]:
    """Every name the catalogue answers to (hub names and their aliases), sorted."""
    return sorted(_catalogue()[1].values())


def catalogue_architecture(name: str) -> ModelArchitecture:
    """Case-insensitive lookup; a miss names up to five close matches so a typo is a one-step fix."""
    by_key, display = _catalogue()
    key = name.strip().lower()
    if key in by_key:
        return by_key[key]
    # A bare name such as "Llama-2-7b-hf" resolves when exactly one organisation publishes it.
    bare = [k for k in by_key if k.split("/")[-1] == key]
    if len(bare) == 1:
        return by_key[bare[0]]
    close = difflib.get_close_matches(key, list(by_key), n=5, cutoff=0.5)
    hint = (
        f"did you mean: {', '.join(display[k] for k in close)}"
        if close
        else "`ftctl models` lists the catalogue"
    )
    raise UnknownModelError(f"unknown model {name!r}; {hint}")
