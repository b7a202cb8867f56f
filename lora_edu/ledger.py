"""Memory ledger: where the bytes of a fine-tuning run go, term by term, before running it.

Mixed-precision Adam keeps 16 bytes per trainable parameter (Rajbhandari et al. 2019, ZeRO,
arXiv 1910.02054, section 3.1): bf16 weight 2 + bf16 gradient 2 + fp32 master weight 4 +
Adam m 4 + Adam v 4. Full fine-tuning pays 16 * P for all P parameters; LoRA pays 2 * P for
the frozen base plus 16 * P_lora for the adapters, P_lora = sum of r * (d + k); QLoRA
(Dettmers et al. 2023, arXiv 2305.14314) stores the base's linear weights in 4-bit NF4 with
per-block scales, bits_per_param(block_size, double_quant) bits each.

Activations are counted op by op by lora_edu.activations: what autograd keeps for this
architecture (LLaMA: RMSNorm, SwiGLU, fused attention that never stores the s x s scores),
equal to the byte to what TinyLlama saves (tests/test_memory.py). LoRA keeps almost as much
as full fine-tuning: backprop still runs through the whole base, and only the inputs that
frozen weights would need for their own gradients are spared. activation_bytes gives the
older one-formula estimate of Korthikanti et al. 2022, arXiv 2205.05198, eq. 1, derived for
GPT (4h GeLU FFN, dropout, stored attention scores), for comparison.

Sharding (ZeRO, FSDP), CPU offload and paged optimizers move these bytes elsewhere; DeepSpeed
and bitsandbytes handle them, and this ledger counts one GPU holding everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from torch import nn

from .activations import TERMS as ACTIVATION_TERMS, recompute_bytes, saved_activation_terms
from .inject import lora_param_count
from .quantized import scale_bytes


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a LLaMA-family decoder: RMSNorm (weight only), linear layers without bias, RoPE."""

    hidden_size: int  # width of the residual stream, h
    n_layers: int  # decoder layers, L
    n_heads: int  # query heads, a; head size = hidden_size // n_heads
    ffn_size: int  # FFN inner width (intermediate_size in HF)
    vocab_size: int  # rows of the embedding and of lm_head
    n_kv_heads: int = None  # key/value heads; < n_heads is grouped-query attention; None: n_heads
    tie_embeddings: bool = False  # lm_head shares the embedding matrix (LLaMA does not)
    gated_ffn: bool = True  # SwiGLU gate/up/down (LLaMA); False: a two-matrix up/down FFN

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)  # frozen: set it once, here
        for name in ("hidden_size", "n_layers", "n_heads", "ffn_size", "vocab_size", "n_kv_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelSpec.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.n_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads


PRESETS = {
    # LLaMA 1: dims, heads, layers from Touvron et al. 2023, arXiv 2302.13971, Table 2;
    # ffn_size (intermediate_size) and vocab from the config.json of the HF conversions.
    "llama-7b": ModelSpec(4096, 32, 32, 11008, 32000),
    "llama-13b": ModelSpec(5120, 40, 40, 13824, 32000),
    "llama-33b": ModelSpec(6656, 60, 52, 17920, 32000),
    "llama-65b": ModelSpec(8192, 80, 64, 22016, 32000),
    # config.json of meta-llama/Meta-Llama-3-8B on the HF Hub (Llama 3 model card, April 2024)
    "llama-3-8b": ModelSpec(4096, 32, 32, 14336, 128256, n_kv_heads=8),
    # Jiang et al. 2023, "Mistral 7B", arXiv 2310.06825, Table 1
    "mistral-7b": ModelSpec(4096, 32, 32, 14336, 32000, n_kv_heads=8),
}


def _unknown(kind: str, name, known) -> ValueError:
    return ValueError(f"unknown {kind} {name!r}; known: {', '.join(known)}")


def get_preset(name: str) -> ModelSpec:
    key = str(name).lower()
    if key not in PRESETS:
        raise _unknown("preset", name, PRESETS)
    return PRESETS[key]


def spec_from_tiny_config(cfg) -> ModelSpec:
    """The ModelSpec of a lora_edu.tiny_transformer.TinyConfig (same architecture, other names)."""
    return ModelSpec(cfg.d_model, cfg.n_layer, cfg.n_head, cfg.d_ff, cfg.vocab_size,
                     tie_embeddings=cfg.tie_embeddings, gated_ffn=True)


def _layer_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each linear in one decoder layer, nn.Linear orientation."""
    h, f, kv = spec.hidden_size, spec.ffn_size, spec.n_kv_heads * spec.head_dim
    shapes = {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h)}  # k, v shrink under GQA
    if spec.gated_ffn:
        shapes["gate"] = (f, h)
    shapes.update(up=(f, h), down=(h, f))
    return shapes


def count_params(spec_or_module) -> int:
    """Parameters of a ModelSpec (embeddings + L layers + final norm + lm_head), or of an nn.Module."""
    if isinstance(spec_or_module, nn.Module):
        return sum(p.numel() for p in spec_or_module.parameters())  # shared (tied) tensors once
    spec = spec_or_module
    h, embed = spec.hidden_size, spec.vocab_size * spec.hidden_size
    per_layer = sum(d * k for d, k in _layer_shapes(spec).values()) + 2 * h  # + two RMSNorm weights
    return embed + spec.n_layers * per_layer + h + (0 if spec.tie_embeddings else embed)


def linear_shapes(spec: ModelSpec, targets="all-linear") -> list[tuple[int, int]]:
    """(out, in) of every targeted linear, all layers. Targets: "q", "q_proj", ... or "all-linear"."""
    per_layer = _layer_shapes(spec)
    if isinstance(targets, str):
        targets = per_layer if targets == "all-linear" else (targets,)
    names = []
    for t in targets:
        name = t.removesuffix("_proj")
        if name not in per_layer:
            raise _unknown("target", t, [*per_layer, "all-linear"] + [f"{n}_proj" for n in per_layer])
        names.append(name)
    return [per_layer[n] for _ in range(spec.n_layers) for n in dict.fromkeys(names)]  # no repeats


def lora_params_for(spec: ModelSpec, targets=("q", "k", "v", "o"), r: int = 8) -> int:
    """P_lora = sum over targeted linears of r * (d + k)."""
    return lora_param_count(linear_shapes(spec, targets), r)


def activation_bytes(spec: ModelSpec, batch: int, seq_len: int, checkpointing: bool = False) -> float:
    """Korthikanti et al. 2022 estimate, decoder layers only (the logits, s * b * vocab, left out)."""
    s, b, h, a = seq_len, batch, spec.hidden_size, spec.n_heads
    one_layer = s * b * h * (34 + 5 * a * s / h)  # eq. 1, 16-bit activations, no recomputation
    if not checkpointing:
        return spec.n_layers * one_layer
    # each layer's input, plus one layer's activations rebuilt at a time during backward
    return spec.n_layers * 2 * s * b * h + one_layer


# bytes per parameter: (weight, gradient, fp32 master copy, one optimizer state)
POLICIES = {
    "mixed_fp32_master": (2, 2, 4, 4),  # bf16 compute copy, fp32 master and states (ZeRO's 16 B)
    "autocast_fp32": (4, 4, 0, 4),  # torch.autocast: fp32 weights and grads, bf16 only inside ops
    "pure_bf16": (2, 2, 0, 2),  # everything bf16; cheapest, but small updates can round away
    "fp32": (4, 4, 0, 4),  # everything float32 (CPU training; PEFT's adapters on any base)
}
# bytes per activation element under each policy (autocast runs the matmuls, and so most
# saved tensors, in bf16; mixed precision computes in the bf16 copy)
ACTIVATION_BYTES = {"mixed_fp32_master": 2, "autocast_fp32": 2, "pure_bf16": 2, "fp32": 4}
OPTIMIZER_STATES = {"adam": 2, "sgd": 0}  # Adam keeps m and v; plain SGD (no momentum) nothing
METHODS = ("full", "lora", "qlora")


@dataclass
class Ledger:
    """Bytes of one training setup, one term per field; .total adds them up."""

    label: str  # method / policy / optimizer, for the table header
    weights: float = 0  # model weights as stored (4-bit codes for QLoRA's linears)
    gradients: float = 0  # gradients of the base weights (zero when frozen)
    master_weights: float = 0  # fp32 copy the optimizer updates under mixed precision
    optimizer_states: float = 0  # Adam m and v of the base weights
    lora_weights: float = 0  # the adapters A and B
    lora_gradients: float = 0
    lora_master_weights: float = 0
    lora_optimizer_states: float = 0
    quant_constants: float = 0  # QLoRA's per-block absmax scales (and their own scales)
    activations: float = 0  # saved for the backward, all layers (lora_edu.activations)
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

    policy sets the bytes of the trained weights (and of the frozen base's weights);
    adapter_policy, if given, those of the LoRA adapters: "fp32" is what PEFT and lora_edu
    do on a 16-bit base (the tutorial's table keeps them under the mixed policy instead;
    both come to 16 bytes per adapter parameter with Adam). Activations are counted when
    batch and seq_len are given.
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
    led = Ledger(label=f"{method} / {policy} / {optimizer}")
    if method != "full":
        P_lora = lora_params_for(spec, targets, r)  # checks targets and r
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
    elif method == "lora":
        led.weights = P * w  # frozen base, still resident
    else:
        # QLoRA quantizes every decoder linear; embeddings, norms and lm_head stay at the weight
        # width w (2 B in bf16). HF PEFT's prepare_model_for_kbit_training upcasts those to fp32.
        shapes = linear_shapes(spec, "all-linear")
        Q = sum(d * k for d, k in shapes)
        led.weights = sum(-(-d * k // 2) for d, k in shapes) + (P - Q) * w  # 4-bit codes, two per byte
        # absmax scales, about bits_per_param(block_size, double_quant) - 4 bits per weight:
        # 0.5 bit, or ~0.127 with double quantization
        led.quant_constants = sum(scale_bytes(d * k, block_size, double_quant) for d, k in shapes)
    return led
