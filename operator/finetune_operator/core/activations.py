"""Activation memory: the tensors autograd saves for backward, counted per token per block.

Counted the way PyTorch + HF Transformers + PEFT actually save them, not with Korthikanti et al.'s
GPT-3 constant (`34·s·b·h` bytes per layer assumes a GELU MLP and dropout, which Llama-style models lack):

- each RMSNorm upcasts its input to fp32 and saves it (4·h bytes), plus the normalised tensor when its
  weight trains;
- a linear layer saves its input only when its weight (or a LoRA adapter on it) needs a gradient;
- attention (SDPA / FlashAttention) saves q, k, v and the output; HF's SDPA path repeats grouped K/V heads
  to full width before the kernel, FlashAttention-2 does not; eager attention also saves the fp32 softmax
  and its 16-bit copy, `heads·s_kv` per token each;
- a SwiGLU MLP saves gate, act(gate) and up (three `intermediate` tensors), plus their product when
  `down_proj` trains; a GELU MLP saves its pre- and post-activation;
- LoRA saves its r-wide intermediate; with dropout above 0 each adapter also saves its own dropped-out
  copy of the module's input and the one-byte mask (PEFT's `lora_A(dropout(x))`; the shared input stays
  counted too, which errs high by one copy); DoRA also saves the base and LoRA outputs that the magnitude
  scales;
- the loss: HF keeps the 16-bit logits in the model output, upcasts them to fp32, and cross-entropy
  keeps its fp32 log-softmax; in backward two more fp32 vocab-wide gradients exist at once. That is
  `(a + 12)·vocab` bytes per token (a = activation bytes), usually the largest single term. Liger's
  fused linear cross-entropy (`training.useLigerKernel`) never holds the logits: `3·a·h + 4` per token.

Gradient checkpointing (full recomputation per block) keeps each block's input (`a·h` per token) and,
during backward, one block's full activations at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune_operator.api.enums import AttentionImpl
from finetune_operator.core.architecture import ModelArchitecture
from finetune_operator.core.methods.base import MethodFootprint


@dataclass(frozen=True)
class ActivationEstimate:
    """`saved` lives through the whole backward; the loss peak (start of backward) and one block's
    backward working set (later, after the loss tensors are freed) never coexist, so only the larger
    of the two adds to the peak."""

    saved: int
    loss: int
    working: int

    @property
    def total(self) -> int:
        return self.saved + max(self.loss, self.working)


def block_bytes_per_token(
    arch: ModelArchitecture,
    fp: MethodFootprint,
    act_bytes: int,
    attention: AttentionImpl,
    kv_len: int,
) -> int:
    """Bytes saved for backward by one block in the gradient path, per token of the micro batch."""
    a, h, i = act_bytes, arch.hidden_size, arch.intermediate_size
    shapes = arch.linear_shapes()

    def needs_input(module: str) -> bool:
        return module in fp.trained_modules or module in fp.adapters

    total = arch.norms_per_layer * 4 * h
    if fp.norms_trained:
        total += arch.norms_per_layer * a * h
    if any(needs_input(m) for m in ("q_proj", "k_proj", "v_proj")):
        total += a * h
    # q, k, v as the attention kernel sees them, and its output.
    kv_width = arch.kv_dim if attention == AttentionImpl.FLASH_ATTENTION_2 else arch.q_dim
    total += a * (2 * arch.q_dim + 2 * kv_width)
    if attention == AttentionImpl.EAGER:
        total += (4 + a) * arch.num_heads * kv_len
    if needs_input("o_proj"):
        total += a * arch.q_dim
    # MLP: gated saves gate, act(gate), up; plain saves the pre-activation.
    total += a * i * (3 if arch.mlp == "gated" else 1)
    if needs_input("down_proj"):
        total += a * i
    # gate and up read the second norm's output; one saved copy serves both.
    if any(needs_input(m) for m in ("gate_proj", "up_proj")):
        total += a * h
    if arch.kind == "encoder":
        total += 2 * h  # BERT's two hidden-dropout masks (one byte per element)
    for module, rank in fp.adapters.items():
        total += a * rank
        if fp.adapter_dropout:
            total += (a + 1) * shapes[module][0]
        if fp.dora:
            total += 2 * a * shapes[module][1]
    return total


def block_working_bytes_per_token(arch: ModelArchitecture, act_bytes: int) -> int:
    """Gradients of one block's intermediates in flight during its backward (about two MLP-wide tensors)."""
    return act_bytes * (2 * arch.intermediate_size + 2 * arch.hidden_size)


def loss_bytes_per_token(arch: ModelArchitecture, act_bytes: int, *, fused: bool = False) -> int:
    """Peak of the loss at the start of backward; encoders are fine-tuned with a small classifier head.

    Liger's fused linear cross-entropy (`fused`) computes the loss and its gradients in forward, a chunk
    of tokens at a time, sized so a chunk's logits are about `2·hidden` wide per token: what stays is the
    gradient of the final hidden states (`hidden` per token), the chunk's logits and fp32 per-token loss.
    """
    if arch.kind == "encoder":
        return 0
    if fused:
        return 3 * act_bytes * arch.hidden_size + 4
    return (act_bytes + 12) * arch.vocab_size if act_bytes == 2 else 16 * arch.vocab_size


def activation_bytes(
    arch: ModelArchitecture,
    fp: MethodFootprint,
    *,
    act_bytes: int,
    attention: AttentionImpl,
    micro_batch: int,
    seq_len: int,
    checkpointing: bool,
    fused_loss: bool = False,
) -> ActivationEstimate:
    """Peak activation bytes of one micro batch on one GPU."""
    seq = seq_len + fp.extra_seq_tokens
    kv_len = seq + fp.extra_kv_tokens
    tokens = micro_batch * seq
    grad_blocks = arch.num_layers - fp.first_grad_layer
    per_block = block_bytes_per_token(arch, fp, act_bytes, attention, kv_len)
    # HF materialises a 4D additive mask (batch × 1 × seq × kv_len) for SDPA and eager attention.
    mask = 0 if attention == AttentionImpl.FLASH_ATTENTION_2 else micro_batch * seq * kv_len * act_bytes
    final_norm = 4 * arch.hidden_size + (act_bytes * arch.hidden_size if fp.head_trained else 0)
    loss = loss_bytes_per_token(arch, act_bytes, fused=fused_loss) * tokens
    if fused_loss and arch.kind != "encoder":
        loss += 2 * arch.vocab_size * act_bytes  # a chunk rounds up to a power of two tokens
    working = block_working_bytes_per_token(arch, act_bytes) * tokens + fp.dequant_elems * act_bytes
    if checkpointing:
        # Each block keeps its input; during backward one block is recomputed beside the other blocks'
        # checkpoints (its own input is among its recomputed activations, so it is not counted twice).
        saved = max(grad_blocks - 1, 0) * act_bytes * arch.hidden_size * tokens
        working += per_block * tokens if grad_blocks else 0
    else:
        saved = grad_blocks * per_block * tokens
    return ActivationEstimate(saved=saved + mask + final_norm * tokens, loss=loss, working=working)
