"""Memory ledger: where the bytes of a fine-tuning run go, term by term, before running it.

Mixed-precision Adam keeps 16 bytes per trainable parameter (Rajbhandari et al. 2019, ZeRO,
arXiv 1910.02054, section 3.1, in fp16; bf16 has the same widths): bf16 weight 2 + bf16
gradient 2 + fp32 master weight 4 + Adam m 4 + Adam v 4. Full fine-tuning pays 16 * P for
all P parameters; LoRA pays 2 * P for the frozen base plus 16 * P_lora for the adapters,
P_lora = sum of r * (d + k); QLoRA (Dettmers et al. 2023, arXiv 2305.14314) stores the base's
linear weights in 4-bit NF4 with per-block scales, bits_per_param(block_size, double_quant)
bits each. DoRA (Liu et al. 2024, arXiv 2402.09353) is LoRA plus a magnitude of d numbers per
adapted [d, k] linear, r * (d + k) + d trained, on the frozen base ("dora") or on QLoRA's
("qdora"); its rescale keeps V x [tokens, d] per adapted linear for the backward.

Activations are counted op by op by lora_edu.memory.activations: what autograd keeps for this
architecture (LLaMA: RMSNorm, SwiGLU, fused attention that never stores the T x T scores of a
T-token sequence), equal to the byte to what TinyLlama saves (tests/test_memory.py). LoRA
keeps almost as much as full fine-tuning: backprop still runs through the whole base, and
only the inputs that frozen weights would need for their own gradients are spared.
activation_bytes gives the older one-formula estimate of Korthikanti et al. 2022, arXiv
2205.05198, eq. 1, derived for GPT (4h GeLU FFN, dropout, stored attention scores), for
comparison.

Sharding (ZeRO, FSDP), CPU offload and paged optimizers move these bytes elsewhere; DeepSpeed
and bitsandbytes handle them, and this ledger counts one GPU holding everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..quant.sizes import scale_bytes
from .activations import (DORA_METHODS, METHODS, NF4_METHODS, TERMS as ACTIVATION_TERMS, recompute_bytes,
                          saved_activation_terms)
from .spec import ModelSpec, _unknown, count_params, linear_shapes, lora_params_for


def activation_bytes(spec: ModelSpec, batch: int, seq_len: int, checkpointing: bool = False) -> float:
    """Korthikanti et al. 2022 estimate of the decoder layers' activations, in bytes.

    Written in the paper's symbols: s is the sequence length (the book's T), b the batch,
    h the hidden size, a the number of heads. The logits, s * b * vocab, are left out.
    """
    s, b, h, a = seq_len, batch, spec.hidden_size, spec.n_heads
    one_layer = s * b * h * (34 + 5 * a * s / h)  # eq. 1, 16-bit activations, no recomputation
    if not checkpointing:
        return spec.n_layers * one_layer
    # each layer's input, plus one layer's activations rebuilt at a time during backward
    return spec.n_layers * 2 * s * b * h + one_layer


# bytes per parameter: (weight, gradient, fp32 master copy, one optimizer state).
# bf16_fp32_states is what the QLoRA paper's code (artidoro/qlora) trains its adapters with:
# LoRA layers cast to bf16 (eq. 5 computes X L1 L2 in bf16) and bitsandbytes' paged 32-bit
# AdamW, whose states are float32 whatever the parameter's dtype, applied with no master copy.
POLICIES = {
    "mixed_fp32_master": (2, 2, 4, 4),  # bf16 compute copy, fp32 master and states (ZeRO's 16 B)
    "autocast_fp32": (4, 4, 0, 4),  # torch.autocast: fp32 weights and grads, bf16 only inside ops
    "bf16_fp32_states": (2, 2, 0, 4),  # bf16 weights and grads, fp32 states, no master: QLoRA's adapters
    "pure_bf16": (2, 2, 0, 2),  # everything bf16; cheapest, but small updates can round away
    "fp32": (4, 4, 0, 4),  # everything float32 (CPU training; PEFT's adapters on any base)
}
# bytes per activation element under each policy (autocast runs the matmuls, and so most
# saved tensors, in bf16; mixed precision computes in the bf16 copy)
ACTIVATION_BYTES = {"mixed_fp32_master": 2, "autocast_fp32": 2, "bf16_fp32_states": 2, "pure_bf16": 2, "fp32": 4}
OPTIMIZER_STATES = {"adam": 2, "sgd": 0}  # Adam keeps m and v; plain SGD (no momentum) nothing


@dataclass
class Ledger:
    """Bytes of one training setup, one term per field; .total adds them up."""

    label: str  # method / policy / optimizer, for the table header
    weights: float = 0  # model weights as stored (4-bit codes for QLoRA's linears)
    gradients: float = 0  # gradients of the base weights (zero when frozen)
    master_weights: float = 0  # fp32 copy the optimizer updates under mixed precision
    optimizer_states: float = 0  # Adam m and v of the base weights
    lora_weights: float = 0  # the adapters A and B (and DoRA's magnitude)
    lora_gradients: float = 0
    lora_master_weights: float = 0
    lora_optimizer_states: float = 0
    quant_constants: float = 0  # QLoRA's per-block absmax scales (and their own scales)
    activations: float = 0  # saved for the backward, all layers (lora_edu.memory.activations)
    recomputed_layer: float = 0  # checkpointing: one layer's activations, rebuilt in the backward
    activation_terms: dict = field(default_factory=dict, repr=False)  # activations, by term

    def terms(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("label", "activation_terms")}

    @property
    def total(self) -> float:
        return sum(self.terms().values())

    def __str__(self):
        rows = [f"{self.label}", f"{'term':<22}{'GB':>9}"]
        rows += [f"{name:<22}{b / 1e9:>9.2f}" for name, b in self.terms().items() if b]
        return "\n".join(rows + [f"{'total':<22}{self.total / 1e9:>9.2f}"])


def estimate_memory(spec: ModelSpec, method: str = "full", policy: str = "mixed_fp32_master",
                    optimizer: str = "adam", r: int = 8, targets=("q", "k", "v", "o"),
                    block_size: int = 64, double_quant: bool = True, batch: int = 0,
                    seq_len: int = 0, checkpointing: bool = False, adapter_policy: str | None = None) -> Ledger:
    """Itemised bytes for fine-tuning `spec` on one device. 1 GB here is 1e9 bytes.

    method: "full", "lora", "qlora", or DoRA on the frozen base ("dora") or the NF4 one ("qdora").
    policy sets the bytes of the trained weights (and of the frozen base's weights);
    adapter_policy, if given, those of the LoRA adapters: "fp32" is what PEFT and lora_edu
    do on a 16-bit base (the tutorial's table keeps them under the mixed policy instead;
    both come to 16 bytes per adapter parameter with Adam, but fp32 adapters, without
    torch.autocast, also keep a float32 copy of each adapted layer's input),
    "bf16_fp32_states" what the QLoRA paper's code does (12 bytes). Activations are counted
    when batch and seq_len are given.
    """
    if method not in METHODS:
        raise _unknown("method", method, METHODS)
    for name, value in (("policy", policy), ("adapter_policy", adapter_policy or policy)):
        if value not in POLICIES:
            raise _unknown(name.replace("_", " "), value, POLICIES)
    if optimizer not in OPTIMIZER_STATES:
        raise _unknown("optimizer", optimizer, OPTIMIZER_STATES)
    for name, value in (("batch", batch), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if bool(batch) != bool(seq_len):
        raise ValueError(f"give both batch and seq_len for the activations (got batch={batch}, seq_len={seq_len}), "
                         "or neither to leave activations out")
    w, g, m, s = POLICIES[policy]
    n_states = OPTIMIZER_STATES[optimizer]
    P = count_params(spec)
    adapters = f" (adapters {adapter_policy})" if adapter_policy and method != "full" else ""
    led = Ledger(label=f"{method} / {policy}{adapters} / {optimizer}")
    if method != "full":
        P_lora = lora_params_for(spec, targets, r, dora=method in DORA_METHODS)  # checks targets and r
        aw, ag, am, as_ = POLICIES[adapter_policy or policy]
        led.lora_weights, led.lora_gradients, led.lora_master_weights = P_lora * aw, P_lora * ag, P_lora * am
        led.lora_optimizer_states = P_lora * n_states * as_
    if batch:
        act = dict(method=method, targets=targets, r=r, act_bytes=ACTIVATION_BYTES[policy],
                   adapter_bytes=POLICIES[adapter_policy or policy][0])
        led.activation_terms = saved_activation_terms(spec, batch, seq_len, checkpointing=checkpointing, **act)
        led.activations = sum(led.activation_terms.values())
        if checkpointing:
            led.recomputed_layer = recompute_bytes(spec, batch, seq_len, **act)
    if method == "full":
        led.weights, led.gradients, led.master_weights = P * w, P * g, P * m
        led.optimizer_states = P * n_states * s
    elif method not in NF4_METHODS:  # lora, dora
        led.weights = P * w  # frozen base, still resident
    else:
        # QLoRA (and QDoRA) quantizes every decoder linear; embeddings, norms and lm_head stay at the weight
        # width w (2 B in bf16). HF PEFT's prepare_model_for_kbit_training upcasts those to fp32.
        shapes = linear_shapes(spec, "all-linear")
        Q = sum(d * k for d, k in shapes)
        led.weights = sum(-(-d * k // 2) for d, k in shapes) + (P - Q) * w  # 4-bit codes, two per byte
        # absmax scales, about bits_per_param(block_size, double_quant) - 4 bits per weight:
        # 0.5 bit, or ~0.127 with double quantization
        led.quant_constants = sum(scale_bytes(d * k, block_size, double_quant) for d, k in shapes)
    return led
