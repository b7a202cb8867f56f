"""lora_edu.methods.dora: DoRALinear against the DoRA equation, rebuilt here independently.

    V  = W0 + s * B @ A                       [out, in]
    W' = magnitude[:, None] * V / ||V||_row    (norm over dim 1, one per output row)
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lora_edu import DoRALinear, LoRALinear

IN, OUT, R, ALPHA = 20, 12, 4, 8  # OUT != IN, so a column-wise norm could not even broadcast


def make_layer(bias=True, seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    return DoRALinear(nn.Linear(IN, OUT, bias=bias).to(dtype), r=R, alpha=ALPHA, **kw)


def train_(layer, seed=3):
    """Non-zero B and a magnitude that is no longer the row norm, as after some training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
        layer.magnitude.mul_(1 + 0.2 * torch.randn(layer.magnitude.shape, generator=g))


def inputs(seed=1, batch=6, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, IN, generator=g).to(dtype)


def reference_forward(x, w0, bias, a, b, m, s, detach_norm=True):
    """DoRA written out from the paper, in plain tensor ops."""
    v = w0 + s * (b @ a)                      # [out, in]
    norm = v.pow(2).sum(dim=1).sqrt()         # [out], one per output row
    if detach_norm:
        norm = norm.detach()
    return F.linear(x, (m / norm).unsqueeze(1) * v, bias)


def test_is_a_lora_layer_with_a_magnitude():
    layer = make_layer()
    assert isinstance(layer, LoRALinear)
    assert layer.lora_A.shape == (R, IN) and layer.lora_B.shape == (OUT, R)
    assert layer.magnitude.shape == (OUT,)


def test_magnitude_starts_as_the_row_norms_of_w0():
    layer = make_layer()
    w0 = layer.base.weight.detach()
    row_norms = torch.sqrt((w0 * w0).sum(dim=1))  # ||W0[i, :]|| for each output row i
    torch.testing.assert_close(layer.magnitude.detach(), row_norms, rtol=0, atol=1e-6)
    assert layer.magnitude.dtype == torch.float32


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rslora", [False, True])
def test_identity_at_init(bias, rslora):
    layer = make_layer(bias=bias, rslora=rslora)
    x = inputs()
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rslora", [False, True])
def test_forward_matches_the_dora_equation(bias, rslora):
    layer = make_layer(bias=bias, rslora=rslora)
    train_(layer)
    x = inputs()
    s = ALPHA / math.sqrt(R) if rslora else ALPHA / R
    with torch.no_grad():
        expected = reference_forward(x, layer.base.weight, layer.base.bias, layer.lora_A,
                                     layer.lora_B, layer.magnitude, s)
        out = layer(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(out, layer.base(x), atol=1e-3)  # the adapter does something


def test_effective_weight_has_the_magnitude_as_row_norms():
    layer = make_layer()
    train_(layer)
    w = layer.effective_weight().detach()
    torch.testing.assert_close(w.norm(dim=1), layer.magnitude.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_merge_unmerge_round_trip(bias):
    layer = make_layer(bias=bias)
    train_(layer)
    x = inputs()
    w0 = layer.base.weight.detach().clone()
    with torch.no_grad():
        v = w0 + (ALPHA / R) * layer.lora_B @ layer.lora_A
        w_prime = (layer.magnitude / v.norm(dim=1)).unsqueeze(1) * v
        unmerged = layer(x)
        layer.merge()
        assert layer.merged
        torch.testing.assert_close(layer.base.weight.detach(), w_prime, rtol=0, atol=1e-5)
        torch.testing.assert_close(layer(x), unmerged, rtol=0, atol=1e-5)
        layer.merge()  # a second merge is a no-op
        torch.testing.assert_close(layer.base.weight.detach(), w_prime, rtol=0, atol=1e-5)
        layer.unmerge()
        assert not layer.merged
        torch.testing.assert_close(layer.base.weight.detach(), w0, rtol=0, atol=1e-5)
        torch.testing.assert_close(layer(x), unmerged, rtol=0, atol=1e-5)
        layer.unmerge()  # and so is a second unmerge
        torch.testing.assert_close(layer.base.weight.detach(), w0, rtol=0, atol=1e-5)


def test_magnitude_trainable_and_base_frozen():
    layer = make_layer()
    assert layer.magnitude.requires_grad
    assert not layer.base.weight.requires_grad and not layer.base.bias.requires_grad
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "magnitude"}
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == R * (IN + OUT) + OUT


def test_gradients_treat_the_row_norm_as_a_constant():
    layer = make_layer()
    train_(layer)
    x = inputs()
    s = ALPHA / R

    layer(x).pow(2).sum().backward()
    ours = [layer.lora_A.grad, layer.lora_B.grad, layer.magnitude.grad]

    def reference_grads(detach_norm):
        a, b, m = (t.detach().clone().requires_grad_(True)
                   for t in (layer.lora_A, layer.lora_B, layer.magnitude))
        out = reference_forward(x, layer.base.weight.detach(), layer.base.bias.detach(), a, b, m, s,
                                detach_norm=detach_norm)
        return torch.autograd.grad(out.pow(2).sum(), [a, b, m])

    detached = reference_grads(detach_norm=True)
    for got, want in zip(ours, detached):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the test can tell: through the norm, the gradient of B would be different
    through_norm = reference_grads(detach_norm=False)
    assert not torch.allclose(detached[1], through_norm[1], rtol=1e-3, atol=1e-4)
    assert layer.base.weight.grad is None


def test_gradient_of_a_is_zero_at_step_zero():
    layer = make_layer()
    layer(inputs()).sum().backward()
    assert torch.count_nonzero(layer.lora_A.grad) == 0
    assert torch.count_nonzero(layer.lora_B.grad) > 0
    assert torch.count_nonzero(layer.magnitude.grad) > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_base(dtype):
    layer = make_layer(dtype=dtype)
    x = inputs(dtype=dtype)
    out = layer(x)
    assert out.dtype == dtype
    assert layer.magnitude.dtype == layer.lora_A.dtype == torch.float32
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    torch.testing.assert_close(out.float(), layer.base(x).float(), rtol=tol, atol=tol)


def test_meta_device_base_builds():
    layer = DoRALinear(nn.Linear(64, 32, device="meta"), r=4)
    assert layer.magnitude.device.type == "meta" and layer.magnitude.shape == (32,)
    assert layer.lora_A.device.type == "meta"


def test_rejects_non_linear_base_and_bad_rank():
    with pytest.raises(TypeError, match="wraps an nn.Linear, got Embedding"):
        DoRALinear(nn.Embedding(5, 4))
    with pytest.raises(ValueError, match="r must be a positive int"):
        DoRALinear(nn.Linear(4, 4), r=0)


# ------------------------------------------------------------------ the fast forward
def test_weight_norm_is_the_row_norm_of_v_by_the_identity():
    """||W0 + s B A||_row from ||W0||^2, W0 A^T and A A^T equals the norm of the built V."""
    layer = make_layer()
    train_(layer)
    with torch.no_grad():
        v = layer.base.weight + layer.scaling * layer.lora_B @ layer.lora_A
        direct = v.double().norm(dim=1)
    torch.testing.assert_close(layer.weight_norm().double(), direct, rtol=1e-6, atol=0)
    assert not layer.weight_norm().requires_grad  # detached: no graph is kept for it


def test_weight_norm_on_a_bf16_base_is_within_the_rounding_of_a():
    layer = make_layer(dtype=torch.bfloat16)
    train_(layer)
    with torch.no_grad():
        v = layer.base.weight.double() + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
        direct = v.norm(dim=1)
    # only A is rounded (to bf16, for W0 A^T): at most 2^-8 of the cross term 2 s W0 . BA
    torch.testing.assert_close(layer.weight_norm().double(), direct, rtol=2.0 ** -8, atol=0)


class _Outputs(TorchDispatchMode):
    """Records (op, dtype, number of elements) of every tensor every aten op returns."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.seen.append((str(func), t.dtype, t.numel()))
        return out


@pytest.mark.parametrize("bypass_dtype", [None, torch.bfloat16], ids=["fp32_bypass", "bf16_bypass"])
def test_no_float32_tensor_of_the_weights_size_in_forward_and_backward(bypass_dtype):
    """The old forward built W' [out, in] in float32 and ran a float32 matmul with it; none is built now."""
    torch.manual_seed(0)
    out_f, in_f, tokens = 24, 40, 7  # out*in = 960 is no other tensor's size here
    layer = DoRALinear(nn.Linear(in_f, out_f).to(torch.bfloat16), r=R, alpha=ALPHA, bypass_dtype=bypass_dtype)
    train_(layer)
    x = torch.randn(tokens, in_f).to(torch.bfloat16).requires_grad_(True)
    with _Outputs() as ops:
        layer(x).float().sum().backward()
    big = [op for op, dtype, n in ops.seen if n == out_f * in_f]
    assert not [op for op, dtype, n in ops.seen if n == out_f * in_f and dtype == torch.float32], big
    assert any("mm" in op for op, _, _ in ops.seen)  # the recorder saw the matmuls
    # the old way, written out, does build one: the recorder can tell
    with _Outputs() as old:
        with torch.no_grad():
            layer.effective_weight()
    assert any(n == out_f * in_f and dtype == torch.float32 for _, dtype, n in old.seen)


def test_a_bf16_bypass_keeps_no_float32_copy_of_the_input():
    from lora_edu.memory.measure import saved_activations

    torch.manual_seed(0)
    kept = {}
    for bypass_dtype in (None, torch.bfloat16):
        layer = LoRALinear(nn.Linear(IN, OUT).to(torch.bfloat16), r=R, alpha=ALPHA, bypass_dtype=bypass_dtype)
        x = torch.randn(5, IN).to(torch.bfloat16).requires_grad_(True)
        out, saved = saved_activations(layer, layer, x)
        assert out.dtype == torch.bfloat16
        kept[bypass_dtype] = {(s.shape, s.dtype) for s in saved}
    assert ((5, IN), torch.float32) in kept[None]  # x cast to float32 for the bypass, kept for dL/dA
    assert not any(dtype == torch.float32 for _, dtype in kept[torch.bfloat16])


def test_bf16_bypass_gives_float32_gradients_close_to_the_float32_bypass():
    grads = {}
    for bypass_dtype in (None, torch.bfloat16):
        layer = make_layer(dtype=torch.bfloat16, bypass_dtype=bypass_dtype)
        train_(layer)
        layer(inputs(dtype=torch.bfloat16)).float().pow(2).sum().backward()
        grads[bypass_dtype] = [p.grad for p in (layer.lora_A, layer.lora_B, layer.magnitude)]
    for fast, exact in zip(grads[torch.bfloat16], grads[None]):
        assert fast.dtype == torch.float32
        assert ((fast - exact).norm() / exact.norm()).item() < 2 ** -6  # a few bf16 roundings


def test_a_bf16_bypass_on_a_float32_base_rounds_the_bypass_only():
    """The rescale runs in the wider dtype: on a float32 base, W0 x and c * V x stay float32.

    A small B keeps the bypass, the only bf16 part, far below W0 x. Its roundings (x, A, B,
    A x, B A x: 5 U of s |x| |A|^T |B|^T, 6 U allowed) and the float32 ones (each sum of at
    most IN terms, and a few more operations: 64 U32 of the output's size) bound the error;
    rounding W0 x (or the output) to bf16 would cost U of the output's size, far more."""
    u_bf16, u32 = 2.0 ** -8, 2.0 ** -24
    layer = make_layer(bypass_dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 1e-3)
        layer.magnitude.mul_(1 + 0.2 * torch.randn(layer.magnitude.shape, generator=g))
    x = inputs()
    with torch.no_grad():
        y = layer(x)
        w0, bias, a, b, m = (t.double() for t in (layer.base.weight, layer.base.bias, layer.lora_A,
                                                  layer.lora_B, layer.magnitude))
        s = ALPHA / R
        expected = reference_forward(x.double(), w0, bias, a, b, m, s)
        c = (m / (w0 + s * b @ a).norm(dim=1)).abs()
        xa = x.double().abs()
        bypass = s * c * (xa @ a.abs().T @ b.abs().T)  # [batch, out]
        size = c * (xa @ w0.abs().T) + bypass + bias.abs()
    assert y.dtype == torch.float32
    bound = 6 * u_bf16 * bypass + 64 * u32 * size
    assert ((y.double() - expected).abs() <= bound).all()
    # the bound can tell: the output rounded to bf16 once is outside it
    assert not ((expected.to(torch.bfloat16).double() - expected).abs() <= bound).all()


def test_the_cached_norm_follows_the_base_weight():
    """||W0||^2 is cached; a new W0 (load_state_dict, an in-place edit) must not see the old one."""
    layer = make_layer()
    train_(layer)
    x = inputs()
    with torch.no_grad():
        layer(x)  # fills the cache
        new = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(9))
        layer.base.load_state_dict({"weight": new, "bias": layer.base.bias.clone()})
        expected = reference_forward(x, new, layer.base.bias, layer.lora_A, layer.lora_B, layer.magnitude,
                                     layer.scaling)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
        layer.base.weight.mul_(2)
        expected = reference_forward(x, 2 * new, layer.base.bias, layer.lora_A, layer.lora_B, layer.magnitude,
                                     layer.scaling)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)


def test_merge_then_forward_then_unmerge_sees_the_right_w0():
    layer = make_layer()
    train_(layer)
    x = inputs()
    with torch.no_grad():
        before = layer(x)
        layer.merge()
        layer.unmerge()  # W0 written twice: the cache must be refreshed from the restored W0
        torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-5)


def test_identity_at_init_is_exact():
    layer = make_layer()
    torch.testing.assert_close(layer.magnitude / layer.weight_norm(), torch.ones(OUT), rtol=0, atol=0)


# ------------------------------------------------------------------ a zero row
def test_a_zero_row_is_refused_with_the_rows_named():
    base = nn.Linear(IN, OUT)
    with torch.no_grad():
        base.weight[3] = 0
        base.weight[7] = 0
    with pytest.raises(ValueError, match=r"2 row\(s\) of its weight are all zeros \(rows \[3, 7\]\).*dora=False"):
        DoRALinear(base, r=R)
    assert base.weight.requires_grad and base.bias.requires_grad  # the refused layer did not freeze it
    LoRALinear(base, r=R)  # plain LoRA is fine there: W0 + dW needs no direction


def test_a_zero_row_leaves_the_model_unchanged_in_inject_and_prepare_qlora():
    from _models import assert_unchanged, make_model, snapshot
    from lora_edu import inject_lora, prepare_qlora

    for wrap in (lambda m: inject_lora(m, ["q_proj", "fc1"], r=2, dora=True),
                 lambda m: prepare_qlora(m, ["q_proj", "fc1"], r=2, dora=True)):
        model = make_model()
        with torch.no_grad():
            model.layers[1].mlp.fc1.weight[0] = 0  # the last layer wrapped: the others come first
        before = snapshot(model)
        with pytest.raises(ValueError, match=r"DoRA cannot adapt 'layers.1.mlp.fc1'"):
            wrap(model)
        assert_unchanged(model, before)


def test_bad_bypass_dtype():
    with pytest.raises(ValueError, match=r"bypass_dtype must be None .*got torch.int32"):
        DoRALinear(nn.Linear(IN, OUT), bypass_dtype=torch.int32)


# ------------------------------------------------------------------ the cached ||W0||^2
def test_a_new_weight_is_never_mistaken_for_the_cached_one():
    """A weight replaced by a new tensor is a new W0, even where the allocator puts it at the freed one's
    address with version 0 again (a data_ptr and version key alone matched it in 28-50 of 50 trials)."""
    layer = make_layer()
    train_(layer)
    x = inputs()
    wrong = 0
    for trial in range(30):
        with torch.no_grad():
            layer(x)  # fills the cache
            for _ in range(1 + trial % 3):
                layer.base.weight = nn.Parameter(torch.randn(OUT, IN), requires_grad=False)
            expected = reference_forward(x, layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B,
                                         layer.magnitude, layer.scaling)
            wrong += not torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert wrong == 0


def test_copies_and_pickles_of_a_layer_rebuild_the_cache():
    import copy
    import io

    layer = make_layer()
    train_(layer)
    x = inputs()
    with torch.no_grad():
        y = layer(x)  # the cache now holds weak references, which do not pickle
        buffer = io.BytesIO()
        torch.save(layer, buffer)
        buffer.seek(0)
        for other in (copy.deepcopy(layer), torch.load(buffer, weights_only=False)):
            assert other._w0_cache is None
            torch.testing.assert_close(other(x), y, rtol=0, atol=0)
