"""The shape of a LLaMA-family decoder, the presets, and the parameter counts that follow.

Touvron et al. 2023, LLaMA (arXiv 2302.13971), Table 2, for the LLaMA 1 sizes. Every count
is exact arithmetic on the shapes: embeddings V * h, per layer q, k, v, o plus the SwiGLU
FFN (gate, up, down) and two RMSNorm weights, a final norm, and lm_head unless tied. LoRA on
a target set trains sum over targeted linears of r * (d + k); DoRA (Liu et al. 2024, arXiv
2402.09353) trains r * (d + k) + d, a magnitude per output row on top. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..methods.hparams import lora_param_count


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
    """The ModelSpec of a lora_edu.tiny.model.TinyConfig (same architecture, other names)."""
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
    if not isinstance(spec_or_module, ModelSpec):  # an nn.Module (duck-typed: no torch import here)
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


def lora_params_for(spec: ModelSpec, targets=("q", "k", "v", "o"), r: int = 8, dora: bool = False) -> int:
    """P_lora = sum over targeted linears [d, k] of r * (d + k), plus d each with dora=True.

    DoRA's A [r, k] and B [d, r] are LoRA's; its magnitude m [d] (one length per output row,
    lora_edu.methods.dora) is trained beside them.
    """
    shapes = linear_shapes(spec, targets)
    return lora_param_count(shapes, r) + (sum(d for d, _ in shapes) if dora else 0)


#: methods whose trainable tensors are LoRA's A [r, k] and B [d, r]; they differ in their
#: scale (rsLoRA), initialisation (PiSSA, LoRA-GA) or learning rates (LoRA+), not in size
LORA_SHAPED = ("lora", "rslora", "pissa", "loraga", "loraplus")
#: the modules whose *input* (IA)^3 scales: the FFN's inner activation enters down_proj
IA3_FEEDFORWARD = ("down",)
PEFT_METHODS = (*LORA_SHAPED, "dora", "adalora", "ia3")


def peft_params_for(spec: ModelSpec, method: str, targets, r: int = 8) -> int:
    """Trainable parameters of one family member on the targeted linears [d, k] of `spec`:

        LoRA-shaped   r (d + k)                  A and B
        dora          r (d + k) + d              + the magnitude, one length per output row
        adalora       r (d + k) + r              P, Q and the r singular values lam (at its
                                                 initial rank: pruning zeroes lam, the tensors stay)
        ia3           d, or k for down_proj      one scale per output (k, v) or per input (down)
    """
    if method not in PEFT_METHODS:
        raise _unknown("method", method, PEFT_METHODS)
    if method == "ia3":
        names = [targets] if isinstance(targets, str) else list(targets)
        shapes = [(out, inp, t.removesuffix("_proj") in IA3_FEEDFORWARD)
                  for t in names for out, inp in linear_shapes(spec, t)]
        return sum(inp if ff else out for out, inp, ff in shapes)
    shapes = linear_shapes(spec, targets)
    extra = {"dora": sum(d for d, _ in shapes), "adalora": r * len(shapes)}.get(method, 0)
    return lora_param_count(shapes, r) + extra
