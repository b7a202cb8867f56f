"""Monotonicity laws of the memory ledger and the peak, over random model specs (hypothesis).

What lora_edu.memory promises, and so what is asserted here for every spec and setting:

    more batch, more tokens, higher r         never fewer bytes: total, every saved-activation
                                              term, the rebuilt layer, every peak moment
    LoRA against full fine-tuning             the activations LoRA keeps are full fine-tuning's
                                              minus what frozen weights spare, plus its own A x
                                              (and float32 copies); its static bytes are below
                                              whenever the adapters are at most half the size
                                              of the weights they adapt
    checkpointing against none                saved activations not above from 2 layers on,
                                              the ledger's total (with the rebuilt layer) from
                                              3 layers on, every peak moment the two share

The plain expectations ("LoRA is always cheaper", "checkpointing never costs more") fail for
some specs; hypothesis found each, and each is kept below as a named test that says why it is
the arithmetic, not a bug (the ledger equals a measured step byte for byte: tests/test_memory.py).
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_edu.memory.ledger import POLICIES, estimate_memory
from lora_edu.memory.peak import estimate_peak
from lora_edu.memory.spec import PRESETS, ModelSpec, count_params, get_preset, linear_shapes, lora_params_for

OWN_TERMS = ("LoRA A x", "LoRA inputs (float32 copies)")  # saved by the adapters themselves


@st.composite
def specs(draw):
    """A small LLaMA-shaped spec (any head count, GQA or not, tied or not, gated or not), or a preset."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from(list(PRESETS.values())))
    n_kv = draw(st.integers(1, 4))
    n_heads = n_kv * draw(st.integers(1, 4))
    return ModelSpec(hidden_size=n_heads * draw(st.integers(1, 16)), n_layers=draw(st.integers(1, 4)),
                     n_heads=n_heads, ffn_size=draw(st.integers(1, 256)), vocab_size=draw(st.integers(1, 512)),
                     n_kv_heads=n_kv, tie_embeddings=draw(st.booleans()), gated_ffn=draw(st.booleans()))


@st.composite
def setups(draw, methods=("full", "lora", "qlora")):
    """(spec, keyword arguments of estimate_memory / estimate_peak)."""
    spec = draw(specs())
    names = ["q", "k", "v", "o", "up", "down"] + (["gate"] if spec.gated_ffn else [])
    targets = draw(st.one_of(st.just("all-linear"),
                             st.lists(st.sampled_from(names), min_size=1, max_size=4, unique=True).map(tuple)))
    return spec, dict(
        method=draw(st.sampled_from(methods)), policy=draw(st.sampled_from(list(POLICIES))),
        adapter_policy=draw(st.sampled_from([None, *POLICIES])), r=draw(st.integers(1, 64)), targets=targets,
        batch=draw(st.integers(1, 8)), seq_len=draw(st.integers(1, 512)), checkpointing=draw(st.booleans()),
        block_size=draw(st.sampled_from([32, 64, 128])), double_quant=draw(st.booleans()))


def moments(peak):
    return {m: sum(terms.values()) for m, terms in peak.moments.items()}


# ------------------------------------------------------------------ batch, tokens, rank
@pytest.mark.parametrize("knob, most", [("batch", 16), ("seq_len", 1024), ("r", 128)])
@given(setups(), st.data())
def test_more_batch_tokens_or_rank_never_means_fewer_bytes(knob, most, setup, data):
    """Every saved tensor is tokens (batch * seq_len) times a width, r wide for A x, or fixed;
    every parameter count is fixed or r (d + k); the peak's moments add such terms up and its
    step temporaries grow with the largest trained tensor (r wide under LoRA)."""
    spec, kw = setup
    if knob == "r" and kw["method"] == "full":  # r is ignored by full fine-tuning
        a, b = (estimate_memory(spec, **{**kw, "r": r}) for r in (1, most))
        assert a.terms() == b.terms()
        return
    lo, hi = sorted(data.draw(st.lists(st.integers(1, most), min_size=2, max_size=2)))
    small, large = (estimate_memory(spec, **{**kw, knob: v}) for v in (lo, hi))
    assert small.total <= large.total
    assert small.recomputed_layer <= large.recomputed_layer
    assert all(small.activation_terms[t] <= large.activation_terms[t] for t in small.activation_terms)
    p_small, p_large = (moments(estimate_peak(spec, **{**kw, knob: v})) for v in (lo, hi))
    assert all(p_small[m] <= p_large[m] for m in p_small)
    assert estimate_peak(spec, **{**kw, knob: lo}).total <= estimate_peak(spec, **{**kw, knob: hi}).total


@given(setups())
def test_counting_activations_never_lowers_the_total(setup):
    spec, kw = setup
    assert estimate_memory(spec, **{**kw, "batch": 0, "seq_len": 0}).total <= estimate_memory(spec, **kw).total


# ------------------------------------------------------------------ LoRA against full fine-tuning
@given(setups(methods=("lora", "qlora")))
def test_lora_keeps_no_activation_that_full_fine_tuning_does_not(setup):
    """Backprop still crosses the whole frozen base, so LoRA keeps a subset of what full
    fine-tuning keeps (frozen weights spare their own inputs), term by term, plus its own A x
    [tokens, r] per adapter and, with adapters wider than the activations, float32 copies."""
    spec, kw = setup
    lora, full = estimate_memory(spec, **kw), estimate_memory(spec, **{**kw, "method": "full"})
    for term, nbytes in lora.activation_terms.items():
        if term not in OWN_TERMS:
            assert nbytes <= full.activation_terms[term], term


@given(setups(methods=("lora",)))
def test_lora_static_bytes_are_below_full_when_the_adapters_are_at_most_half_the_adapted_weights(setup):
    """With the adapters in the policy's own widths, (w, g, m, s) bytes per parameter and n Adam
    states: LoRA = P w + P_lora (w + g + m + n s), full = P (w + g + m + n s). If P_lora <= Q / 2,
    Q the weights of the targeted linears (<= P), then LoRA <= P w + P (w + g + m + n s) / 2,
    which is <= full since w <= g + m + n s in every policy (g = w)."""
    spec, kw = setup
    kw = {**kw, "batch": 0, "seq_len": 0, "adapter_policy": None}
    q = sum(d * k for d, k in linear_shapes(spec, kw["targets"]))
    if 2 * lora_params_for(spec, kw["targets"], kw["r"]) > q:
        kw["r"] = max(1, min(d * k // (2 * (d + k)) for d, k in linear_shapes(spec, kw["targets"])))
    if 2 * lora_params_for(spec, kw["targets"], kw["r"]) > q:
        return  # even r = 1 is more than half of some linear (one with a side of 1 or 2, say): ~7% of draws
    for optimizer in ("adam", "sgd"):
        lora = estimate_memory(spec, **kw, optimizer=optimizer)
        full = estimate_memory(spec, **{**kw, "method": "full"}, optimizer=optimizer)
        assert lora.total <= full.total


def test_lora_is_not_below_full_when_the_adapters_outgrow_their_weights():
    """Hypothesis' counter-example to "LoRA is below full fine-tuning": 1 x 1 linears and r = 1
    give adapters of r (d + k) = 2 numbers per weight of 1, at 16 bytes each."""
    spec = ModelSpec(1, 1, 1, 1, 1, gated_ffn=False)
    lora, full = estimate_memory(spec, "lora", targets="all-linear", r=1), estimate_memory(spec, "full")
    p, p_lora = count_params(spec), lora_params_for(spec, "all-linear", 1)
    assert (p, p_lora) == (11, 12)  # embed 1, norms 2, 4 attention + 2 FFN weights, final norm 1, head 1
    assert (lora.total, full.total) == (2 * p + 16 * p_lora, 16 * p) == (214, 176)


def test_lora_can_keep_more_activations_than_full_fine_tuning():
    """Two ways, neither a bug. Hypothesis' counter-example: 1-wide layers with r = 2, whose A x
    [tokens, 2] per adapter outweighs what the frozen weights spare. And at scale, float32 adapters
    on a bf16 model (PEFT's default, adapter_policy="fp32"): each adapted layer keeps a float32
    copy of its input (q, k and v one each, where the bf16 model keeps one bf16 x), which
    tests/test_memory.py measures to the byte. On LLaMA-7B with every linear adapted, that is
    more than full fine-tuning keeps (about 1.5 times); with bf16 adapters, less (about 0.9)."""
    tiny = ModelSpec(1, 1, 1, 1, 1, gated_ffn=False)
    kw = dict(targets="all-linear", batch=1, seq_len=2)
    assert estimate_memory(tiny, "lora", r=2, **kw).activations > estimate_memory(tiny, "full", **kw).activations
    llama = get_preset("llama-7b")
    kw = dict(targets="all-linear", r=16, batch=1, seq_len=2048)
    full = estimate_memory(llama, "full", **kw).activations
    fp32, bf16 = (estimate_memory(llama, "lora", adapter_policy=ap, **kw) for ap in ("fp32", None))
    assert fp32.activations > full > bf16.activations
    # what tips it: float32 copies of the adapted layers' inputs, per layer 3 of the first norm's
    # output (q, k, v), 2 of the second's (gate, up), o's and down's inputs, 4 bytes an element,
    # where full fine-tuning keeps each of those 4 tensors once, in bf16
    t, h, f = 2048, llama.hidden_size, llama.ffn_size
    copies = 32 * t * 4 * (3 * h + 2 * h + h + f)
    assert fp32.activation_terms["LoRA inputs (float32 copies)"] == copies


# ------------------------------------------------------------------ checkpointing against none
@given(setups())
def test_checkpointing_keeps_no_more_from_two_layers_on(setup):
    """Checkpointing keeps each layer's input, X = t h e bytes (t tokens, width h, e bytes each);
    without it, a layer whose input needs a gradient keeps its norm's input, attention's q and
    its output: 3 X at least. Only a layer before the first trained parameter (layer 0 under
    LoRA) can keep less than X, by at most X, and layer 1 keeps 2 X more than its checkpoint:
    from 2 layers on (or under full fine-tuning, where layer 0's input needs a gradient too) the
    saved activations are not above. The final norm and the loss keep the same in both. With the
    rebuilt layer R (what each later layer keeps, >= 3 X) added, the ledger's total compares
    L X + R with layer 0 + (L - 1) R: the difference is >= (L - 2) 3 X - L X >= 0 from 3 layers on.
    Of the peak's moments, those both runs have (end of forward, loss backward, optimizer step)
    hold the saved activations or neither; the rebuilt-layer moment is checkpointing's own."""
    spec, kw = setup
    ckpt, plain = (estimate_memory(spec, **{**kw, "checkpointing": c}) for c in (True, False))
    if spec.n_layers >= 2 or kw["method"] == "full":
        assert ckpt.activations <= plain.activations
        p_ckpt, p_plain = (moments(estimate_peak(spec, **{**kw, "checkpointing": c})) for c in (True, False))
        assert all(p_ckpt[m] <= p_plain[m] for m in p_plain)
        assert set(p_ckpt) - set(p_plain) == {"layer rebuilt in backward"}
    if spec.n_layers >= 3:
        assert ckpt.total <= plain.total


def test_checkpointing_one_layer_can_keep_more():
    """Hypothesis' counter-example: one layer, LoRA on down_proj only, ffn_size < hidden_size.
    Nothing before down_proj needs a gradient, so the plain run keeps only down_proj's input
    [t, ffn] and its A x; the checkpoint keeps the layer's input [t, hidden], which is wider."""
    spec = ModelSpec(3, 1, 1, 1, 1, gated_ffn=False)
    kw = dict(targets=("down",), r=1, batch=1, seq_len=1)  # one token, bf16 activations (2 bytes)
    ckpt, plain = (estimate_memory(spec, "lora", checkpointing=c, **kw) for c in (True, False))
    assert ckpt.activation_terms["layer inputs (checkpoints)"] == 3 * 2  # [1, 3]
    assert plain.activation_terms["linear inputs"] + plain.activation_terms["LoRA A x"] == 1 * 2 + 1 * 2  # [1, 1] each
    # both then keep the final norm's x [1, 3] and 1 / rms [1], the log-probs [1, 1] plus a scalar,
    # and the int64 targets: 6 + 2 + 4 + 8 = 20 bytes
    assert ckpt.activations == 6 + 20 > plain.activations == 4 + 20


def test_checkpointing_two_layers_can_cost_more_in_total():
    """Hypothesis' counter-example at 2 layers: the rebuilt layer plus two checkpoints outweigh
    what layer 0 keeps when it keeps little (LoRA on down_proj only, ffn_size < 2 hidden_size)."""
    spec = ModelSpec(2, 2, 1, 1, 1, gated_ffn=False)
    kw = dict(targets=("down",), r=1, batch=1, seq_len=1)
    ckpt, plain = (estimate_memory(spec, "lora", checkpointing=c, **kw) for c in (True, False))
    assert ckpt.activations <= plain.activations  # the saved activations do drop ...
    assert ckpt.total > plain.total  # ... but not by the rebuilt layer's worth


def test_checkpointing_can_raise_the_predicted_peak():
    """Hypothesis' counter-example for the peak: a 2-layer, 16-wide model on 3 tokens with float32
    adapters on every linear. Activations are a few kB, gradients and Adam temporaries far more;
    the plain run peaks at the optimizer step, and the checkpointed run's own moment, the layer
    rebuilt in the backward, counts every gradient (an upper bound) plus the checkpoints and the
    rebuilt layer: more than the optimizer step's temporaries of the largest adapter."""
    spec = ModelSpec(16, 2, 1, 32, 1000)
    kw = dict(targets="all-linear", r=16, batch=1, seq_len=3, adapter_policy="fp32")
    ckpt, plain = (estimate_peak(spec, "lora", checkpointing=c, **kw) for c in (True, False))
    assert (ckpt.moment, plain.moment) == ("layer rebuilt in backward", "optimizer step")
    led = estimate_memory(spec, "lora", checkpointing=True, **kw)
    own = led.activations - led.activation_terms["loss"] + led.recomputed_layer  # checkpoints + rebuilt layer
    temporaries = plain.moments["optimizer step"]["step temporaries"]
    assert ckpt.total - plain.total == own - temporaries > 0  # a few hundred bytes, of 67 MB (cuBLAS workspaces)
