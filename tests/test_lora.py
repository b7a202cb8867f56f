"""lora_edu.methods.lora: the scaling factor, the hyper-parameter checks and LoRALinear.

Every expected value is rebuilt here from the LoRA equation h = W0 x + s * B (A x),
s = alpha / r (rsLoRA: alpha / sqrt(r)), never read back from the code under test.
"""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_edu import LoRALinear, check_lora_hparams, lora_scaling

IN, OUT, R, ALPHA = 20, 12, 4, 8


def make_layer(bias=True, seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    base = nn.Linear(IN, OUT, bias=bias).to(dtype)
    return LoRALinear(base, r=kw.pop("r", R), alpha=kw.pop("alpha", ALPHA), **kw)


def set_b_(layer, seed=3, std=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)


def inputs(dtype=torch.float32, seed=1, batch=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, IN, generator=g).to(dtype)


# ------------------------------------------------------------------ scaling
@pytest.mark.parametrize("alpha, r", [(16, 8), (8, 4), (1, 1), (32, 64), (0.5, 3)])
def test_scaling_is_alpha_over_r_or_over_sqrt_r(alpha, r):
    assert lora_scaling(alpha, r) == pytest.approx(alpha / r, rel=1e-12)
    assert lora_scaling(alpha, r, rslora=True) == pytest.approx(alpha / math.sqrt(r), rel=1e-12)


def test_scaling_at_r8_alpha16_is_2_and_5_6569():
    assert round(lora_scaling(16, 8), 4) == 2.0
    assert round(lora_scaling(16, 8, rslora=True), 4) == 5.6569


def test_rslora_scaling_grows_as_sqrt_r_relative_to_plain():
    # (alpha / sqrt(r)) / (alpha / r) = sqrt(r)
    for r in (1, 4, 16, 64):
        assert lora_scaling(16, r, rslora=True) / lora_scaling(16, r) == pytest.approx(math.sqrt(r))


def test_layer_uses_the_scaling_it_is_given():
    assert make_layer(r=8, alpha=16).scaling == pytest.approx(16 / 8)
    assert make_layer(r=8, alpha=16, rslora=True).scaling == pytest.approx(16 / math.sqrt(8))


# ------------------------------------------------------------------ bad hyper-parameters
BAD_HPARAMS = [
    (dict(r=0), ValueError, r"r must be a positive int.*r=0"),
    (dict(r=-3), ValueError, r"r must be a positive int.*r=-3"),
    (dict(r=2.5), TypeError, r"r must be a positive int.*2\.5.*float"),
    (dict(r="8"), TypeError, r"r must be a positive int.*'8'.*str"),
    (dict(r=True), TypeError, r"r must be a positive int.*True.*bool"),
    (dict(alpha=0), ValueError, r"alpha must be a positive, finite number.*alpha=0"),
    (dict(alpha=-16), ValueError, r"alpha must be a positive, finite number.*alpha=-16"),
    (dict(alpha=float("nan")), ValueError, r"alpha must be a positive, finite number"),
    (dict(alpha=float("inf")), ValueError, r"alpha must be a positive, finite number.*inf"),
    (dict(dropout=-0.1), ValueError, r"dropout must be a probability in \[0, 1\).*-0\.1"),
    (dict(dropout=1.0), ValueError, r"dropout must be a probability in \[0, 1\).*1\.0"),
]


@pytest.mark.parametrize("kw, exc, msg", BAD_HPARAMS)
def test_check_lora_hparams_rejects(kw, exc, msg):
    args = dict(r=8, alpha=16, dropout=0.0) | kw
    with pytest.raises(exc, match=msg):
        check_lora_hparams(**args)


@pytest.mark.parametrize("kw, exc, msg", BAD_HPARAMS)
def test_layer_rejects_bad_hparams_and_leaves_base_alone(kw, exc, msg):
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT)
    w0 = base.weight.clone()
    args = dict(r=8, alpha=16, dropout=0.0) | kw
    with pytest.raises(exc, match=msg):
        LoRALinear(base, **args)
    assert base.weight.requires_grad and base.bias.requires_grad  # not frozen by a failed wrap
    assert torch.equal(base.weight, w0)


@pytest.mark.parametrize("kw, exc, msg", [b for b in BAD_HPARAMS if "dropout" not in b[0]])
def test_scaling_rejects_bad_r_and_alpha(kw, exc, msg):
    args = dict(r=8, alpha=16) | kw
    with pytest.raises(exc, match=msg):
        lora_scaling(args["alpha"], args["r"])


def test_good_edge_values_are_accepted():
    check_lora_hparams(1, 1e-6, 0.0)
    check_lora_hparams(8, 16, 0.999)


@pytest.mark.parametrize("base", [nn.Conv1d(4, 4, 3), nn.Embedding(10, 4)], ids=["Conv1d", "Embedding"])
def test_base_must_be_linear(base):
    name = type(base).__name__
    with pytest.raises(TypeError, match=rf"wraps an nn\.Linear, got {name}"):
        LoRALinear(base)
    assert all(p.requires_grad for p in base.parameters())


# ------------------------------------------------------------------ shapes and init
def test_shapes_follow_nn_linear_orientation():
    layer = make_layer()
    assert layer.lora_A.shape == (R, IN)   # A [r, in]
    assert layer.lora_B.shape == (OUT, R)  # B [out, r]
    assert (layer.in_features, layer.out_features) == (IN, OUT)
    assert layer.delta_weight().shape == layer.base.weight.shape == (OUT, IN)


def test_init_b_is_zero_and_a_is_kaiming_uniform():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 32), r=8)
    assert torch.count_nonzero(layer.lora_B) == 0
    # kaiming_uniform(a=sqrt(5)): bound = sqrt(2 / (1 + 5)) * sqrt(3 / fan_in) = 1 / sqrt(fan_in)
    bound = 1 / math.sqrt(64)
    a = layer.lora_A.detach()
    assert a.abs().max() <= bound
    assert a.abs().max() > 0.9 * bound  # 512 draws: uses the whole range, not a narrower one
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)  # U(-b, b) has std b/sqrt(3)


def test_reset_lora_parameters_zeroes_b_again():
    layer = make_layer()
    set_b_(layer)
    layer.reset_lora_parameters_()
    assert torch.count_nonzero(layer.lora_B) == 0


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rslora", [False, True])
def test_output_equals_base_exactly_at_init(bias, rslora):
    layer = make_layer(bias=bias, rslora=rslora)
    x = inputs()
    assert torch.equal(layer(x), layer.base(x))


# ------------------------------------------------------------------ the equation
@pytest.mark.parametrize("rslora", [False, True])
def test_delta_weight_is_scaling_times_b_at_a(rslora):
    layer = make_layer(rslora=rslora)
    set_b_(layer)
    s = ALPHA / math.sqrt(R) if rslora else ALPHA / R
    expected = s * (layer.lora_B.detach() @ layer.lora_A.detach())
    torch.testing.assert_close(layer.delta_weight().detach(), expected, rtol=0, atol=1e-7)
    assert torch.linalg.matrix_rank(expected) <= R


@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_w0_x_plus_scaled_bypass(bias):
    layer = make_layer(bias=bias)
    set_b_(layer)
    x = inputs()
    w0, b = layer.base.weight.detach(), layer.base.bias
    a, bb = layer.lora_A.detach(), layer.lora_B.detach()
    expected = x @ w0.T + (ALPHA / R) * (x @ a.T) @ bb.T  # [batch, out]
    if bias:
        expected = expected + b.detach()
    torch.testing.assert_close(layer(x).detach(), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(layer(x), layer.base(x), atol=1e-3)  # B != 0 really changes it


# ------------------------------------------------------------------ merge / unmerge
@pytest.mark.parametrize("bias", [True, False])
def test_merge_keeps_output_and_weight_is_w0_plus_dw(bias):
    layer = make_layer(bias=bias)
    set_b_(layer)
    x = inputs()
    w0 = layer.base.weight.detach().clone()
    dw = (ALPHA / R) * layer.lora_B.detach() @ layer.lora_A.detach()
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert layer.merged
        merged = layer(x)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.base.weight.detach(), w0 + dw, rtol=0, atol=1e-6)
    assert torch.equal(merged, layer.base(x))  # merged: a single base matmul, no bypass


def test_unmerge_restores_w0():
    layer = make_layer()
    set_b_(layer)
    w0 = layer.base.weight.detach().clone()
    layer.merge()
    assert not torch.allclose(layer.base.weight, w0, atol=1e-3)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base.weight.detach(), w0, rtol=0, atol=1e-6)


def test_merge_twice_and_unmerge_twice_are_no_ops():
    layer = make_layer()
    set_b_(layer)
    w0 = layer.base.weight.detach().clone()
    layer.merge()
    once = layer.base.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.base.weight, once)
    layer.unmerge()
    restored = layer.base.weight.detach().clone()
    layer.unmerge()
    assert torch.equal(layer.base.weight, restored)
    torch.testing.assert_close(restored, w0, rtol=0, atol=1e-6)


def test_merge_does_not_make_the_base_trainable():
    layer = make_layer()
    set_b_(layer)
    layer.merge()
    layer.unmerge()
    assert not layer.base.weight.requires_grad and not layer.base.bias.requires_grad


# ------------------------------------------------------------------ dropout
def test_dropout_with_b_zero_leaves_output_equal_to_base_in_train_mode():
    layer = make_layer(dropout=0.5).train()
    x = inputs()
    for _ in range(3):
        assert torch.equal(layer(x), layer.base(x))  # the base path is never dropped


def test_dropout_is_off_in_eval_mode():
    layer = make_layer(dropout=0.5)
    set_b_(layer)
    layer.eval()
    x = inputs()
    assert torch.equal(layer(x), layer(x))
    expected = layer.base(x) + (ALPHA / R) * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)


def test_dropout_in_train_mode_is_random_and_acts_on_the_bypass_only():
    layer = make_layer(dropout=0.5).train()
    set_b_(layer)
    x = inputs()
    assert not torch.equal(layer(x), layer(x))
    torch.manual_seed(123)
    out = layer(x)
    torch.manual_seed(123)  # replay the same mask on the bypass input alone
    x_dropped = F.dropout(x, p=0.5, training=True)
    expected = layer.base(x) + (ALPHA / R) * (x_dropped @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_no_dropout_module_when_dropout_is_zero():
    layer = make_layer(dropout=0.0).train()
    set_b_(layer)
    x = inputs()
    assert torch.equal(layer(x), layer(x))


# ------------------------------------------------------------------ training
def test_base_frozen_only_a_and_b_trainable():
    layer = make_layer()
    assert not layer.base.weight.requires_grad
    assert not layer.base.bias.requires_grad
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == R * (IN + OUT)


def test_gradients_at_step_zero_b_nonzero_a_exactly_zero():
    layer = make_layer()
    x = inputs()
    layer(x).sum().backward()
    # dL/dA = s * B^T (dL/dh) x = 0 because B = 0; dL/dB = s * (dL/dh)^T (A x) != 0
    assert torch.count_nonzero(layer.lora_A.grad) == 0
    assert torch.count_nonzero(layer.lora_B.grad) > 0
    # with L = sum(h): dL/dh = 1, so dL/dB[o, j] = s * sum_batch (x A^T)[:, j] for every row o
    expected = (ALPHA / R) * (x @ layer.lora_A.detach().T).sum(0).expand(OUT, R)
    torch.testing.assert_close(layer.lora_B.grad, expected, rtol=1e-5, atol=1e-6)
    assert layer.base.weight.grad is None and layer.base.bias.grad is None


def test_one_sgd_step_changes_output():
    layer = make_layer()
    x = inputs()
    before = layer(x).detach()
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    layer(x).pow(2).mean().backward()
    opt.step()
    assert torch.count_nonzero(layer.lora_B) > 0
    assert not torch.equal(layer(x).detach(), before)


# ------------------------------------------------------------------ half-precision bases
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)], ids=["fp16", "bf16"])
def test_half_precision_base(dtype, tol):
    layer = make_layer(dtype=dtype)
    x = inputs(dtype)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32  # adapter stays fp32
    assert layer.base.weight.dtype == dtype
    out = layer(x)
    assert out.dtype == dtype
    assert torch.equal(out, layer.base(x))  # exact at init, also in half precision

    set_b_(layer, std=0.05)
    w0 = layer.base.weight.detach().clone()
    dw = (ALPHA / R) * layer.lora_B.detach() @ layer.lora_A.detach()  # fp32
    with torch.no_grad():
        unmerged = layer(x)
        assert unmerged.dtype == dtype
        reference = x.float() @ (w0.float() + dw).T + layer.base.bias.float()
        torch.testing.assert_close(unmerged.float(), reference, rtol=tol, atol=tol)

        layer.merge()
        assert layer.base.weight.dtype == dtype
        assert torch.equal(layer.base.weight, (w0.float() + dw).to(dtype))  # rounded once
        torch.testing.assert_close(layer(x).float(), unmerged.float(), rtol=tol, atol=tol)

        layer.unmerge()
        torch.testing.assert_close(layer.base.weight.float(), w0.float(), rtol=tol, atol=tol)
        assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32


def test_bf16_bypass_on_a_bf16_base_is_the_lora_equation_within_bf16_rounding():
    """bypass_dtype=bf16 on a bf16 base takes the fast path: s folded into B, the add into an addmm.

    Five roundings to bf16 (A, s B, A x, the base output, the sum), each at most U of the
    size of what it rounds, which is at most |x| |W0|^T + |b| + s |x| |A|^T |B|^T: 8 U allowed."""
    u_bf16 = 2.0 ** -8
    layer = make_layer(dtype=torch.bfloat16, bypass_dtype=torch.bfloat16)
    set_b_(layer)
    x = inputs(torch.bfloat16)
    s = ALPHA / R
    with torch.no_grad():
        y = layer(x)
        xd, w0, bias, a, b = (t.double() for t in (x, layer.base.weight, layer.base.bias, layer.lora_A,
                                                    layer.lora_B))
        bypass = (xd @ a.T) @ b.T  # B A x, [batch, out]
        expected = xd @ w0.T + bias + s * bypass
        size = xd.abs() @ w0.abs().T + bias.abs() + s * (xd.abs() @ a.abs().T) @ b.abs().T
    assert y.dtype == torch.bfloat16
    bound = 8 * u_bf16 * size
    assert ((y.double() - expected).abs() <= bound).all()
    # the bound can tell: the bypass without s, or with s twice, is outside it
    for wrong in (1.0, 2 * s):
        assert not ((xd @ w0.T + bias + wrong * bypass - expected).abs() <= bound).all()
    assert not torch.equal(y, layer.base(x))  # the bypass is there


def test_meta_device_base_builds_without_memory():
    layer = LoRALinear(nn.Linear(4096, 4096, device="meta"), r=8)
    assert layer.lora_A.device.type == "meta" and layer.lora_B.device.type == "meta"
    assert layer.lora_A.shape == (8, 4096) and layer.lora_B.shape == (4096, 8)
    assert not layer.base.weight.requires_grad


def test_extra_repr_names_r_and_scaling():
    for rslora, s in [(False, ALPHA / R), (True, ALPHA / math.sqrt(R))]:
        text = repr(make_layer(rslora=rslora))
        assert f"r={R}" in text
        shown = re.search(r"scaling=([0-9.]+)", text)
        assert shown is not None
        assert float(shown.group(1)) == pytest.approx(s, rel=1e-3)
