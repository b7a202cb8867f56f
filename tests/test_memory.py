"""The ledger equals, to the byte, what a real training step of TinyLlama holds on the CPU.

measure_step counts parameters, gradients, master copies and Adam states after a real
step, and the activations autograd saved (saved_tensors_hooks). The ledger predicts each of
those from the architecture alone; here they must agree exactly.
"""

import copy

import pytest
import torch

from lora_edu import LLAMA_TARGETS, Adam, TinyConfig, TinyLlama, count_trainable_params, inject_lora
from lora_edu.memory.activations import recompute_bytes, saved_activation_terms
from lora_edu.train.checkpointing import checkpoint
from lora_edu.memory.ledger import estimate_memory
from lora_edu.memory.spec import lora_params_for, spec_from_tiny_config
from lora_edu.memory.measure import measure_step, saved_activations
from lora_edu.quant.qlora import prepare_qlora
from lora_edu.tiny.model import lm_loss

CFG = TinyConfig()
WIDE = TinyConfig(d_model=128, d_ff=344)  # head size 32, every linear a whole number of NF4 blocks


def _model(cfg, method, targets, checkpointing, dtype=torch.float32):
    torch.manual_seed(0)
    model = TinyLlama(cfg)
    model.gradient_checkpointing = checkpointing
    names = list(LLAMA_TARGETS) if targets == "all-linear" else [f"{t}_proj" for t in targets]
    if method in ("qlora", "qdora"):
        return prepare_qlora(model, names, r=4, compute_dtype=dtype, dora=method == "qdora")
    model.to(dtype)
    return inject_lora(model, names, r=4, dora=method == "dora") if method in ("lora", "dora") else model


def _compare(cfg, method, targets, checkpointing, batch, seq_len, dtype=torch.float32, **ledger_kw):
    model = _model(cfg, method, targets, checkpointing, dtype)
    master = method == "full" and dtype != torch.float32
    opt = Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, master_weights=master)
    torch.manual_seed(1)
    measured = measure_step(model, torch.randint(0, cfg.vocab_size, (batch, seq_len + 1)), opt)
    predicted = estimate_memory(spec_from_tiny_config(cfg), method, r=4, targets=targets or "q",
                                batch=batch, seq_len=seq_len, checkpointing=checkpointing, **ledger_kw)
    return measured, predicted


CASES = [  # method, targets, checkpointing, batch, seq_len
    ("full", (), False, 4, 16),
    ("full", (), True, 2, 8),
    ("lora", ("q", "v"), False, 4, 16),
    ("lora", ("q", "v"), True, 4, 16),
    ("lora", "all-linear", False, 3, 32),
    ("lora", "all-linear", True, 3, 32),
    ("lora", ("down",), False, 2, 8),  # nothing needs a gradient before the first down_proj
    ("lora", ("o", "up"), False, 2, 8),
    ("lora", ("gate",), False, 2, 8),  # only the gate needs a gradient in silu(g) * u: u is kept, silu(g) not
    ("lora", ("up",), False, 2, 8),  # and the other way round
    ("dora", ("q", "v"), False, 4, 16),
    ("dora", ("q", "v"), True, 4, 16),
    ("dora", "all-linear", False, 3, 32),  # k and v rescale [tokens, kv], gate and up [tokens, ffn]
    ("dora", "all-linear", True, 3, 32),
    ("dora", ("down",), False, 2, 8),
    ("dora", ("o", "up"), False, 2, 8),
]


@pytest.mark.parametrize("method, targets, checkpointing, batch, seq_len", CASES)
def test_ledger_equals_a_float32_step_byte_for_byte(method, targets, checkpointing, batch, seq_len):
    measured, predicted = _compare(CFG, method, targets, checkpointing, batch, seq_len, policy="fp32")
    assert measured.activations > 0 and measured.loss == measured.loss  # a real step (no NaN)
    assert measured.terms() == {k: v for k, v in predicted.terms().items() if k != "recomputed_layer"}


SIXTEEN_BIT = [("full", False, ())] + [(method, checkpointing, targets) for method in ("lora", "qlora", "dora", "qdora")
                                        for checkpointing in (False, True) for targets in (("q", "v"), "all-linear")]


@pytest.mark.parametrize("method, checkpointing, targets", SIXTEEN_BIT)
def test_ledger_equals_a_16_bit_step_byte_for_byte(method, checkpointing, targets):
    """bf16 model: fp32 master weights (full), or fp32 adapters that keep fp32 copies of x (LoRA,
    QLoRA, DoRA, QDoRA; DoRA's rescale then runs in float32 as well)."""
    kw = {"policy": "mixed_fp32_master"} if method == "full" else {"policy": "mixed_fp32_master",
                                                                   "adapter_policy": "fp32"}
    measured, predicted = _compare(WIDE, method, targets, checkpointing, 2, 16, torch.bfloat16, **kw)
    assert measured.terms() == {k: v for k, v in predicted.terms().items() if k != "recomputed_layer"}
    if method == "full":
        assert measured.master_weights == 2 * measured.weights == measured.optimizer_states / 2  # 2 + 4 + 8 bytes
    if method != "full" and not checkpointing:
        assert predicted.activation_terms["LoRA inputs (float32 copies)"] > 0
    assert (predicted.activation_terms["DoRA rescale (V x)"] > 0) == (method in ("dora", "qdora") and not checkpointing)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_ledger_equals_a_pure_bf16_step_with_float32_adapters(method):
    """A bf16 base with PEFT's float32 adapters: the adapters' weights, gradients and Adam states
    are float32 (4 + 4 + 8 bytes) whatever the base policy, and each adapted layer keeps a float32
    copy of its input."""
    measured, predicted = _compare(WIDE, method, ("q", "v"), False, 2, 16, torch.bfloat16,
                                   policy="pure_bf16", adapter_policy="fp32")
    assert measured.terms() == {k: v for k, v in predicted.terms().items() if k != "recomputed_layer"}
    assert measured.lora_optimizer_states == 2 * measured.lora_weights == 2 * measured.lora_gradients


@pytest.mark.parametrize("method, targets", [("qlora", ("q", "v")), ("qdora", ("q", "v")),
                                             ("qdora", "all-linear")])
def test_ledger_equals_a_float32_qlora_step(method, targets):
    """QLoRA computing in float32: the NF4 codes and scales as in bf16, everything unquantized in 4 bytes."""
    measured, predicted = _compare(WIDE, method, targets, False, 2, 16, torch.float32, policy="fp32")
    assert measured.terms() == {k: v for k, v in predicted.terms().items() if k != "recomputed_layer"}


def _out_features(cfg) -> dict:
    """Output width of each linear of a TinyLlama layer, from its config (no GQA here: k, v are d_model wide)."""
    return {"q": cfg.d_model, "k": cfg.d_model, "v": cfg.d_model, "o": cfg.d_model, "gate": cfg.d_ff,
            "up": cfg.d_ff, "down": cfg.d_model}


@pytest.mark.parametrize("cfg, targets, dtype", [(CFG, ("q", "v"), torch.float32),
                                                 (CFG, "all-linear", torch.float32),
                                                 (WIDE, ("o", "gate"), torch.bfloat16)])
def test_dora_keeps_exactly_lora_s_activations_plus_its_rescale(cfg, targets, dtype):
    """Measured: a DoRA step saves what the LoRA step saves plus, in each adapted layer, z = V x
    [tokens, out] and c = m / ||V|| [out] in the rescale's float32, and the float32 ||V|| [out].
    The ledger says the same, term by term."""
    batch, seq_len = 2, 16
    kw = dict(policy="fp32") if dtype == torch.float32 else dict(policy="pure_bf16", adapter_policy="fp32")
    lora_m, lora_p = _compare(cfg, "lora", targets, False, batch, seq_len, dtype, **kw)
    dora_m, dora_p = _compare(cfg, "dora", targets, False, batch, seq_len, dtype, **kw)
    names = _out_features(cfg) if targets == "all-linear" else targets
    outs = [_out_features(cfg)[t] for t in names]
    by_hand = cfg.n_layer * sum(batch * seq_len * d * 4 + d * 4 + d * 4 for d in outs)
    assert dora_m.activations - lora_m.activations == by_hand
    rescale = "DoRA rescale (V x)"
    assert dora_p.activation_terms[rescale] == by_hand and lora_p.activation_terms[rescale] == 0
    assert {t: b for t, b in dora_p.activation_terms.items() if t != rescale} == \
        {t: b for t, b in lora_p.activation_terms.items() if t != rescale}


def _saved_bytes(cfg, dtype, dora, bypass_dtype, targets=("q_proj", "v_proj"), batch=2, seq_len=8):
    torch.manual_seed(0)
    model = inject_lora(TinyLlama(cfg).to(dtype), list(targets), r=4, dora=dora, bypass_dtype=bypass_dtype)
    model.train()
    _, saved = saved_activations(model, lm_loss, model, torch.randint(0, cfg.vocab_size, (batch, seq_len + 1)))
    return sum(s.nbytes for s in saved)


@pytest.mark.parametrize("base, bypass, e, a", [
    (torch.float32, None, 4, 4), (torch.bfloat16, None, 2, 4),  # float32 adapters: a float32 rescale
    (torch.bfloat16, torch.bfloat16, 2, 2),  # a bf16 bypass on a bf16 base: z and c in bf16, ||V|| float32
    (torch.float32, torch.bfloat16, 4, 2),  # a bf16 bypass on a float32 base: the rescale stays float32
])
def test_dora_rescale_is_as_wide_as_the_wider_of_base_and_bypass(base, bypass, e, a):
    """The DoRA term alone, against the measured difference DoRA - LoRA, in each pairing of widths.

    (With a bf16 bypass, lora_edu's bypass also keeps bf16 casts of A and B, which the ledger's bf16
    adapters, stored in bf16, would not make; the difference leaves those out, being in both.)"""
    batch, seq_len, d = 2, 8, WIDE.d_model  # q and v are [d, d] here
    measured = _saved_bytes(WIDE, base, True, bypass) - _saved_bytes(WIDE, base, False, bypass)
    wide = max(e, a)
    by_hand = WIDE.n_layer * 2 * (batch * seq_len * d * wide + d * wide + d * 4)
    predicted = saved_activation_terms(spec_from_tiny_config(WIDE), batch, seq_len, "dora", ("q", "v"), r=4,
                                       act_bytes=e, adapter_bytes=a)["DoRA rescale (V x)"]
    assert measured == predicted == by_hand


@pytest.mark.parametrize("targets", [("q", "v"), "all-linear"])
@pytest.mark.parametrize("method, qmethod", [("lora", "qlora"), ("dora", "qdora")])
def test_trainable_count_equals_the_ledger_and_the_formula(method, qmethod, targets):
    """DoRA trains r (d + k) + d per adapted [d, k] linear: A, B and the magnitude."""
    model, qmodel = _model(CFG, method, targets, False), _model(WIDE, qmethod, targets, False)
    h, f, r = CFG.d_model, CFG.d_ff, 4
    extra = method == "dora"  # one magnitude element per output row
    attn, ffn_in, ffn_out = r * (h + h) + extra * h, r * (f + h) + extra * f, r * (h + f) + extra * h
    by_hand = CFG.n_layer * (2 * attn if targets == ("q", "v") else 4 * attn + 2 * ffn_in + ffn_out)
    dora = method == "dora"
    assert count_trainable_params(model) == lora_params_for(spec_from_tiny_config(CFG), targets, r, dora=dora) \
        == by_hand
    assert count_trainable_params(qmodel) == lora_params_for(spec_from_tiny_config(WIDE), targets, r, dora=dora)


def test_lora_saves_some_activations_and_checkpointing_saves_most():
    """The tutorial says LoRA does not save activation memory and checkpointing does; measured, on one batch."""
    full = _compare(CFG, "full", (), False, 4, 32, policy="fp32")[0].activations
    lora = _compare(CFG, "lora", "all-linear", False, 4, 32, policy="fp32")[0].activations
    ckpt = _compare(CFG, "lora", "all-linear", True, 4, 32, policy="fp32")[0].activations
    assert 0.6 * full < lora < full  # most of the activations stay: backprop still crosses every layer
    assert ckpt < lora / 4


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_recomputed_layer_is_one_layer_of_the_uncheckpointed_run(method):
    spec = spec_from_tiny_config(TinyConfig(n_layer=3))
    one = recompute_bytes(spec, 2, 8, method=method, targets="all-linear", act_bytes=4, adapter_bytes=4)
    plain = sum(saved_activation_terms(spec, 2, 8, method, "all-linear", act_bytes=4, adapter_bytes=4).values())
    one_layer_fewer = sum(saved_activation_terms(spec_from_tiny_config(TinyConfig(n_layer=2)), 2, 8, method,
                                                 "all-linear", act_bytes=4, adapter_bytes=4).values())
    assert one == plain - one_layer_fewer  # layers after the first all keep the same


@pytest.mark.parametrize("cfg, method, dtype", [(CFG, "lora", torch.float32), (CFG, "dora", torch.float32),
                                                (WIDE, "dora", torch.bfloat16), (WIDE, "qdora", torch.bfloat16)])
def test_recomputed_layer_is_what_a_later_layer_saves(cfg, method, dtype):
    """Measured: the rebuilt layer is the layer as it runs with an input that needs a gradient,
    so it keeps what the last layer of an uncheckpointed step keeps (DoRA's rescale included)."""
    model = _model(cfg, method, "all-linear", False, dtype)
    model.train()
    torch.manual_seed(1)
    _, saved = saved_activations(model, lm_loss, model, torch.randint(0, cfg.vocab_size, (2, 17)))
    last = f"layers.{cfg.n_layer - 1}"
    kept = sum(s.nbytes for s in saved if s.module == last or s.module.startswith(last + "."))
    e = 4 if dtype == torch.float32 else 2
    rebuilt = recompute_bytes(spec_from_tiny_config(cfg), 2, 16, method, "all-linear", r=4, act_bytes=e,
                              adapter_bytes=4)
    assert kept == rebuilt
    if method != "lora":  # and the rescale's share of it, by hand: z, c and ||V|| for every linear, all float32
        d_outs = _out_features(cfg).values()
        by_hand = sum(32 * d * 4 + d * 4 + d * 4 for d in d_outs)
        assert rebuilt - recompute_bytes(spec_from_tiny_config(cfg), 2, 16, "lora", "all-linear", r=4,
                                         act_bytes=e, adapter_bytes=4) == by_hand


def test_checkpointing_gives_the_same_gradients_and_reaches_the_first_layers_adapters():
    torch.manual_seed(0)
    model = inject_lora(TinyLlama(CFG), ["q_proj", "v_proj"], r=4, dropout=0.1)
    for p in model.parameters():
        if p.requires_grad:  # B = 0 at the start would hide a missing gradient of A
            p.data.normal_(std=0.05)
    ckpt = copy.deepcopy(model)
    ckpt.gradient_checkpointing = True
    batch = torch.randint(0, CFG.vocab_size, (4, 17))
    for m in (model, ckpt):
        m.train()
        torch.manual_seed(3)  # the same dropout masks, which checkpointing must replay
        lm_loss(m, batch).backward()
    pairs = [(a.grad, b.grad) for a, b in zip(model.parameters(), ckpt.parameters()) if a.requires_grad]
    assert all(b is not None and torch.equal(a, b) for a, b in pairs)
    assert ckpt.layers[0].self_attn.q_proj.lora_A.grad.abs().sum() > 0


def test_checkpoint_keeps_only_the_inputs():
    layer = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    x = torch.randn(5, 8, requires_grad=True)
    _, plain = saved_activations(layer, layer, x)
    _, kept = saved_activations(layer, checkpoint, layer, x)
    assert [s.shape for s in kept] == [(5, 8)] and sum(s.nbytes for s in plain) > 5 * 8 * 4


def test_measure_step_wants_a_lora_edu_adam():
    model = TinyLlama(CFG)
    with pytest.raises(TypeError, match="lora_edu.Adam"):
        measure_step(model, torch.zeros(1, 5, dtype=torch.long), torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize("call, match", [
    (lambda s: saved_activation_terms(s, 0, 8), "batch must be a positive int"),
    (lambda s: saved_activation_terms(s, 2, 8, method="lora", targets=["qq"]), "unknown target 'qq'"),
    (lambda s: saved_activation_terms(s, 2, 8, method="vera"),
     "unknown method 'vera'; known: full, lora, qlora, dora, qdora"),
    (lambda s: recompute_bytes(s, 2, 8, method="DoRA"), "unknown method 'DoRA'; known: full, lora, qlora, dora, qdora"),
    (lambda s: estimate_memory(s, "q-dora"), "unknown method 'q-dora'; known: full, lora, qlora, dora, qdora"),
    (lambda s: estimate_memory(s, batch=2), "give both batch and seq_len"),
    (lambda s: estimate_memory(s, "lora", adapter_policy="fp8"), "unknown adapter policy 'fp8'; known: "),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(spec_from_tiny_config(CFG))


def test_prepare_qlora_checks_before_touching_the_model():
    model = TinyLlama(CFG)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        prepare_qlora(model, ["qkv_proj"])
    with pytest.raises(ValueError, match="r must be"):
        prepare_qlora(model, ["q_proj"], r=0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == torch.float32 for k in before)
