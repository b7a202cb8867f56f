"""QLoRALinear against the production stack on CPU: bitsandbytes' Linear4bit, and PEFT on top.

Both sides start from the same nn.Linear. bitsandbytes quantizes a Linear4bit when it is
moved to a device (`.to("cpu")` after `load_state_dict`); our QLoRALinear.from_linear
quantizes at once, with the same block size (64) and double-quantization setting.

What matched, on this bitsandbytes (0.50):
- without double quantization: the packed codes, the dequantized weight and the base
  output are bit-identical, and so is PEFT's full QLoRA output for bf16 inputs;
- with double quantization: our default dq_rounding="nearest" picks another 8-bit code
  for a few of the scales than bitsandbytes' CPU lookup grid, so the weights of those
  blocks differ by one code step and the outputs agree only to bf16 tolerance; built with
  dq_rounding="lut" the base is bit-identical again.
Layer widths avoid multiples of 16 that split blocks across rows, where bitsandbytes'
AVX-512 dequantize kernel picks wrong scales (see test_nf4_parity.py).
"""

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")  # prints a harmless "kernels" warning

from _models import OneLayer  # noqa: E402

from lora_edu import NF4Linear, QLoRALinear, quantize_nf4  # noqa: E402

R, ALPHA, BLOCK = 8, 16, 64
S = ALPHA / R
U_BF16 = 2.0 ** -8  # bf16 unit roundoff: half an ulp at 1.0
U32 = 2.0 ** -24  # float32's, for the float32 accumulation inside the matmuls


@pytest.fixture(autouse=True)
def _eager_bitsandbytes_fallback():
    # bitsandbytes dequantizes odd widths in torch code that it torch.compile's once per
    # shape (about a second each); run those same operations eagerly.
    with torch.compiler.set_stance("force_eager"):
        yield


def make_linear(out_features, in_features, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


def bnb_linear4bit(linear: nn.Linear, double_quant: bool):
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=double_quant)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")  # the move is what quantizes, also on CPU


def bnb_weight(layer) -> torch.Tensor:
    """Linear4bit's weight dequantized by bitsandbytes itself, float32 [out, in]."""
    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()


def inputs(in_features, batch=6, seed=1, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, in_features, generator=g).to(dtype)


def set_b_(layer, seed=3, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)


def bf16_bound(x, w, w_other, bias=None, extra=None):
    """Largest |y1 - y2| between two bf16 linears on weights w and w_other.

    The exact difference |x| @ |w - w_other|.T, plus each side's roundings (input, weight
    and result to bf16: 3 U each) of |x| @ |w|.T + |b| (+ |extra|, a bypass added in bf16),
    plus float32 accumulation over the in_features terms on each side.
    """
    x = x.float().abs()
    mag = x @ w.abs().T + (0 if bias is None else bias.detach().abs())
    if extra is not None:
        mag = mag + extra.abs()
    return x @ (w - w_other).abs().T + (6 * U_BF16 + 2 * w.shape[1] * U32) * mag + 1e-7


# ------------------------------------------------------------------ the base layer
def test_linear4bit_quantizes_when_moved_and_keeps_a_quant_state():
    linear = make_linear(48, 128)
    layer = bnb.nn.Linear4bit(128, 48, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
    layer.load_state_dict(linear.state_dict())
    assert layer.weight.dtype == torch.float32 and getattr(layer.weight, "quant_state", None) is None
    layer = layer.to("cpu")
    state = layer.weight.quant_state
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == 48 * 128 // 2
    assert state.blocksize == BLOCK and state.nested and state.quant_type == "nf4"
    assert tuple(state.shape) == (48, 128)


# (out, in): whole blocks per row; in = 100 and 65 are not multiples of 16, so rows split
# blocks without tripping the AVX-512 kernel; 33 x 65 = 2145 weights, a ragged last block
# and an odd count (a padding nibble).
SHAPES = [(48, 128), (40, 100), (33, 65)]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_without_double_quant_base_is_bit_identical(shape, bias):
    linear = make_linear(*shape, bias=bias)
    theirs = bnb_linear4bit(linear, double_quant=False)
    ours = QLoRALinear.from_linear(linear, r=R, alpha=ALPHA, block_size=BLOCK, double_quant=False)
    assert torch.equal(ours.base.weight_q.codes, theirs.weight.data.view(-1))  # byte for byte
    assert torch.equal(ours.base.dequantized_weight(torch.float32), bnb_weight(theirs))
    for batch in (6, 1):  # batch 1 takes bitsandbytes' inference (gemv) path
        x = inputs(shape[1], batch)
        with torch.no_grad():
            assert torch.equal(ours.base(x), theirs(x))
            # float32 in: bitsandbytes computes in bf16 too, then casts back to the input dtype
            x32 = x.float() + 1e-3
            y = theirs(x32)
            assert y.dtype == torch.float32 and torch.equal(ours.base(x32).float(), y)


def test_with_double_quant_nearest_rounding_differs_from_bitsandbytes_in_a_few_blocks():
    # A 256 x 512 layer has 2048 scales; our "nearest" 8-bit rounding and bitsandbytes'
    # CPU lookup grid disagree on a handful of them, by one code each.
    linear = make_linear(256, 512)
    theirs = bnb_linear4bit(linear, double_quant=True)
    ours = QLoRALinear.from_linear(linear, r=R, alpha=ALPHA, block_size=BLOCK, double_quant=True)
    our_codes, their_codes = ours.base.weight_q.absmax.codes, theirs.weight.quant_state.absmax
    differ = our_codes != their_codes  # [2048], one per block of 64 weights
    assert 0 < differ.sum() < 0.01 * differ.numel()
    assert (our_codes.int() - their_codes.int()).abs().max() == 1
    assert torch.equal(ours.base.weight_q.codes, theirs.weight.data.view(-1))  # the 4-bit codes agree
    w_ours, w_theirs = ours.base.dequantized_weight(torch.float32), bnb_weight(theirs)
    per_weight = differ.repeat_interleave(BLOCK).view(w_ours.shape)
    assert torch.equal(w_ours[~per_weight], w_theirs[~per_weight])  # same scale code, same weight
    assert not torch.equal(w_ours[per_weight], w_theirs[per_weight])

    # In the bf16 compute dtype most of those differences round away (3 weights are left
    # here), so many inputs give bit-identical outputs; a batch of 32 shows a few that do not.
    w_ours_bf16, w_theirs_bf16 = w_ours.bfloat16(), w_theirs.bfloat16()
    assert 0 < (w_ours_bf16 != w_theirs_bf16).sum() < (w_ours != w_theirs).sum()
    x = inputs(512, batch=32)
    with torch.no_grad():
        y_ours, y_theirs = ours.base(x).float(), theirs(x).float()
    assert not torch.equal(y_ours, y_theirs)
    assert ((y_ours - y_theirs).abs() <= bf16_bound(x, w_ours, w_theirs, linear.bias)).all()

    # with bitsandbytes' rounding rule the base is bit-identical again
    lut = NF4Linear(quantize_nf4(linear.weight.detach(), BLOCK, double_quant=True, dq_rounding="lut"), linear.bias)
    assert torch.equal(lut.weight_q.absmax.codes, their_codes)
    with torch.no_grad():
        assert torch.equal(lut(x), theirs(x))


# ------------------------------------------------------------------ the full QLoRA forward
@pytest.mark.parametrize("double_quant", [False, True], ids=["no_dq", "dq_lut"])
def test_qlora_forward_matches_linear4bit_plus_the_bypass(double_quant):
    linear = make_linear(256, 512)
    theirs = bnb_linear4bit(linear, double_quant)
    if double_quant:  # with bitsandbytes' rounding of the scales, so that the bases are bit-identical too
        weight = quantize_nf4(linear.weight.detach(), BLOCK, double_quant=True, dq_rounding="lut")
        ours = QLoRALinear(NF4Linear(weight, linear.bias), r=R, alpha=ALPHA)
    else:  # the one-call recipe
        ours = QLoRALinear.from_linear(linear, r=R, alpha=ALPHA, block_size=BLOCK, double_quant=False)
    set_b_(ours)
    A, B = ours.lora_A.detach(), ours.lora_B.detach()
    x = inputs(512)
    with torch.no_grad():
        base = theirs(x)  # [batch, out] bf16: bitsandbytes' dequantize + F.linear
        assert torch.equal(ours.base(x), base)  # so the bases contribute no difference at all
        bypass = S * ((x.float() @ A.T) @ B.T)  # [batch, out] float32, s = alpha / r from the test's constants
        expected = base + bypass.to(torch.bfloat16)  # QLoRA: bf16 base plus the bypass rounded to bf16
        y = ours(x)
    assert y.dtype == expected.dtype == torch.bfloat16

    # Tolerance: only the bypass can differ, and only by float rounding. Each side's float32
    # bypass carries at most (in + r) U32 of s |x| |A|^T |B|^T from its two accumulations, in
    # whatever order its kernel adds; rounding each to bf16 adds at most one ulp (2 U) of the
    # bypass between the two, and rounding the sums adds one ulp (2 U) of |y|. (1e-7: room
    # for an output that rounds to 0 on one side only.)
    mag = S * ((x.float().abs() @ A.abs().T) @ B.abs().T)  # [batch, out]
    bound = 2 * (512 + R) * U32 * mag + 2 * U_BF16 * (bypass.abs() + expected.float().abs()) + 1e-7

    def within(output):
        return ((output.float() - expected.float()).abs() <= bound).all()

    assert within(y)
    # The bound's power: a bypass 11% too small (s = alpha / (r + 1) at r = 8) must fail it,
    # and so must leaving the bypass out; both are far outside float rounding here.
    assert not within(base.float() + ALPHA / (R + 1) * ((x.float() @ A.T) @ B.T))
    assert not within(base)


# ------------------------------------------------------------------ PEFT on a Linear4bit
@pytest.mark.parametrize("double_quant", [False, True], ids=["no_dq", "dq_lut"])
def test_peft_lora_on_linear4bit_equals_ours(double_quant):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    linear = make_linear(48, 128)
    model = OneLayer(bnb_linear4bit(linear, double_quant))
    model.is_loaded_in_4bit = True  # what PEFT reads to pick its 4-bit LoRA layer
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"],
                                                            lora_dropout=0.0))
    layer = peft_model.base_model.model.proj
    assert isinstance(layer, PeftLinear4bit)
    assert layer.scaling["default"] == S

    # ours on the same NF4 weight: with double quantization, built with bitsandbytes' rounding
    weight = quantize_nf4(linear.weight.detach(), BLOCK, double_quant=double_quant, dq_rounding="lut")
    ours = QLoRALinear(NF4Linear(weight, linear.bias), r=R, alpha=ALPHA)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        ours.lora_A.copy_(layer.lora_A["default"].weight)
        b = torch.randn(ours.lora_B.shape, generator=g) * 0.1
        ours.lora_B.copy_(b)
        layer.lora_B["default"].weight.copy_(b)

    # bf16 input: the same roundings in the same order, bit for bit
    x = inputs(128)
    y_ours, y_peft = ours(x), peft_model(x)
    assert torch.equal(y_ours, y_peft)
    # and the same adapter gradients
    dy = torch.randn(y_ours.shape, generator=g)
    (y_ours.float() * dy).sum().backward()
    (y_peft.float() * dy).sum().backward()
    torch.testing.assert_close(ours.lora_A.grad, layer.lora_A["default"].weight.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.lora_B.grad, layer.lora_B["default"].weight.grad, rtol=1e-5, atol=1e-7)
    assert ours.lora_A.grad.abs().max() > 0

    # float32 input: PEFT gets the bf16 base back as float32 and adds the float32 bypass in
    # float32; ours adds in bf16 and so rounds the bypass and the sum once more (2 U).
    x32 = x.float() + 1e-3
    with torch.no_grad():
        y_ours, y_peft = ours(x32), peft_model(x32)
        bypass = S * (x32 @ ours.lora_A.T @ ours.lora_B.T)
    assert y_ours.dtype == torch.bfloat16 and y_peft.dtype == torch.float32
    bound = 2 * U_BF16 * (y_peft.abs() + bypass.abs()) + 1e-6
    assert ((y_ours.float() - y_peft).abs() <= bound).all()
