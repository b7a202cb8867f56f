import pytest

from lora_edu.memory.ledger import activation_bytes, estimate_memory
from lora_edu.memory.peak import estimate_peak
from lora_edu.memory.spec import (PRESETS, ModelSpec, count_params, get_preset, linear_shapes, lora_params_for,
                                  spec_from_tiny_config)
from lora_edu.quant.sizes import bits_per_param
from lora_edu.tiny.model import TinyConfig, TinyLlama

GB, GiB = 1e9, 2**30
CARD_48GB, CARD_80GB = 48 * GiB, 80 * GiB  # a card sold as "N GB" holds N GiB (an A100 80GB: 81,920 MiB)
LLAMA_7B = get_preset("llama-7b")
LLAMA_65B = get_preset("llama-65b")


@pytest.mark.parametrize("name, expected", [
    ("llama-7b", 6_738_415_616), ("llama-13b", 13_015_864_320), ("llama-33b", 32_528_943_616),
    ("llama-65b", 65_285_660_672), ("llama-3-8b", 8_030_261_248), ("mistral-7b", 7_241_732_096),
])
def test_preset_counts_match_published_checkpoints(name, expected):
    assert count_params(PRESETS[name]) == expected


@pytest.mark.parametrize("cfg", [TinyConfig(), TinyConfig(n_layer=3, d_model=32, n_head=2, d_ff=80),
                                 TinyConfig(tie_embeddings=True)])
def test_spec_count_equals_real_module(cfg):
    assert count_params(spec_from_tiny_config(cfg)) == count_params(TinyLlama(cfg))


def test_gqa_shrinks_k_and_v_only():
    mha, gqa = ModelSpec(4096, 1, 32, 14336, 10), ModelSpec(4096, 1, 32, 14336, 10, n_kv_heads=8)
    assert linear_shapes(gqa, ("q", "k", "v", "o")) == [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096)]
    assert count_params(mha) - count_params(gqa) == 2 * (4096 - 1024) * 4096


def test_lora_qkvo_r8_on_7b_is_0_12_percent():
    p_lora = lora_params_for(LLAMA_7B, ("q", "k", "v", "o"), r=8)
    assert p_lora == 32 * 4 * 8 * (4096 + 4096) == 8_388_608
    assert round(100 * p_lora / 7e9, 2) == 0.12  # the tutorial's figure, against a round 7B
    assert round(100 * p_lora / count_params(LLAMA_7B), 3) == 0.124  # against the exact count
    from lora_edu import lora_param_count
    with pytest.raises(TypeError, match="lora_params_for"):  # a spec needs a target set: the other function
        lora_param_count(LLAMA_7B, 8)
    assert lora_param_count([(4096, 4096)] * 128, 8) == p_lora  # or from the shapes


def test_target_spellings():
    assert lora_params_for(LLAMA_7B, ("q_proj", "v_proj"), 8) == lora_params_for(LLAMA_7B, ("q", "v"), 8)
    assert lora_params_for(LLAMA_7B, "q_proj", 8) == lora_params_for(LLAMA_7B, ("q",), 8)
    every = ("q", "k", "v", "o", "gate", "up", "down")
    assert linear_shapes(LLAMA_7B, "all-linear") == linear_shapes(LLAMA_7B, every)
    assert len(linear_shapes(LLAMA_7B, ("q", "q_proj"))) == 32  # a repeated target counts once


def test_full_finetuning_is_16_bytes_per_param():
    led = estimate_memory(LLAMA_7B, "full")
    assert led.total == 16 * count_params(LLAMA_7B)
    assert round(led.total / GB, 1) == 107.8  # exact LLaMA-7B count
    assert round(led.total / count_params(LLAMA_7B) * 7e9 / GB) == 112  # the tutorial's figure, for a round 7B
    assert (led.weights, led.gradients, led.master_weights, led.optimizer_states) == \
        tuple(b * count_params(LLAMA_7B) for b in (2, 2, 4, 8))


def test_policies_and_optimizers():
    P = count_params(LLAMA_7B)
    assert estimate_memory(LLAMA_7B, "full", "autocast_fp32").total == 16 * P
    assert estimate_memory(LLAMA_7B, "full", "pure_bf16").total == 8 * P
    assert estimate_memory(LLAMA_7B, "full", optimizer="sgd").total == 8 * P


def test_lora_is_2_psi_plus_16_psi_lora():
    led = estimate_memory(LLAMA_7B, "lora", r=8, targets=("q", "k", "v", "o"))
    assert led.total == 2 * count_params(LLAMA_7B) + 16 * 8_388_608
    assert led.gradients == led.master_weights == led.optimizer_states == 0


def test_dora_adds_a_magnitude_per_output_row():
    """DoRA trains r (d + k) + d per adapted [d, k] linear: LLaMA-7B's q, k, v, o have 4096 rows each."""
    p_dora = lora_params_for(LLAMA_7B, ("q", "k", "v", "o"), r=8, dora=True)
    assert p_dora == 8_388_608 + 32 * 4 * 4096 == 8_912_896
    # under GQA the magnitudes of k and v are as short as their rows: 1024 on Llama-3-8B
    llama3, qkvo = get_preset("llama-3-8b"), ("q", "k", "v", "o")
    magnitudes = lora_params_for(llama3, qkvo, 8, dora=True) - lora_params_for(llama3, qkvo, 8)
    assert magnitudes == 32 * (4096 + 1024 + 1024 + 4096)
    # 16 bytes per trained parameter, the magnitude's included; the base as under LoRA and QLoRA
    led = estimate_memory(LLAMA_7B, "dora", r=8, targets=("q", "k", "v", "o"))
    assert led.total == 2 * count_params(LLAMA_7B) + 16 * p_dora
    assert (led.lora_weights, led.lora_gradients, led.lora_master_weights, led.lora_optimizer_states) == \
        (2 * p_dora, 2 * p_dora, 4 * p_dora, 8 * p_dora)
    qdora, qlora = (estimate_memory(LLAMA_7B, m, r=8, targets=("q", "k", "v", "o")) for m in ("qdora", "qlora"))
    assert (qdora.weights, qdora.quant_constants) == (qlora.weights, qlora.quant_constants)
    assert qdora.total - qlora.total == 16 * 32 * 4 * 4096


def test_dora_activations_add_its_rescale_at_7b():
    """Per adapted layer z [tokens, 4096] and c [4096] in bf16 under the mixed policy, ||V|| [4096] float32."""
    kw = dict(r=8, targets=("q", "k", "v", "o"), batch=1, seq_len=2048)
    lora, dora, qdora = (estimate_memory(LLAMA_7B, m, **kw) for m in ("lora", "dora", "qdora"))
    rescale = 32 * 4 * (2048 * 4096 * 2 + 4096 * 2 + 4096 * 4)
    assert dora.activations - lora.activations == dora.activation_terms["DoRA rescale (V x)"] == rescale
    assert qdora.activation_terms == dora.activation_terms  # the NF4 base keeps nothing more (measured in test_memory)
    ckpt = estimate_memory(LLAMA_7B, "dora", checkpointing=True, **kw)
    assert ckpt.activation_terms["DoRA rescale (V x)"] == 0  # only the layers' inputs are kept ...
    rebuilt_lora = estimate_memory(LLAMA_7B, "lora", checkpointing=True, **kw).recomputed_layer
    assert ckpt.recomputed_layer - rebuilt_lora == rescale // 32  # ... and one layer's rescale is rebuilt


def test_qlora_base_uses_bits_per_param():
    led = estimate_memory(LLAMA_7B, "qlora", block_size=64, double_quant=True)
    Q = sum(d * k for d, k in linear_shapes(LLAMA_7B, "all-linear"))
    assert led.weights + led.quant_constants == pytest.approx(
        Q * bits_per_param(64, True) / 8 + (count_params(LLAMA_7B) - Q) * 2)
    single = estimate_memory(LLAMA_7B, "qlora", double_quant=False)
    assert single.quant_constants == Q * 0.5 / 8  # 32 / 64 bits per weight
    assert (single.quant_constants - led.quant_constants) * 8 / Q == pytest.approx(0.373, abs=1e-3)


def test_single_gpu_fits():
    for method in ("full", "lora"):
        assert estimate_memory(LLAMA_65B, method).total > CARD_80GB
    assert estimate_memory(LLAMA_7B, "lora", batch=1, seq_len=512).total < CARD_80GB


def test_65b_qlora_on_48gb():
    # QLoRA's setting: adapters on every linear, batch 1, short sequences, checkpointing
    setting = dict(method="qlora", targets="all-linear", batch=1, seq_len=512, checkpointing=True)
    assert estimate_memory(LLAMA_65B, r=16, **setting).total < 48 * GB
    # at the paper's r = 64 the full 16 B per adapter parameter lands just over 48e9 bytes,
    # under the 48 GiB a "48 GB" card holds; bf16 adapters and states bring it well under
    r64 = estimate_memory(LLAMA_65B, r=64, **setting).total
    assert 48 * GB < r64 < CARD_48GB
    assert estimate_memory(LLAMA_65B, r=64, policy="pure_bf16", **setting).total < 42 * GB
    # the predicted GPU peak decides, under this book's 16 B and the paper's 12 B per adapter parameter
    peak = {pol: estimate_peak(LLAMA_65B, r=64, adapter_policy=pol, **setting).total
            for pol in ("mixed_fp32_master", "bf16_fp32_states")}
    assert {pol: round(b / GB, 2) for pol, b in peak.items()} == {"mixed_fp32_master": 48.16, "bf16_fp32_states": 44.96}
    assert all(b < CARD_48GB for b in peak.values())


ADAPTER_CONVENTIONS = ("fp32", "mixed_fp32_master", "bf16_fp32_states", "pure_bf16")


def test_adapter_conventions_on_qlora_65b():
    """Chapter 4's comparison: what each adapter convention costs for QLoRA-65B, r = 64 on every linear."""
    p_lora = lora_params_for(LLAMA_65B, "all-linear", 64)
    led = {pol: estimate_memory(LLAMA_65B, "qlora", r=64, targets="all-linear", adapter_policy=pol)
           for pol in ADAPTER_CONVENTIONS}
    per_param = {pol: (b.lora_weights + b.lora_gradients + b.lora_master_weights + b.lora_optimizer_states) / p_lora
                 for pol, b in led.items()}
    assert per_param == {"fp32": 16, "mixed_fp32_master": 16, "bf16_fp32_states": 12, "pure_bf16": 8}
    base = led["fp32"].weights + led["fp32"].quant_constants
    assert all(b.weights + b.quant_constants == base for b in led.values())  # only the adapters' bytes move
    assert round(led["mixed_fp32_master"].total / GB, 2) == round(led["fp32"].total / GB, 2) == 47.25
    assert round(led["bf16_fp32_states"].total / GB, 2) == 44.05  # the paper's: bf16 adapters, 32-bit Adam states
    assert round(led["pure_bf16"].total / GB) == 41  # bf16 Adam states as well
    assert "(adapters bf16_fp32_states)" in led["bf16_fp32_states"].label
    assert "adapters" not in estimate_memory(LLAMA_65B, "qlora").label


def test_adapter_policy_sets_the_adapters_bytes_whatever_the_base_policy():
    # A pure bf16 base with float32 adapters (PEFT's upcast): the adapters' Adam m and v are
    # float32, 8 bytes per adapter parameter, 67.1 MB for LLaMA-7B at r = 8 on q, k, v, o.
    p_lora = lora_params_for(LLAMA_7B, ("q", "k", "v", "o"), 8)
    led = estimate_memory(LLAMA_7B, "lora", policy="pure_bf16", adapter_policy="fp32")
    assert led.lora_optimizer_states == 2 * 4 * p_lora and round(led.lora_optimizer_states / 1e6, 1) == 67.1
    assert (led.lora_weights, led.lora_gradients, led.lora_master_weights) == (4 * p_lora, 4 * p_lora, 0)
    assert led.weights == 2 * count_params(LLAMA_7B)  # the base follows the base policy
    # and the other way round: a float32 base with bf16 adapters and bf16 states
    led = estimate_memory(LLAMA_7B, "lora", policy="fp32", adapter_policy="pure_bf16")
    assert led.lora_optimizer_states == 2 * 2 * p_lora and led.weights == 4 * count_params(LLAMA_7B)


def test_only_float32_adapters_copy_their_inputs():
    kw = dict(r=8, targets=("q", "k", "v", "o"), batch=1, seq_len=2048)
    act = {pol: estimate_memory(LLAMA_7B, "lora", adapter_policy=pol, **kw) for pol in ADAPTER_CONVENTIONS}
    copies = {pol: b.activation_terms["LoRA inputs (float32 copies)"] for pol, b in act.items()}
    assert copies["fp32"] > 0 and all(copies[pol] == 0 for pol in ADAPTER_CONVENTIONS[1:])
    assert act["mixed_fp32_master"].activations == act["bf16_fp32_states"].activations == act["pure_bf16"].activations


def test_fp32_adapter_policy_is_what_peft_keeps_on_a_bf16_base():
    """get_peft_model upcasts 16-bit adapter weights to float32 (autocast_adapter_dtype=True, its default)."""
    pytest.importorskip("peft")  # the import takes a few seconds
    import torch
    from peft import LoraConfig, get_peft_model

    cfg = TinyConfig()
    torch.manual_seed(0)
    model = get_peft_model(TinyLlama(cfg).to(torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trained = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in trained} == {torch.float32}
    led = estimate_memory(spec_from_tiny_config(cfg), "lora", adapter_policy="fp32", r=4, targets=("q", "v"))
    assert led.lora_weights == sum(p.nbytes for p in trained)


def test_activations():
    kwargs = dict(batch=4, seq_len=1024)
    full, lora = estimate_memory(LLAMA_7B, "full", **kwargs), estimate_memory(LLAMA_7B, "lora", **kwargs)
    # LoRA spares only what frozen weights would keep for their own gradients: most remains
    assert 0.5 * full.activations < lora.activations < full.activations
    ckpt = estimate_memory(LLAMA_7B, "lora", checkpointing=True, **kwargs)
    assert ckpt.activations < full.activations / 10 and ckpt.recomputed_layer > 0
    # one rule checked by hand at 7B scale: attention keeps q, k, v and its output (bf16) and a
    # float32 log-sum-exp per head and query, in each of the 32 layers, whatever the method
    attention = 32 * (4 * 1024 * 4 * 4096 * 2 + 4 * 32 * 1024 * 4)
    assert full.activation_terms["attention"] == lora.activation_terms["attention"] == attention
    assert estimate_memory(LLAMA_7B, "full").activations == 0
    # the GPT formula stores the T x T attention scores (its s is the sequence length), which fused
    # attention never does
    s, b, h, a = 1024, 4, 4096, 32
    assert activation_bytes(LLAMA_7B, b, s) == 32 * s * b * h * (34 + 5 * a * s / h) > full.activations
    assert activation_bytes(LLAMA_7B, 1, 512, True) == 32 * 2 * 512 * h + 512 * h * (34 + 5 * a * 512 / h)


def test_str_table():
    text = str(estimate_memory(LLAMA_7B, "lora", batch=1, seq_len=128))
    assert "lora / mixed_fp32_master / adam" in text and "activations" in text
    names = [line.split()[0] for line in text.splitlines()[2:]]
    assert "gradients" not in names and "lora_gradients" in names  # zero terms are left out
    assert text.splitlines()[-1].split()[0] == "total"


@pytest.mark.parametrize("kwargs, match", [
    (dict(hidden_size=0), "hidden_size must be a positive int"),
    (dict(n_layers=-1), "n_layers must be a positive int"),
    (dict(vocab_size=1.5), "vocab_size must be a positive int"),
    (dict(hidden_size=100, n_heads=3), "divisible by n_heads"),
    (dict(n_kv_heads=3), "divisible by n_kv_heads"),
])
def test_bad_spec(kwargs, match):
    base = dict(hidden_size=64, n_layers=2, n_heads=4, ffn_size=128, vocab_size=32)
    with pytest.raises(ValueError, match=match):
        ModelSpec(**{**base, **kwargs})


@pytest.mark.parametrize("call, match", [
    (lambda: get_preset("gpt-5"), "unknown preset 'gpt-5'; known: llama-7b, .*mistral-7b"),
    (lambda: estimate_memory(LLAMA_7B, "prefix"), "unknown method 'prefix'; known: full, lora, qlora, dora, qdora$"),
    (lambda: estimate_memory(LLAMA_7B, policy="fp8"), "unknown policy .*pure_bf16"),
    (lambda: estimate_memory(LLAMA_7B, optimizer="lion"), "unknown optimizer .*adam, sgd"),
    (lambda: lora_params_for(LLAMA_7B, ("q", "w1")), "unknown target 'w1'.*all-linear.*q_proj"),
    (lambda: lora_params_for(ModelSpec(64, 1, 4, 128, 32, gated_ffn=False), ("gate",)), "unknown target"),
    (lambda: lora_params_for(LLAMA_7B, ("q",), r=0), "r must be a positive int"),
    (lambda: estimate_memory(LLAMA_7B, batch=-1), "batch must be an int >= 0"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_preset_lookup_ignores_case():
    assert get_preset("LLaMA-7B") is LLAMA_7B


def test_every_policy_has_its_activation_width():
    # every policy but plain float32 runs its matmuls, and so keeps its activations, in 16 bits
    from lora_edu.memory.ledger import ACTIVATION_BYTES, POLICIES

    assert ACTIVATION_BYTES.keys() == POLICIES.keys()
    assert {p: ACTIVATION_BYTES[p] for p in POLICIES} == {p: 4 if p == "fp32" else 2 for p in POLICIES}
