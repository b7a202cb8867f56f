"""lora_edu.quant.qlora: NF4Linear (a frozen 4-bit base) and QLoRALinear (LoRA on top of it).

Expected values are rebuilt here from the QLoRA forward

    h = dequant(W0_nf4) x + s * B (A x),   s = alpha / r,   base matmul in the compute dtype

with the weight dequantized by quantize_nf4 (itself checked byte for byte against
bitsandbytes in test_nf4_parity.py) or unpacked by hand, never read back from the layer
under test. Tolerances are stated in units of the compute dtype's unit roundoff U.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_edu.quant.qlora as qlora_module
from _models import assert_unchanged, make_model, randomise_adapters_, snapshot, token_ids
from lora_edu import (Adam, DoRALinear, NF4Linear, PagedAdam, QDoRALinear, QLoRALinear, TinyConfig, TinyLlama,
                      adapter_modules,
                      bits_per_param, count_trainable_params, inject_lora, load_adapter, merge_lora, nf4_levels,
                      prepare_qlora, quantize_nf4, read_adapter, save_adapter, unmerge_lora)

IN, OUT, R, ALPHA, BLOCK = 80, 24, 8, 16, 64
S = ALPHA / R  # the LoRA scaling, 2.0
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# unit roundoff (half an ulp at 1.0) of each dtype: 2^-24, 2^-11, 2^-8
U = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
U32 = U[torch.float32]  # CPU matmuls accumulate in float32: n terms add up to n * U32 relative
# (out, in): numel a multiple of 64 (1920), then 91, 2145 and 15 weights, which leave a ragged last block
SHAPES = [(OUT, IN), (13, 7), (33, 65), (5, 3)]


def make_base(out_features=OUT, in_features=IN, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


def make_qlora(base=None, compute_dtype=torch.bfloat16, double_quant=True, **kw) -> QLoRALinear:
    base = make_base() if base is None else base
    return QLoRALinear.from_linear(base, r=kw.pop("r", R), alpha=kw.pop("alpha", ALPHA), block_size=BLOCK,
                                   double_quant=double_quant, compute_dtype=compute_dtype, **kw)


def w_hat(base: nn.Linear, double_quant=True) -> torch.Tensor:
    """dequant(W0) in float32, from the quantizer itself: [out, in]."""
    wq = quantize_nf4(base.weight.detach(), block_size=BLOCK, double_quant=double_quant)
    return wq.dequantize(torch.float32)


def set_b_(layer, seed=3, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)


def inputs(in_features=IN, batch=6, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, in_features, generator=g)


def magnitude(x, w, b=None) -> torch.Tensor:
    """|x| @ |W|.T + |b|, [batch, out]: the scale every rounding error of x @ W.T + b is measured against."""
    out = x.float().abs() @ w.float().abs().T
    return out if b is None else out + b.float().abs()


# ------------------------------------------------------------------ the NF4 base
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_base_becomes_nf4linear_holding_the_quantizer_weight(shape):
    base = make_base(*shape)
    for double_quant in (True, False):
        layer = make_qlora(base, double_quant=double_quant)
        assert type(layer.base) is NF4Linear
        assert layer.base.weight_q.double_quant is double_quant
        assert layer.base.weight_q.block_size == BLOCK
        assert torch.equal(layer.base.dequantized_weight(torch.float32), w_hat(base, double_quant))
        assert torch.equal(layer.base.bias, base.bias)  # a copy of the float bias, not quantized
        assert layer.base.bias.data_ptr() != base.bias.data_ptr()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_nf4_weight_unpacked_by_hand(shape):
    # Without double quantization the scales are plain float32, so the weight can be rebuilt
    # from the bytes: two codes per byte, high nibble first, W_hat = absmax[block] * NF4[code].
    base = make_base(*shape)
    wq = make_qlora(base, double_quant=False).base.weight_q
    n = base.weight.numel()
    w = base.weight.detach()
    block_max = torch.stack([blk.abs().max() for blk in w.reshape(-1).split(BLOCK)])  # [n_blocks]
    assert torch.equal(wq.absmax, block_max)  # one float32 scale per block: its largest |w|
    codes = torch.stack([wq.codes >> 4, wq.codes & 0x0F], dim=1).view(-1)[:n].long()  # [n]
    blocks = torch.arange(n) // BLOCK  # [n], the block of each weight
    by_hand = (nf4_levels()[codes] * block_max[blocks]).view(shape)
    assert torch.equal(wq.dequantize(torch.float32), by_hand)
    # and each code is the nearest level: |W - W_hat| <= half the widest NF4 gap times absmax
    half_gap = nf4_levels().diff().max() / 2  # the widest gap is -1 to -0.6962: 0.1519
    assert ((w - by_hand).abs() <= half_gap * block_max[blocks].view(shape) * (1 + 1e-6)).all()


def test_half_precision_base_is_quantized_from_its_own_values():
    # Models are often loaded in bf16 before quantization; NF4 scales those bf16 values.
    base = make_base().to(torch.bfloat16)
    layer = make_qlora(base, compute_dtype=torch.bfloat16)
    assert torch.equal(layer.base.dequantized_weight(torch.float32), w_hat(base))
    x = inputs()
    expected = F.linear(x.bfloat16(), w_hat(base).bfloat16(), base.bias.detach())
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("compute_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_output_at_init_equals_the_nf4_base_exactly(bias, compute_dtype):
    base = make_base(bias=bias)
    layer = make_qlora(base, compute_dtype=compute_dtype)
    x = inputs()
    assert torch.count_nonzero(layer.lora_B) == 0  # B = 0, so dW = 0 at step 0
    assert torch.equal(layer(x), layer.base(x))
    # the base is a plain F.linear in the compute dtype on the dequantized weight
    b = None if not bias else base.bias.detach().to(compute_dtype)
    expected = F.linear(x.to(compute_dtype), w_hat(base).to(compute_dtype), b)
    assert torch.equal(layer.base(x), expected)


def test_base_holds_buffers_only_and_adapter_is_all_that_trains():
    layer = make_qlora()
    assert list(layer.base.parameters()) == []
    assert sorted(name for name, _ in layer.base.named_buffers()) == ["bias", "codes"]
    assert layer.base.codes.dtype == torch.uint8
    assert [name for name, _ in layer.named_parameters()] == ["lora_A", "lora_B"]
    assert layer.lora_A.shape == (R, IN) and layer.lora_B.shape == (OUT, R)
    assert count_trainable_params(layer) == R * (IN + OUT) == 832


def test_no_bias_base_has_only_the_codes_buffer():
    layer = make_qlora(make_base(bias=False))
    assert layer.base.bias is None
    assert [name for name, _ in layer.base.named_buffers()] == ["codes"]


@pytest.mark.parametrize("compute_dtype", DTYPES, ids=str)
def test_gradients_at_step_zero_reach_b_and_x_but_not_a(compute_dtype):
    base = make_base()
    layer = make_qlora(base, compute_dtype=compute_dtype)
    x = inputs().requires_grad_(True)
    g = torch.randn(6, OUT, generator=torch.Generator().manual_seed(4))  # dL/dh
    (layer(x).float() * g).sum().backward()

    assert torch.count_nonzero(layer.lora_A.grad) == 0  # dL/dA = s * B.T (...) and B = 0
    g_cd = g.to(compute_dtype).float()  # the gradient as it reaches the bypass, rounded once
    expected_b = S * g_cd.T @ (x.detach() @ layer.lora_A.detach().T)  # [out, batch] @ [batch, r]
    assert torch.count_nonzero(expected_b) == expected_b.numel()
    torch.testing.assert_close(layer.lora_B.grad, expected_b, rtol=1e-5, atol=1e-6)

    # dL/dx = g @ dequant(W0): the gradient flows through the dequantized weight. In the
    # compute dtype, g, W and the product are each rounded once (3 U of |g| @ |W|), and the
    # sum over OUT terms accumulates in float32.
    w = w_hat(base)
    assert x.grad is not None and x.grad.dtype == torch.float32
    bound = (3 * U[compute_dtype] + OUT * U32) * (g.abs() @ w.abs()) + 1e-7
    assert ((x.grad - g @ w).abs() <= bound).all()
    assert x.grad.abs().max() > 0.1


def test_optimizer_over_model_parameters_holds_state_for_the_adapter_only():
    layer = make_qlora()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = inputs()
    a0 = layer.lora_A.detach().clone()
    layer(x).float().square().mean().backward()
    opt.step()
    state = opt.state_dict()["state"]
    assert len(state) == 2  # one entry per parameter: lora_A and lora_B, nothing for W0
    sizes = sorted(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in state.values())
    assert sizes == sorted([2 * R * IN, 2 * OUT * R])
    assert sum(sizes) == 2 * R * (IN + OUT)  # 8 bytes per trained float32 parameter, none for the base
    # step 0: A's gradient is zero, so Adam leaves it bit for bit; B moves
    assert torch.equal(layer.lora_A.detach(), a0)
    assert torch.count_nonzero(layer.lora_B) == layer.lora_B.numel()


def test_lora_edu_adam_over_model_parameters_holds_two_adapter_states():
    layer = make_qlora()
    opt = Adam(layer.parameters())
    layer(inputs()).float().sum().backward()
    opt.step()
    assert set(opt.state) == {id(layer.lora_A), id(layer.lora_B)}
    assert sum(m.numel() + v.numel() for m, v in opt.state.values()) == 2 * R * (IN + OUT)


# ------------------------------------------------------------------ the forward
@pytest.mark.parametrize("compute_dtype", DTYPES, ids=str)
def test_output_dtype_is_the_compute_dtype(compute_dtype):
    layer = make_qlora(compute_dtype=compute_dtype)
    set_b_(layer)
    for input_dtype in DTYPES:
        out = layer(inputs().to(input_dtype))
        assert out.dtype == compute_dtype and out.shape == (6, OUT)
        assert torch.isfinite(out).all()


# every shape, and bias on and off on both a whole-block and a ragged shape
CASES = [((OUT, IN), True), ((OUT, IN), False), ((13, 7), False), ((33, 65), True), ((5, 3), False)]


@pytest.mark.parametrize("shape, bias", CASES, ids=str)
@pytest.mark.parametrize("compute_dtype", DTYPES, ids=str)
def test_forward_is_dequantized_base_plus_scaled_bypass(compute_dtype, shape, bias):
    base = make_base(*shape, bias=bias)
    layer = make_qlora(base, compute_dtype=compute_dtype)
    set_b_(layer, std=0.5)
    x = inputs(shape[1])
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    b = base.bias.detach().to(compute_dtype) if bias else None
    expected = (F.linear(x.to(compute_dtype), w_hat(base).to(compute_dtype), b)
                + (S * (x @ A.T @ B.T)).to(compute_dtype))  # [batch, out]
    # The same roundings in the same order; only the float32 bypass may be associated
    # differently, which can move the rounded sum by one unit in the last place: 2 U.
    ours = layer(x).detach()
    tol = 2 * U[compute_dtype] * (expected.float().abs() + (S * (x @ A.T @ B.T)).abs()) + 1e-6
    assert ((ours.float() - expected.float()).abs() <= tol).all()
    # the bypass is really there: without it the output is far off
    assert ((layer.base(x).float() - expected.float()).abs() > 10 * tol).any()


def test_rslora_and_dropout_pass_through():
    layer = make_qlora(rslora=True, dropout=0.1)
    assert layer.scaling == pytest.approx(ALPHA / math.sqrt(R))
    assert isinstance(layer.lora_dropout, nn.Dropout) and layer.lora_dropout.p == 0.1


# ------------------------------------------------------------------ merging
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_to_merged_linear_is_a_plain_linear_with_dequant_plus_dw(dtype, bias):
    base = make_base(bias=bias)
    layer = make_qlora(base, compute_dtype=dtype)
    set_b_(layer)
    merged = layer.to_merged_linear(dtype)
    assert type(merged) is nn.Linear
    assert merged.weight.dtype == dtype and (merged.in_features, merged.out_features) == (IN, OUT)
    assert not any(p.requires_grad for p in merged.parameters())
    dw = S * (layer.lora_B.detach() @ layer.lora_A.detach())  # [out, in], float32
    assert torch.equal(merged.weight, (w_hat(base) + dw).to(dtype))  # one rounding, from float32
    if bias:
        assert torch.equal(merged.bias, base.bias.detach().to(dtype))
    else:
        assert merged.bias is None
    # Output against the QLoRA layer, both in dtype. Each side rounds x, the weight and the
    # result (the QLoRA side also the bypass and the sum): at most about 7 U of |x| |W| + |b|,
    # plus float32 accumulation over IN terms on each side.
    x = inputs()
    ours, theirs = merged(x.to(dtype)).float(), layer(x).detach().float()
    bound = (8 * U[dtype] + 2 * IN * U32) * magnitude(x, w_hat(base) + dw, base.bias if bias else None) + 1e-7
    assert ((ours - theirs).abs() <= bound).all()
    assert ((ours - layer.base(x).float()).abs() > bound).any()  # dW is in it


def test_to_merged_linear_does_not_change_the_layer():
    layer = make_qlora()
    set_b_(layer)
    x = inputs()
    before = layer(x).detach()
    codes = layer.base.codes.clone()
    layer.to_merged_linear(torch.float32)
    assert torch.equal(layer(x), before)
    assert torch.equal(layer.base.codes, codes) and not layer.merged


def _merge_errors(std):
    """(W_hat, dW, re-quantized merge, errors vs the exact merge) for a 256 x 256 layer."""
    base = make_base(256, 256, bias=False)
    layer = make_qlora(base, compute_dtype=torch.float32)
    set_b_(layer, std=std)
    w = w_hat(base)
    dw = S * (layer.lora_B.detach() @ layer.lora_A.detach())  # [out, in]
    exact = w + dw
    requant = quantize_nf4(exact, block_size=BLOCK, double_quant=True)
    err = {
        "fp32": (layer.to_merged_linear(torch.float32).weight - exact).norm(),
        "bf16": (layer.to_merged_linear(torch.bfloat16).weight.float() - exact).norm(),
        "nf4": (requant.dequantize() - exact).norm(),
        "first": (w - base.weight.detach()).norm(),  # the error of quantizing W0 at all
    }
    return layer, w, dw, requant, err


def test_requantizing_a_small_merged_update_loses_it():
    # The merge pitfall: W_hat + dW is not on the NF4 grid. Kept in float32 the merge is
    # exact; bf16 rounds it once (at most 2^-8 relative per weight); re-quantizing costs more.
    layer, w, dw, requant, err = _merge_errors(std=0.002)
    assert dw.norm() < 0.02 * w.norm()  # a small update, about 1% of the weight
    assert err["fp32"] == 0
    assert 0 < err["bf16"] < err["nf4"]
    assert err["bf16"] < 2 ** -8 * (w + dw).norm()
    # What happens (measured): each W_hat sits on a level and dW moves it far less than half
    # a gap, so every 4-bit code comes back unchanged; only the block scales shift a little.
    # The re-quantized weight is W_hat with a change nearly orthogonal to dW, and its error
    # is larger than the whole update (about 1.4 |dW| here): the update is lost.
    assert torch.equal(requant.codes, layer.base.weight_q.codes)
    assert err["nf4"] > dw.norm()
    change = (requant.dequantize() - w).view(-1)
    assert F.cosine_similarity(change, dw.view(-1), dim=0) < 0.1


def test_requantizing_a_large_merged_update_costs_the_first_quantization_error_again():
    # For contrast, an update of about 30% of the weight moves codes; the re-quantization
    # error is then the usual NF4 error, about that of quantizing W0 in the first place,
    # and smaller than dW, which survives in direction.
    layer, w, dw, requant, err = _merge_errors(std=0.05)
    assert dw.norm() > 0.2 * w.norm()
    assert not torch.equal(requant.codes, layer.base.weight_q.codes)
    assert err["nf4"] < 0.5 * dw.norm()
    assert 0.8 < err["nf4"] / err["first"] < 1.25
    change = (requant.dequantize() - w).view(-1)
    assert F.cosine_similarity(change, dw.view(-1), dim=0) > 0.9


def test_merge_raises_and_points_to_to_merged_linear():
    layer = make_qlora()
    set_b_(layer)
    x = inputs()
    before = layer(x).detach()
    with pytest.raises(RuntimeError, match=r"cannot merge in place.*to_merged_linear"):
        layer.merge()
    assert not layer.merged and torch.equal(layer(x), before)


def test_unmerge_raises_and_points_to_to_merged_linear():
    # The brief: both merge() and unmerge() say where the merged layer comes from.
    # Fails in lora_edu 0.1.0: unmerge's message ("nothing to unmerge") does not name it.
    with pytest.raises(RuntimeError, match=r"to_merged_linear"):
        make_qlora().unmerge()


def _qlora_model(seed=0, **kw):
    """TinyModel with every nn.Linear replaced by hand by a QLoRALinear (compute dtype bf16).

    Every Linear, because a QLoRALinear returns its compute dtype: a float32 nn.Linear right
    after a bf16 one would fail on the dtype mismatch.
    """
    model = make_model(seed)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, QLoRALinear.from_linear(getattr(parent, child), r=4, alpha=8, **kw))
    return model, names


def test_merge_lora_on_a_model_with_qlora_layers_raises():
    model, _ = _qlora_model()
    with pytest.raises(RuntimeError, match=r"to_merged_linear"):
        merge_lora(model)
    assert not any(getattr(m, "merged", False) for m in model.modules())


def test_unmerge_lora_on_a_model_with_qlora_layers_raises():
    model, _ = _qlora_model()
    with pytest.raises(RuntimeError, match=r"QLoRA layer"):
        unmerge_lora(model)


def test_merge_lora_refuses_before_merging_anything():
    # A model may mix plain LoRA layers (on an unquantized part, e.g. an fp32 attention) and
    # QLoRA ones (here the head). merge_lora must refuse as a whole, like inject_lora, not
    # merge the LoRA layers it meets first and then raise at the QLoRA one.
    # Fails in lora_edu 0.1.0: the two q_proj layers come first and are merged.
    model = inject_lora(make_model(0), ["q_proj"], r=4, alpha=8)
    model.head = QLoRALinear.from_linear(model.head, r=4, alpha=8)
    randomise_adapters_(model)
    ids = token_ids()
    before = model(ids)
    with pytest.raises(RuntimeError, match=r"to_merged_linear"):
        merge_lora(model)
    assert [layer.merged for layer in adapter_modules(model).values()] == [False, False, False]
    assert torch.equal(model(ids), before)


# ------------------------------------------------------------------ the whole-model recipe
def test_prepare_qlora_quantizes_every_linear_but_the_head_and_adapts_the_targets():
    torch.manual_seed(0)
    model = prepare_qlora(TinyLlama(TinyConfig()), ["q_proj", "v_proj"], r=4)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, NF4Linear, QLoRALinear))}
    adapted = {n for n, m in linears.items() if isinstance(m, QLoRALinear)}
    assert adapted == {f"layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    plain = {n for n, m in linears.items() if type(m) is nn.Linear}
    assert plain == {"lm_head"} and model.lm_head.weight.dtype == torch.bfloat16  # skipped: 16-bit, not NF4
    assert model.embed_tokens.weight.dtype == model.norm.weight.dtype == torch.bfloat16  # cast to compute dtype
    assert all(m.base.compute_dtype == torch.bfloat16 for n, m in linears.items() if n in adapted)


def test_prepare_qlora_refuses_a_target_that_only_names_a_skipped_layer():
    # The head is skipped (kept in 16 bits): asking for an adapter there must be an error that
    # names it, not a model with no adapter on it and no word said.
    model = TinyLlama(TinyConfig())
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"\['lm_head'\] matched no nn\.Linear"):
        prepare_qlora(model, ["lm_head"])
    assert_unchanged(model, before)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.float64], ids=str)
def test_to_merged_linear_rejects_non_float_dtypes(dtype):
    layer = make_qlora()
    with pytest.raises(ValueError, match=rf"merged layer's dtype.*got {dtype}"):
        layer.to_merged_linear(dtype)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64, "bfloat16"], ids=str)
def test_compute_dtype_must_be_a_float_dtype(dtype):
    with pytest.raises(ValueError, match=rf"compute_dtype must be torch.float32.*got {dtype}"):
        make_qlora(compute_dtype=dtype)
    with pytest.raises(ValueError, match=r"compute_dtype must be"):
        NF4Linear(quantize_nf4(torch.randn(4, 8)), compute_dtype=dtype)


@pytest.mark.parametrize("base", [nn.Conv1d(4, 4, 1), nn.Embedding(4, 4), torch.randn(4, 4)],
                         ids=["conv", "embedding", "tensor"])
def test_from_linear_needs_an_nn_linear(base):
    with pytest.raises(TypeError, match=r"QLoRALinear.from_linear takes an nn.Linear, got"):
        QLoRALinear.from_linear(base)
    with pytest.raises(TypeError, match=r"NF4Linear.from_linear takes an nn.Linear"):
        NF4Linear.from_linear(base)


def test_from_linear_on_an_already_quantized_layer_is_refused():
    nf4 = NF4Linear.from_linear(make_base())
    with pytest.raises(TypeError, match=r"takes an nn.Linear, got NF4Linear"):
        QLoRALinear.from_linear(nf4)


@pytest.mark.parametrize("kw, exc, msg", [
    (dict(r=0), ValueError, r"r must be a positive int.*r=0"),
    (dict(r=2.5), TypeError, r"r must be a positive int"),
    (dict(alpha=0), ValueError, r"alpha must be a positive, finite number"),
    (dict(alpha=float("nan")), ValueError, r"alpha must be a positive, finite number"),
    (dict(dropout=1.0), ValueError, r"dropout must be a probability"),
])
def test_bad_hparams_raise_before_quantizing(kw, exc, msg, monkeypatch):
    calls = []
    real = qlora_module.quantize_nf4

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(qlora_module, "quantize_nf4", spy)
    make_qlora()
    assert calls == [1]  # the spy sits on the path from_linear takes
    with pytest.raises(exc, match=msg):
        make_qlora(**kw)
    assert calls == [1]  # refused before any quantization


@pytest.mark.parametrize("shape", [(100,), (2, 3, 16)], ids=["1d", "3d"])
def test_nf4linear_needs_a_2d_weight(shape):
    with pytest.raises(ValueError, match=r"NF4Linear weight is \[out, in\], got shape " + rf"\({shape[0]},"):
        NF4Linear(quantize_nf4(torch.randn(shape)))


def test_qlora_wraps_an_nf4linear_not_a_plain_linear():
    with pytest.raises(TypeError, match=r"QLoRALinear wraps an NF4Linear, got Linear"):
        QLoRALinear(nn.Linear(IN, OUT))
    layer = QLoRALinear(NF4Linear.from_linear(make_base()), r=R, alpha=ALPHA)  # the right way round
    assert layer.lora_A.shape == (R, IN)


# ------------------------------------------------------------------ memory
@pytest.mark.parametrize("double_quant, bits", [(True, 4 + 8 / 64 + 32 / (64 * 256)), (False, 4 + 32 / 64)],
                         ids=["dq_4.127", "no_dq_4.5"])
def test_nf4_bytes_against_an_fp16_linear(double_quant, bits):
    base = make_base(512, 512, bias=False)
    nf4 = NF4Linear.from_linear(base, block_size=BLOCK, double_quant=double_quant)
    fp16 = copy.deepcopy(base).half()
    fp16_bytes = sum(p.numel() * p.element_size() for p in fp16.parameters())
    assert fp16_bytes == 512 * 512 * 2
    n = 512 * 512
    if double_quant:  # 4-bit codes, 8-bit scales, float32 second-level scales, one float32 offset
        assert nf4.nbytes == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4
    else:  # 4-bit codes, float32 scales
        assert nf4.nbytes == n // 2 + 4 * (n // 64)
    assert bits_per_param(BLOCK, double_quant) == pytest.approx(bits, rel=1e-12)
    # the single float32 offset adds 32 bits in 262,144 weights: 1e-4 bit
    assert nf4.nbytes / fp16_bytes == pytest.approx(bits / 16, rel=1e-4)


def test_nf4_bytes_count_the_float32_bias():
    with_bias = NF4Linear.from_linear(make_base(bias=True))
    without = NF4Linear.from_linear(make_base(bias=False))
    assert with_bias.nbytes - without.nbytes == 4 * OUT


# ------------------------------------------------------------------ adapters on disk
def test_save_and_load_adapter_round_trip_bit_exactly(tmp_path):
    model, names = _qlora_model()
    randomise_adapters_(model)
    path = tmp_path / "qlora.safetensors"
    save_adapter(model, path)

    config, tensors = read_adapter(path)
    assert sorted(tensors) == sorted(f"{n}.{p}" for n in names for p in ("lora_A", "lora_B"))
    assert config["targets"] == sorted(names) and config["r"] == 4

    fresh, _ = _qlora_model()  # the same base, quantized again, with fresh adapters
    ids = token_ids()
    assert not torch.equal(fresh(ids), model(ids))
    load_adapter(fresh, path)
    for (name, p), (name2, q) in zip(model.named_parameters(), fresh.named_parameters()):
        assert name == name2 and torch.equal(p, q), name
    assert torch.equal(fresh(ids), model(ids))


# ------------------------------------------------------------------ the paged optimizer
def test_paged_adam_trains_a_qlora_layer_like_torch_adam():
    layer = make_qlora()
    set_b_(layer)
    twin = copy.deepcopy(layer)
    ours = PagedAdam(layer.parameters(), lr=1e-2)
    theirs = torch.optim.Adam(twin.parameters(), lr=1e-2, foreach=False)
    g = torch.Generator().manual_seed(5)
    start = [p.detach().clone() for p in layer.parameters()]
    for _ in range(4):
        x, target = torch.randn(8, IN, generator=g), torch.randn(8, OUT, generator=g)
        for model, opt in ((layer, ours), (twin, theirs)):
            opt.zero_grad()
            (model(x).float() - target).square().mean().backward()
            opt.step()
        for p, q in zip(layer.parameters(), twin.parameters()):
            assert torch.equal(p, q)
    assert all(not torch.equal(p, p0) for p, p0 in zip(layer.parameters(), start))
    assert ours.state_bytes() == 8 * R * (IN + OUT)  # m and v of A and B, float32


# ------------------------------------------------------------------ device moves
def test_moving_the_layer_moves_the_weight_it_computes_with():
    # Module.to() moves parameters and buffers; the NF4 codes are a buffer, but forward
    # dequantizes from weight_q, whose codes and scales are not, so they stay behind.
    # On a GPU, QLoRALinear.from_linear(...).cuda() then fails in F.linear ("mat2 is on
    # cpu", seen on an H200 with torch 2.11). The meta device shows it on a CPU-only machine.
    # Fails in lora_edu 0.1.0.
    layer = make_qlora()
    layer.to("meta")
    assert layer.lora_A.device.type == "meta" and layer.base.codes.device.type == "meta"
    assert layer.base.dequantized_weight().device.type == "meta"


def test_backward_keeps_no_dequantized_weight_alive():
    # Autograd would save the bf16 weight of F.linear for the backward: a 16-bit copy of W per
    # layer, held from forward to backward. NF4Linear dequantizes again in the backward instead.
    torch.manual_seed(0)
    layer = QLoRALinear.from_linear(nn.Linear(128, 64), r=4, alpha=8)
    x = torch.randn(3, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = layer(x)
    assert (64, 128) not in saved and (128, 64) not in saved, saved
    out.float().sum().backward()  # and the gradient still reaches x and the adapter
    assert x.grad is not None and layer.lora_B.grad.abs().sum() > 0


# ------------------------------------------------------------------ QDoRA: DoRA over the NF4 base
def make_qdora(base=None, **kw):
    return QDoRALinear.from_linear(make_base() if base is None else base, r=R, alpha=ALPHA, block_size=BLOCK, **kw)


def test_qdora_is_dora_on_the_dequantized_weight():
    """QDoRA computes what a DoRALinear over dequant(W0) (in the compute dtype) computes."""
    base = make_base()
    layer = make_qdora(base)
    # the row norms of the W0 the base computes with: dequantized, in the compute dtype
    w0 = w_hat(base).to(torch.bfloat16).float()
    torch.testing.assert_close(layer.magnitude, w0.norm(dim=1), rtol=1e-6, atol=0)
    set_b_(layer)
    with torch.no_grad():
        layer.magnitude.mul_(1.1)
    dense = nn.Linear(IN, OUT).to(torch.bfloat16)
    with torch.no_grad():
        dense.weight.copy_(w_hat(base).to(torch.bfloat16))
        dense.bias.copy_(base.bias)
    twin = DoRALinear(dense, r=R, alpha=ALPHA)
    twin.load_state_dict(layer.state_dict(), strict=False)  # the same A, B and magnitude
    x = inputs().to(torch.bfloat16)
    y, y_twin = layer(x), twin(x)
    assert y.dtype == torch.bfloat16 and not torch.allclose(y.float(), layer.base(x).float(), atol=1e-2)
    # the same operations on the same bf16 numbers, but the bias is rounded to bf16 in the twin
    bound = 2 * U[torch.bfloat16] * magnitude(x, w_hat(base), base.bias) + 1e-6
    assert ((y.float() - y_twin.float()).abs() <= bound).all()
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B", "magnitude"}


def test_qdora_at_init_is_the_nf4_base_up_to_one_rounding():
    """c = 1 exactly at init; W0 x is rounded to bf16 before the bias is added (the base adds it
    inside its matmul), so the two differ by at most one rounding of the output's size."""
    base = make_base()
    layer = make_qdora(base)
    assert torch.equal(layer.magnitude / layer.weight_norm(), torch.ones(OUT))
    x = inputs().to(torch.bfloat16)
    with torch.no_grad():
        y, y_base = layer(x).float(), layer.base(x).float()
    bound = 2 * U[torch.bfloat16] * magnitude(x, w_hat(base), base.bias) + 1e-6
    assert ((y - y_base).abs() <= bound).all()
    no_bias = make_qdora(make_base(bias=False))
    with torch.no_grad():
        assert torch.equal(no_bias(x), no_bias.base(x))  # without a bias nothing is rounded twice


def test_qdora_norm_cache_follows_codes_written_in_place():
    """||W0||^2 is cached per NF4 base; other codes written into it in place are a new W0."""
    layer = make_qdora(make_base(seed=0))
    set_b_(layer)
    before = layer.weight_norm()  # fills the cache
    with torch.no_grad():
        layer.base.codes.copy_(make_qdora(make_base(seed=5)).base.codes)
    w0 = layer.base.dequantized_weight().double()  # the W0 the base now computes with
    direct = (w0 + S * layer.lora_B.detach().double() @ layer.lora_A.detach().double()).norm(dim=1)
    # as in test_dora.py: only A's rounding to bf16 (for W0 A^T) separates the two, 2^-8 of the cross term
    torch.testing.assert_close(layer.weight_norm().double(), direct, rtol=2.0 ** -8, atol=0)
    assert not torch.allclose(before.double(), direct, rtol=2.0 ** -8, atol=0)  # W0 did change


def test_qdora_to_merged_linear_and_merge_refused():
    base = make_base()
    layer = make_qdora(base)
    set_b_(layer)
    merged = layer.to_merged_linear(torch.float32)
    v = w_hat(base).to(torch.bfloat16).float() + S * layer.lora_B.detach() @ layer.lora_A.detach()
    expected = (layer.magnitude.detach() / v.norm(dim=1))[:, None] * v
    torch.testing.assert_close(merged.weight, expected, rtol=0, atol=1e-6)
    x = inputs().to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(merged(x.float()), layer(x).float(), rtol=2 ** -7, atol=1e-2)
    with pytest.raises(RuntimeError, match=r"a QDoRA layer cannot merge in place.*to_merged_linear"):
        layer.merge()


def test_prepare_qlora_with_dora_makes_qdora_layers():
    model = prepare_qlora(make_model(), ["q_proj", "fc1"], r=2, dora=True)
    layers = adapter_modules(model)
    assert layers and all(isinstance(m, QDoRALinear) for m in layers.values())
    assert count_trainable_params(model) == sum(2 * (m.in_features + m.out_features) + m.out_features
                                                for m in layers.values())
    model(token_ids()).float().sum().backward()
    assert all(m.magnitude.grad is not None for m in layers.values())


def test_qdora_norm_cache_follows_scales_written_in_place():
    """The scales are part of W0 too: doubling them in place doubles W0, and the cached norm follows."""
    for double_quant in (False, True):
        layer = make_qdora(make_base(seed=0), double_quant=double_quant)
        set_b_(layer)
        before = layer.weight_norm()  # fills the cache
        absmax = layer.base.weight_q.absmax
        with torch.no_grad():
            (absmax.absmax if double_quant else absmax).mul_(2)
            if double_quant:
                absmax.offset.mul_(2)
        w0 = layer.base.dequantized_weight().double()
        direct = (w0 + S * layer.lora_B.detach().double() @ layer.lora_A.detach().double()).norm(dim=1)
        torch.testing.assert_close(layer.weight_norm().double(), direct, rtol=2.0 ** -8, atol=0)
        assert not torch.allclose(before.double(), direct, rtol=2.0 ** -8, atol=0)
