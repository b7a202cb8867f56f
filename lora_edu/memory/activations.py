"""What autograd keeps for the backward: the saved activations of a LLaMA decoder, op by op.

A rough rule such as Korthikanti et al. 2022 (arXiv 2205.05198, eq. 1; ledger.activation_bytes)
counts a GPT layer's activations in one formula. This module counts them the way autograd
decides, so that it equals what torch.autograd.graph.saved_tensors_hooks sees when
lora_edu.TinyLlama (the same architecture as LLaMA) trains (tests/test_memory.py checks it
to the byte). The rules, for the ops this decoder uses:

* An op saves a tensor only if some gradient needs it. y = x @ W.T needs x for dL/dW and W for
  dL/dx: a frozen weight (LoRA, QLoRA) saves no input. y = a * b keeps b if a needs a
  gradient and a if b does. RMSNorm keeps x and 1 / rms(x) if x needs a gradient, and the
  normalised x if its weight is trained. silu keeps its input.
* Attention (scaled_dot_product_attention, flash kernels on CPU and GPU) keeps q and k after
  RoPE, v, the output and a float32 log-sum-exp per query and head, if any of q, k, v needs
  a gradient. It never keeps the T x T score matrix of a T-token sequence.
* A tensor kept by several ops (the norm output feeding q, k and v) is stored once.
* Nothing before the first trained parameter needs a gradient. Under LoRA the embedding is
  frozen, so the first layer's input needs none and its first norm keeps nothing.
* LoRA keeps A x [tokens, r] for dL/dB and x for dL/dA. If the adapters are wider than the
  activations (float32 on a bf16 model, as PEFT makes them, without torch.autocast), each
  adapted layer casts x to their width and keeps that copy; if they are as wide, x is the
  base layer's own input, kept once for every adapter that reads it (q, k and v read one).
* DoRA (lora_edu.methods.dora; method "dora", or "qdora" on the NF4 base) keeps LoRA's tensors
  and those of its rescale y = c * z, z = V x = W0 x + s B A x [tokens, out], c = m / ||V||
  [out]: the product keeps z (for dL/dc, so dL/dm) and c (for dL/dz), and the division keeps
  the detached ||V|| (for dL/dm), in every adapted layer; a bias changes nothing (addcmul
  keeps the same two). z and c are in the rescale's dtype, the wider of the activations' and
  the adapters' (float32 if either is); ||V|| is float32 always. The cast of W0 x and the sum
  keep nothing.
* The loss keeps the log-probabilities [tokens, vocab] and the targets (int64); the
  embedding keeps the token ids (int64) if it is trained.
* Gradient checkpointing (lora_edu.train.checkpointing) keeps each layer's input and nothing inside;
  during the backward one layer at a time is rebuilt, which recompute_bytes counts.

Names follow nn.Linear orientation and the ledger's short target names (q, k, v, o, gate,
up, down). Sizes in bytes: act_bytes per activation element (2 for bf16, 4 for float32),
adapter_bytes per LoRA element. Dropout is off (p = 0): a dropout mask is not counted.
"""

from __future__ import annotations

from .spec import _unknown, linear_shapes

# DoRA's term comes last so that the terms before it keep their places (and a chart its colours)
TERMS = ("token ids", "norms", "linear inputs", "LoRA inputs (float32 copies)", "LoRA A x",
         "attention", "SwiGLU", "layer inputs (checkpoints)", "loss", "DoRA rescale (V x)")
METHODS = ("full", "lora", "qlora", "dora", "qdora")
DORA_METHODS = ("dora", "qdora")  # DoRA's adapters, on a frozen base (dora) or on the NF4 base (qdora)
NF4_METHODS = ("qlora", "qdora")  # the base's linears stored in 4-bit NF4


class _Layer:
    """Bookkeeping of one pass: each named tensor is counted once, under one term."""

    def __init__(self, terms: dict[str, int]):
        self.terms, self.names = terms, set()

    def keep(self, term: str, name: str, nbytes: int) -> None:
        if name not in self.names:
            self.names.add(name)
            self.terms[term] += nbytes


def _decoder_layer(keep, spec, tokens: int, batch: int, seq_len: int, needs_grad: bool, full: bool,
                   targets, r: int, e: int, a: int, tag: str, dora: bool = False) -> bool:
    """Add one layer's saved tensors; return whether its output needs a gradient."""
    h, f, kv = spec.hidden_size, spec.ffn_size, spec.n_kv_heads * spec.head_dim

    def norm(x_name, x_grad, out_name):
        if x_grad:  # x for the gradient of x^2, and 1 / rms(x)
            keep("norms", f"{tag}{x_name}", tokens * h * e)
            keep("norms", f"{tag}{x_name}.rstd", tokens * e)
        if full:  # the normalised x, for the gradient of the norm's weight
            keep("norms", f"{tag}{out_name}.xhat", tokens * h * e)
        return x_grad or full

    def linear(name, x_name, x_features, out_features, x_grad):
        lora = name in targets
        if full:  # x for dL/dW
            keep("linear inputs", f"{tag}{x_name}", tokens * x_features * e)
        if lora:
            if a == e:  # the adapter's x is the base's x
                keep("linear inputs", f"{tag}{x_name}", tokens * x_features * e)
            else:  # x cast to the adapter's float32, one copy per adapted layer
                keep("LoRA inputs (float32 copies)", f"{tag}{name}.x", tokens * x_features * a)
            keep("LoRA A x", f"{tag}{name}.h", tokens * r * a)
        if lora and dora:  # y = c * z: z and c in the rescale's dtype, and the division's ||V||
            wide = max(e, a)  # promote_types(base, bypass): the policies mix bf16 with float32 only
            keep("DoRA rescale (V x)", f"{tag}{name}.vx", tokens * out_features * wide)
            keep("DoRA rescale (V x)", f"{tag}{name}.scale", out_features * wide)
            keep("DoRA rescale (V x)", f"{tag}{name}.norm", out_features * 4)
        return x_grad or full or lora

    n1 = norm("x", needs_grad, "n1")
    q, k, v = (linear(name, "n1", h, out, n1) for name, out in (("q", h), ("k", kv), ("v", kv)))
    attn = q or k or v
    if attn:  # q, k (after RoPE), v, the output, and the log-sum-exp [batch, heads, seq] float32
        for name, features in (("q", h), ("k", kv), ("v", kv), ("attn_out", h)):
            keep("attention", f"{tag}{name}.sdpa", tokens * features * e)
        keep("attention", f"{tag}lse", batch * spec.n_heads * seq_len * 4)
    o = linear("o", "attn_out.sdpa", h, h, attn)  # o_proj's input is the attention output itself
    needs_grad = needs_grad or o
    n2 = norm("x2", needs_grad, "n2")
    gate = linear("gate", "n2", h, f, n2)
    up = linear("up", "n2", h, f, n2)
    if gate:  # silu(g) keeps g
        keep("SwiGLU", f"{tag}gate_out", tokens * f * e)
    if gate:  # silu(g) * u: u for the gradient of silu(g)
        keep("SwiGLU", f"{tag}up_out", tokens * f * e)
    if up:  # and silu(g) for the gradient of u
        keep("SwiGLU", f"{tag}silu_out", tokens * f * e)
    down = linear("down", "swiglu", f, h, gate or up)
    return needs_grad or down


def _check_sizes(batch, seq_len, r, act_bytes, adapter_bytes):
    for name, value in (("batch", batch), ("seq_len", seq_len), ("r", r), ("act_bytes", act_bytes),
                        ("adapter_bytes", adapter_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _targets(spec, method: str, targets) -> set[str]:
    """The short names (q, k, ...) of the adapted linears; unknown names raise, listing the known ones."""
    if method not in METHODS:
        raise _unknown("method", method, METHODS)
    if method == "full":
        return set()
    linear_shapes(spec, targets)  # raises for a name the spec does not have
    names = {targets} if isinstance(targets, str) else set(targets)
    if "all-linear" in names:
        return {"q", "k", "v", "o", "gate", "up", "down"}
    return {t.removesuffix("_proj") for t in names}


def saved_activation_terms(spec, batch: int, seq_len: int, method: str = "full", targets=("q", "k", "v", "o"),
                           r: int = 8, act_bytes: int = 2, adapter_bytes: int = 4,
                           checkpointing: bool = False) -> dict[str, int]:
    """Bytes autograd keeps from the end of the forward to the backward, by term (see TERMS).

    method: "full" (every weight trained) or "lora"/"qlora" (frozen base, adapters on targets;
    QLoRA's base saves nothing more, as its weight is rebuilt in the backward), or
    "dora"/"qdora" (the same, plus DoRA's rescale in each adapted layer).
    """
    _check_sizes(batch, seq_len, r, act_bytes, adapter_bytes)
    full, chosen = method == "full", _targets(spec, method, targets)
    tokens, e = batch * seq_len, act_bytes
    terms = dict.fromkeys(TERMS, 0)
    if full:  # the embedding's backward needs the ids; lm_loss slices them from [batch, seq + 1]
        terms["token ids"] += batch * (seq_len + 1) * 8
    needs_grad = full
    for i in range(spec.n_layers):
        if checkpointing:  # the layer's input, kept by the checkpoint; nothing inside is recorded
            terms["layer inputs (checkpoints)"] += tokens * spec.hidden_size * e
            needs_grad = needs_grad or full or bool(chosen)
        else:
            needs_grad = _decoder_layer(_Layer(terms).keep, spec, tokens, batch, seq_len, needs_grad, full,
                                        chosen, r, e, adapter_bytes, tag=f"{i}.", dora=method in DORA_METHODS)
    final = _Layer(terms)
    if needs_grad:  # the final norm's x and 1 / rms(x)
        final.keep("norms", "x", tokens * spec.hidden_size * e)
        final.keep("norms", "rstd", tokens * e)
    if full:
        final.keep("norms", "xhat", tokens * spec.hidden_size * e)
        final.keep("linear inputs", "lm_head.x", tokens * spec.hidden_size * e)  # lm_head's dL/dW
    if needs_grad:  # log-probs, targets (int64) and the loss's total weight (a scalar)
        final.keep("loss", "log_probs", tokens * spec.vocab_size * e + e)
        final.keep("loss", "targets", tokens * 8)
    return terms


def recompute_bytes(spec, batch: int, seq_len: int, method: str = "full", targets=("q", "k", "v", "o"),
                    r: int = 8, act_bytes: int = 2, adapter_bytes: int = 4) -> int:
    """Under checkpointing: one layer's activations, rebuilt during the backward (input needing grad)."""
    _check_sizes(batch, seq_len, r, act_bytes, adapter_bytes)
    terms = dict.fromkeys(TERMS, 0)
    _decoder_layer(_Layer(terms).keep, spec, batch * seq_len, batch, seq_len, True, method == "full",
                   _targets(spec, method, targets), r, act_bytes, adapter_bytes, tag="",
                   dora=method in DORA_METHODS)
    return sum(terms.values())
