"""count_matmul_flops against torch's own FlopCounterMode, and the merge claim it supports."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lora_edu import LoRALinear, count_matmul_flops


def torch_flops(fn, *args):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


@pytest.mark.parametrize("a_shape, b_shape", [
    ((5, 7), (7, 3)), ((7,), (7, 3)), ((2, 5, 7), (7, 3)),
    ((4, 1, 5, 7), (3, 7, 2)), ((2, 5, 7), (2, 7, 3)),
])
def test_matmul_counts_agree_with_torch(a_shape, b_shape):
    a, b = torch.randn(a_shape), torch.randn(b_shape)
    assert count_matmul_flops(torch.matmul, a, b) == torch_flops(torch.matmul, a, b)
    assert count_matmul_flops(lambda: a @ b) == torch_flops(lambda: a @ b)


def test_matrix_vector_product():
    # torch's FlopCounterMode has no formula for aten.mv (it reports 0), so check by hand
    assert count_matmul_flops(torch.matmul, torch.randn(5, 7), torch.randn(7)) == 2 * 5 * 7


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_shape", [(16, 64), (2, 3, 64)])
def test_lora_layer_counts_agree_with_torch(bias, x_shape):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 32, bias=bias), r=8)
    x = torch.randn(x_shape)
    assert count_matmul_flops(layer, x) == torch_flops(layer, x)
    layer.merge()
    assert count_matmul_flops(layer, x) == torch_flops(layer, x)


def test_merging_removes_exactly_the_bypass_work():
    torch.manual_seed(0)
    batch, d_in, d_out, r = 16, 64, 32, 8
    layer = LoRALinear(nn.Linear(d_in, d_out), r=r)
    plain = nn.Linear(d_in, d_out)
    x = torch.randn(batch, d_in)
    unmerged = count_matmul_flops(layer, x)
    layer.merge()
    assert count_matmul_flops(layer, x) == count_matmul_flops(plain, x) == 2 * batch * d_in * d_out
    assert unmerged - count_matmul_flops(layer, x) == 2 * batch * r * (d_in + d_out)


def test_unsupported_product_is_refused_not_miscounted():
    with pytest.raises(NotImplementedError, match="addmm"):
        count_matmul_flops(torch.addmm, torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(4, 3))
