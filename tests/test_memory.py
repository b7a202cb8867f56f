"""The ledger equals, to the byte, what a real training step of TinyLlama holds on the CPU.

measure_step counts parameters, gradients, master copies and Adam states after a real
step, and the activations autograd saved (saved_tensors_hooks). The ledger predicts each of
those from the architecture alone; here they must agree exactly.
"""

import copy

import pytest
import torch

from lora_edu import LLAMA_TARGETS, Adam, TinyConfig, TinyLlama, inject_lora
from lora_edu.memory.activations import recompute_bytes, saved_activation_terms
from lora_edu.train.checkpointing import checkpoint
from lora_edu.memory.ledger import estimate_memory
from lora_edu.memory.spec import spec_from_tiny_config
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
    if method == "qlora":
        return prepare_qlora(model, names, r=4, compute_dtype=dtype)
    model.to(dtype)
    return inject_lora(model, names, r=4) if method == "lora" else model


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
]


@pytest.mark.parametrize("method, targets, checkpointing, batch, seq_len", CASES)
def test_ledger_equals_a_float32_step_byte_for_byte(method, targets, checkpointing, batch, seq_len):
    measured, predicted = _compare(CFG, method, targets, checkpointing, batch, seq_len, policy="fp32")
    assert measured.activations > 0 and measured.loss == measured.loss  # a real step (no NaN)
    assert measured.terms() == {k: v for k, v in predicted.terms().items() if k != "recomputed_layer"}


@pytest.mark.parametrize("method, checkpointing", [("full", False), ("lora", False), ("lora", True),
                                                   ("qlora", False), ("qlora", True)])
def test_ledger_equals_a_16_bit_step_byte_for_byte(method, checkpointing):
    """bf16 model: fp32 master weights (full), or fp32 adapters that keep fp32 copies of x (LoRA, QLoRA)."""
    kw = {"policy": "mixed_fp32_master"} if method == "full" else {"policy": "mixed_fp32_master",
                                                                   "adapter_policy": "fp32"}
    measured, predicted = _compare(WIDE, method, ("q", "v"), checkpointing, 2, 16, torch.bfloat16, **kw)
    assert measured.terms() == {k: v for k, v in predicted.terms().items() if k != "recomputed_layer"}
    if method == "full":
        assert measured.master_weights == 2 * measured.weights == measured.optimizer_states / 2  # 2 + 4 + 8 bytes
    if method != "full" and not checkpointing:
        assert predicted.activation_terms["LoRA inputs (float32 copies)"] > 0


def test_ledger_equals_a_pure_bf16_step_with_float32_adapters():
    """A bf16 base with PEFT's float32 adapters: the adapters' weights, gradients and Adam states
    are float32 (4 + 4 + 8 bytes) whatever the base policy, and each adapted layer keeps a float32
    copy of its input."""
    measured, predicted = _compare(WIDE, "lora", ("q", "v"), False, 2, 16, torch.bfloat16,
                                   policy="pure_bf16", adapter_policy="fp32")
    assert measured.terms() == {k: v for k, v in predicted.terms().items() if k != "recomputed_layer"}
    assert measured.lora_optimizer_states == 2 * measured.lora_weights == 2 * measured.lora_gradients


def test_ledger_equals_a_float32_qlora_step():
    """QLoRA computing in float32: the NF4 codes and scales as in bf16, everything unquantized in 4 bytes."""
    measured, predicted = _compare(WIDE, "qlora", ("q", "v"), False, 2, 16, torch.float32, policy="fp32")
    assert measured.terms() == {k: v for k, v in predicted.terms().items() if k != "recomputed_layer"}


def test_lora_saves_some_activations_and_checkpointing_saves_most():
    """The tutorial says LoRA does not save activation memory and checkpointing does; measured, on one batch."""
    full = _compare(CFG, "full", (), False, 4, 32, policy="fp32")[0].activations
    lora = _compare(CFG, "lora", "all-linear", False, 4, 32, policy="fp32")[0].activations
    ckpt = _compare(CFG, "lora", "all-linear", True, 4, 32, policy="fp32")[0].activations
    assert 0.6 * full < lora < full  # most of the activations stay: backprop still crosses every layer
    assert ckpt < lora / 4


def test_recomputed_layer_is_one_layer_of_the_uncheckpointed_run():
    spec = spec_from_tiny_config(TinyConfig(n_layer=3))
    one = recompute_bytes(spec, 2, 8, method="lora", targets="all-linear", act_bytes=4, adapter_bytes=4)
    plain = sum(saved_activation_terms(spec, 2, 8, "lora", "all-linear", act_bytes=4, adapter_bytes=4).values())
    one_layer_fewer = sum(saved_activation_terms(spec_from_tiny_config(TinyConfig(n_layer=2)), 2, 8, "lora",
                                                 "all-linear", act_bytes=4, adapter_bytes=4).values())
    assert one == plain - one_layer_fewer  # layers after the first all keep the same


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
    (lambda s: saved_activation_terms(s, 2, 8, method="dora"), "unknown method 'dora'; known: full, lora, qlora"),
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
