"""DoRALinear and QDoRALinear against HF PEFT's use_dora=True, one layer at a time.

Both sides wrap copies of the same nn.Linear and get the same A, B and magnitude (B and the
magnitude random, as after training), so any difference is one of arithmetic. PEFT's DoRA
builds W0 + s*BA in float32 to take its row norms and rescales the base output in float32;
ours takes the norms from the row-norm identity and rescales in the wider of the base's and
the bypass's dtypes. Checked: float32 (1e-5), a bf16 base with a float32 or a bf16 bypass,
torch.autocast(bf16), dropout in training mode, and QDoRA on a bitsandbytes Linear4bit.

bf16 tolerances are bounds, not fitted numbers: each side rounds a handful of times to bf16
(unit roundoff U = 2^-8), each rounding off by at most U times the size of what it rounds,
which is at most `size` below (|c| |x| @ |V|^T + |b|, the output without cancellation).
"""

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")  # the import takes a few seconds; once per module
from peft import LoraConfig, get_peft_model  # noqa: E402

from _models import OneLayer  # noqa: E402
from lora_edu import DoRALinear, NF4Linear, QDoRALinear, quantize_nf4  # noqa: E402

IN, OUT, R, ALPHA, TOKENS = 40, 48, 4, 8, 6  # a non-square layer: a per-input norm could not broadcast
U_BF16 = 2.0 ** -8


def pair(dtype=torch.float32, bias=True, rslora=False, dropout=0.0, bypass_dtype=None, base=None):
    """(ours, peft_model, peft_layer) over copies of one nn.Linear, with the same trained-looking adapters."""
    torch.manual_seed(0)
    linear = nn.Linear(IN, OUT, bias=bias).to(dtype) if base is None else base
    ours = DoRALinear(copy.deepcopy(linear), r=R, alpha=ALPHA, dropout=dropout, rslora=rslora,
                      bypass_dtype=bypass_dtype)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"], lora_dropout=dropout, use_dora=True,
                        use_rslora=rslora)
    theirs = get_peft_model(OneLayer(copy.deepcopy(linear)), config)
    layer = theirs.base_model.model.proj
    copy_trained_adapters_(ours, layer)
    return ours, theirs, layer


def copy_trained_adapters_(ours, layer, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ours.lora_A.copy_(layer.lora_A["default"].weight)
        b = torch.randn(ours.lora_B.shape, generator=g) * 0.1
        m = ours.magnitude * (1 + 0.1 * torch.randn(ours.magnitude.shape, generator=g))
        ours.lora_B.copy_(b)
        ours.magnitude.copy_(m)
        layer.lora_B["default"].weight.copy_(b)
        layer.lora_magnitude_vector["default"].weight.copy_(m)


def inputs(dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(TOKENS, IN, generator=g).to(dtype).requires_grad_(True)


def size(ours, x):
    """|c| |x| @ |V|^T + |b|, float32: how large the terms of each output are before they cancel."""
    with torch.no_grad():
        v, norm = ours.directed_weight()
        c = (ours.magnitude / norm).abs()
        bias = 0 if ours.base.bias is None else ours.base.bias.float().abs()
        return c * (x.detach().float().abs() @ v.abs().T) + bias


def peft_grads(layer):
    return [layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad,
            layer.lora_magnitude_vector["default"].weight.grad]


def our_grads(ours):
    return [ours.lora_A.grad, ours.lora_B.grad, ours.magnitude.grad]


def run_both(ours, theirs, dtype=torch.float32, autocast=False, seed=None):
    """Forward and backward of the same loss on both; ((y, dx, grads) ours, (y, dx, grads) PEFT)."""
    results = []
    for model in (ours, theirs):
        x = inputs(dtype)
        if seed is not None:
            torch.manual_seed(seed)  # the same dropout mask on both sides
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = model(x)
        g = torch.Generator().manual_seed(11)
        (y.float() * torch.randn(y.shape, generator=g)).sum().backward()
        results.append((y, x.grad))
    return results


def rel_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ------------------------------------------------------------------ float32: 1e-5
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("rslora", [False, True], ids=["dora", "dora_rslora"])
def test_float32_forward_gradients_and_merge_equal_peft(bias, rslora):
    ours, theirs, layer = pair(bias=bias, rslora=rslora)
    (y_ours, dx_ours), (y_peft, dx_peft) = run_both(ours, theirs)
    torch.testing.assert_close(y_ours, y_peft, rtol=0, atol=1e-5)
    assert not torch.allclose(y_ours, ours.base(inputs()), atol=1e-3)  # the adapter changes the output
    torch.testing.assert_close(dx_ours, dx_peft, rtol=0, atol=1e-5)
    for got, want in zip(our_grads(ours), peft_grads(layer)):
        assert torch.count_nonzero(want) > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    merged = theirs.merge_and_unload().proj.weight
    ours.merge()
    torch.testing.assert_close(ours.base.weight, merged, rtol=0, atol=1e-5)


def test_the_norm_is_detached_on_both_sides():
    """Through the norm, dL/dB would differ by far more than 1e-5: the test above can tell."""
    ours, theirs, layer = pair()
    run_both(ours, theirs)
    a, b, m = (t.detach().clone().requires_grad_(True) for t in (ours.lora_A, ours.lora_B, ours.magnitude))
    v = ours.base.weight + ours.scaling * b @ a
    w = (m / v.norm(dim=1))[:, None] * v  # the norm NOT detached
    y = torch.nn.functional.linear(inputs().detach(), w, ours.base.bias)
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(11))).sum().backward()
    assert (b.grad - peft_grads(layer)[1]).abs().max() > 1e-3


# ------------------------------------------------------------------ a bf16 base, with and without autocast
@pytest.mark.parametrize("bypass_dtype", [None, torch.bfloat16], ids=["fp32_bypass", "bf16_bypass"])
@pytest.mark.parametrize("autocast", [False, True], ids=["eager", "autocast"])
@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float32], ids=["bf16_base", "fp32_base"])
def test_bf16_paths_equal_peft_within_bf16_rounding(base_dtype, autocast, bypass_dtype):
    if base_dtype == torch.float32 and not autocast and bypass_dtype is None:
        pytest.skip("the float32 case, checked to 1e-5 above")
    ours, theirs, layer = pair(dtype=base_dtype, bypass_dtype=bypass_dtype)
    (y_ours, dx_ours), (y_peft, dx_peft) = run_both(ours, theirs, base_dtype, autocast=autocast)
    assert y_ours.dtype == y_peft.dtype
    # ours rounds at most 3 times (W0 x, a bf16 bypass, the output), PEFT up to 4 (the base output,
    # minus the bias, its bypass under autocast, the output); the roundings of x, A, B and W0 that
    # autocast adds are the same on both sides: 8 U in all (measured here: at most 1.6 U)
    bound = 8 * U_BF16 * size(ours, inputs(base_dtype)) + 1e-6
    assert ((y_ours.float() - y_peft.float()).abs() <= bound).all()
    # gradients are sums of such products: equal to a few U in norm (measured: at most 1.3 U)
    assert rel_error(dx_ours, dx_peft) < 3 * U_BF16
    for got, want in zip(our_grads(ours), peft_grads(layer)):
        assert got.dtype == torch.float32  # float32 parameters get float32 gradients
        assert rel_error(got, want) < 3 * U_BF16


def test_a_bf16_bypass_never_rounds_a_float32_base_product():
    """On a float32 base the bf16 bypass rounds the bypass only: the base's share stays float32."""
    ours, theirs, layer = pair(bypass_dtype=torch.bfloat16)
    x = inputs().detach()
    with torch.no_grad():
        y_ours, y_peft = ours(x), theirs(x)
        bypass = ours.scaling * (x @ ours.lora_A.T @ ours.lora_B.T)
        c = (ours.magnitude / ours.weight_norm()).abs()
    # only the bypass (and its two small matmuls' inputs) is rounded: 3 U of c * |bypass|
    assert ((y_ours - y_peft).abs() <= 3 * U_BF16 * c * (x.abs() @ ours.lora_A.abs().T @ ours.lora_B.abs().T)
            * ours.scaling + 1e-6).all()
    assert (bypass.abs() > 1e-2).any()  # the bypass is not negligible


# ------------------------------------------------------------------ dropout
def test_dropout_in_training_equals_peft():
    """PEFT's DoRA drops out the bypass's and the rescale's input, not the base output's."""
    ours, theirs, layer = pair(dropout=0.3)
    ours.train(), theirs.train()
    (y_ours, dx_ours), (y_peft, dx_peft) = run_both(ours, theirs, seed=5)
    torch.testing.assert_close(y_ours, y_peft, rtol=0, atol=1e-5)
    torch.testing.assert_close(dx_ours, dx_peft, rtol=0, atol=1e-5)
    for got, want in zip(our_grads(ours), peft_grads(layer)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the test can tell: dropout changed the output, and eval mode is the plain DoRA forward
    ours.eval(), theirs.eval()
    with torch.no_grad():
        x = inputs().detach()
        assert not torch.allclose(ours(x), y_ours.detach(), atol=1e-3)
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)


def test_dropout_follows_the_formula():
    """y = base(x) + (c - 1) W0 x~ + c s B A x~, with x~ the dropped-out input, written out here."""
    ours, _, _ = pair(dropout=0.5)
    ours.train()
    x = inputs().detach()
    torch.manual_seed(3)
    y = ours(x)
    torch.manual_seed(3)
    x_drop = torch.nn.functional.dropout(x, 0.5, training=True)  # the same mask
    with torch.no_grad():
        w0, b = ours.base.weight, ours.base.bias
        v = w0 + ours.scaling * ours.lora_B @ ours.lora_A
        c = ours.magnitude / v.norm(dim=1)
        expected = (x @ w0.T + b) + (c - 1) * (x_drop @ w0.T) + c * ours.scaling * (x_drop @ ours.lora_A.T
                                                                                     @ ours.lora_B.T)
    torch.testing.assert_close(y.detach(), expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ QDoRA on bitsandbytes' Linear4bit
@pytest.mark.parametrize("double_quant", [False, True], ids=["no_dq", "dq_lut"])
def test_qdora_equals_peft_dora_on_linear4bit(double_quant):
    bnb = pytest.importorskip("bitsandbytes")
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    torch.manual_seed(0)
    in_f, out_f = 128, 48  # widths as in test_qlora_parity.py (no block split across rows)
    linear = nn.Linear(in_f, out_f)
    base4 = bnb.nn.Linear4bit(in_f, out_f, compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=double_quant)
    base4.load_state_dict(linear.state_dict())
    model = OneLayer(base4.to("cpu"))  # the move quantizes
    model.is_loaded_in_4bit = True  # what PEFT reads to pick its 4-bit layer
    with torch.compiler.set_stance("force_eager"):
        theirs = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"], use_dora=True))
        layer = theirs.base_model.model.proj
        assert isinstance(layer, PeftLinear4bit)
        weight = quantize_nf4(linear.weight.detach(), 64, double_quant=double_quant, dq_rounding="lut")
        ours = QDoRALinear(NF4Linear(weight, linear.bias), r=R, alpha=ALPHA)
        # the same dequantized base, so the magnitudes at init agree (PEFT stores its bf16 norm)
        assert torch.equal(ours.frozen_weight(torch.float32),
                           bnb.functional.dequantize_4bit(base4.weight.data, base4.weight.quant_state).float())
        torch.testing.assert_close(ours.magnitude, layer.lora_magnitude_vector["default"].weight,
                                   rtol=U_BF16, atol=0)
        copy_trained_adapters_(ours, layer)
        x = torch.randn(TOKENS, in_f, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
        y_ours, y_peft = ours(x), theirs(x)
        (y_ours.float().sum() + y_peft.float().sum()).backward()
    assert y_ours.dtype == y_peft.dtype == torch.bfloat16
    bound = 8 * U_BF16 * size(ours, x) + 1e-6  # as for the bf16 base above
    assert ((y_ours.float() - y_peft.float()).abs() <= bound).all()
    assert not torch.allclose(y_ours.float(), ours.base(x).float(), atol=1e-2)  # the adapter matters
    for got, want in zip(our_grads(ours), peft_grads(layer)):
        assert rel_error(got, want) < 3 * U_BF16
