"""lora_edu.memory.peak.estimate_peak on its own: each moment of a step, rebuilt by hand.

A small decoder (h = 64, 2 layers, FFN 128, vocab 100) keeps the arithmetic checkable. Its
parameters, counted here from the shapes:

    embeddings 100 * 64 = 6400; per layer q, k, v, o 4 * 64 * 64 = 16384, gate, up, down
    3 * 128 * 64 = 24576, two RMSNorms 128; final norm 64; lm_head 6400
    P = 6400 + 2 * (16384 + 24576 + 128) + 64 + 6400 = 95040

The saved activations come from the ledger (checked byte for byte against autograd in
test_memory.py); what is checked here is how the peak puts its moments together.
"""

import pytest

from lora_edu.memory.ledger import estimate_memory
from lora_edu.memory.peak import CUBLAS_WORKSPACES, estimate_peak
from lora_edu.memory.spec import ModelSpec, count_params

SPEC = ModelSpec(hidden_size=64, n_layers=2, n_heads=4, ffn_size=128, vocab_size=100)
P = 95040
BATCH, SEQ = 2, 8
TOKENS = BATCH * SEQ


def test_the_by_hand_count():
    assert count_params(SPEC) == P


def test_lora_on_a_pure_bf16_base_with_float32_adapters():
    """The case the mutation run found untested: a bf16 base, float32 adapters (as PEFT makes them)."""
    kw = dict(r=4, targets=("q", "down"), batch=BATCH, seq_len=SEQ)
    peak = estimate_peak(SPEC, "lora", policy="pure_bf16", adapter_policy="fp32", **kw)
    # adapters: q [64, 64] and down [64, 128] in each of 2 layers, r (d + k) each
    p_lora = 2 * (4 * (64 + 64) + 4 * (64 + 128))  # 2560
    # resident: the bf16 base (2 B), the float32 adapters (4 B), their float32 Adam m and v
    # (2 * 4 B; no master copy: they are float32 already), two cuBLAS workspaces of 32 MiB
    assert peak.resident == 2 * P + 4 * p_lora + 8 * p_lora + 2 * 32 * 2**20
    acts = estimate_memory(SPEC, "lora", "pure_bf16", adapter_policy="fp32", **kw).activations
    logits = TOKENS * 100 * 2  # [tokens, vocab] in bf16
    # the step: float32 adapter gradients, and for the largest factor (down's A, [4, 128]:
    # 512 elements) sqrt(v) and its quotient in float32
    assert peak.moments == {
        "end of forward": {"activations": acts, "logits": logits},
        "loss backward": {"activations": acts, "logit gradients": 2 * logits},
        "optimizer step": {"gradients": 4 * p_lora, "step temporaries": 512 * 4 * 2},
    }
    assert peak.total == peak.resident + max(sum(m.values()) for m in peak.moments.values())


def test_dora_on_a_pure_bf16_base_with_float32_adapters():
    """DoRA in the same setting: a magnitude per output row on top of LoRA's factors, its
    gradient in the optimizer step, its rescale in the activations, its cached ||W0||^2 resident."""
    kw = dict(r=4, targets=("q", "down"), batch=BATCH, seq_len=SEQ)
    peak = estimate_peak(SPEC, "dora", policy="pure_bf16", adapter_policy="fp32", **kw)
    p_lora = 2 * (4 * (64 + 64) + 4 * (64 + 128))  # 2560, as for LoRA
    rows = 2 * (64 + 64)  # q and down both have 64 output rows, in each of 2 layers
    p_dora = p_lora + rows  # 2816
    # resident: LoRA's, for p_dora parameters, plus ||W0||^2 per row in float32
    assert peak.resident == 2 * P + 4 * p_dora + 8 * p_dora + CUBLAS_WORKSPACES + 4 * rows
    # the activations: LoRA's, plus per adapted layer z [tokens, 64], c [64] (float32: the
    # adapters are) and ||V|| [64] (float32)
    lora_acts = estimate_memory(SPEC, "lora", "pure_bf16", adapter_policy="fp32", **kw).activations
    acts = lora_acts + 2 * 2 * (TOKENS * 64 * 4 + 64 * 4 + 64 * 4)
    logits = TOKENS * 100 * 2
    # the magnitudes (64 elements) are smaller than down's A [4, 128]: the temporaries are LoRA's
    assert peak.moments == {
        "end of forward": {"activations": acts, "logits": logits},
        "loss backward": {"activations": acts, "logit gradients": 2 * logits},
        "optimizer step": {"gradients": 4 * p_dora, "step temporaries": 512 * 4 * 2},
    }


def test_a_magnitude_at_most_ties_the_largest_factor():
    """At r = 1 the magnitude of gate [128, 64] has 128 elements, as many as its B [128, 1]."""
    peak = estimate_peak(SPEC, "dora", adapter_policy="fp32", r=1, targets=("gate",), batch=BATCH, seq_len=SEQ)
    assert peak.moments["optimizer step"]["step temporaries"] == 128 * 4 * 2


def test_full_fine_tuning_with_master_weights_and_checkpointing():
    kw = dict(batch=BATCH, seq_len=SEQ, checkpointing=True)
    peak = estimate_peak(SPEC, "full", policy="mixed_fp32_master", **kw)
    led = estimate_memory(SPEC, "full", "mixed_fp32_master", **kw)
    # 2 B bf16 weight + 4 B float32 master + 8 B float32 m and v per parameter
    assert peak.resident == 14 * P + CUBLAS_WORKSPACES
    logits = TOKENS * 100 * 2
    # the largest trained tensor is gate or up (128 * 64 = 8192, above the 6400 of an
    # embedding); under master weights its step holds three float32 temporaries: the
    # upcast gradient, sqrt(v) and the quotient
    assert peak.moments["optimizer step"] == {"gradients": 2 * P, "step temporaries": 8192 * 4 * 3}
    assert peak.moments["loss backward"] == {"activations": led.activations, "logit gradients": 2 * logits}
    # later in the backward the log-probs are freed: the checkpoints, one rebuilt layer, every gradient
    assert led.activation_terms["loss"] == TOKENS * 100 * 2 + 2 + TOKENS * 8  # log-probs, a scalar, int64 targets
    assert peak.moments["layer rebuilt in backward"] == {
        "checkpoints": led.activations - led.activation_terms["loss"],
        "recomputed layer": led.recomputed_layer, "gradients": 2 * P}
    assert led.recomputed_layer > 0


@pytest.mark.parametrize("method", ["qlora", "qdora"])
def test_qlora_holds_one_dequantized_weight_at_the_end_of_the_forward(method):
    peak = estimate_peak(SPEC, method, policy="mixed_fp32_master", adapter_policy="fp32", r=4,
                         targets="all-linear", batch=BATCH, seq_len=SEQ)
    # the largest linear, gate or up, rebuilt in bf16 for one matmul
    assert peak.moments["end of forward"]["dequantized weight"] == 128 * 64 * 2
    # the largest LoRA factor over every linear: 4 x 128 (gate's and up's B, down's A)
    assert peak.moments["optimizer step"]["step temporaries"] == 4 * 128 * 4 * 2


@pytest.mark.parametrize("method", ["full", "lora", "qlora", "dora", "qdora"])
def test_the_peak_is_the_largest_moment(method):
    peak = estimate_peak(SPEC, method, batch=BATCH, seq_len=SEQ)
    sums = {name: sum(terms.values()) for name, terms in peak.moments.items()}
    assert peak.moment == max(sums, key=sums.get)
    assert peak.total == peak.resident + sums[peak.moment]