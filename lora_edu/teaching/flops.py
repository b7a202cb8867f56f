"""Counting the floating-point work of matrix products, to show what merging saves.

A product of an [m, k] and a [k, n] matrix costs 2*m*k*n FLOPs (one multiply and one add
per term). The unmerged LoRA forward runs W0 x plus B (A x), i.e. an extra
2 * batch * r * (in + out); the merged one runs W0' x alone, exactly the base layer's cost.

count_matmul_flops records every matrix product in a call through a TorchFunctionMode (the
Python-level hook torch offers for its functions). torch.utils.flop_counter.FlopCounterMode
counts the same at the dispatcher level; the tests check that both agree. This counter is
kept because entering a dispatch mode loads torch's compiler stack (over a second on a small
CPU), which a notebook that only wants a count should not pay.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def _matmul_flops(a: torch.Tensor, b: torch.Tensor) -> int:
    """2 * (batch elements) * m * k * n for a @ b with a [..., m, k] and b [..., k, n]."""
    if a.dim() == 1:
        a = a.unsqueeze(0)  # [1, k]
    if b.dim() == 1:
        b = b.unsqueeze(-1)  # [k, 1]
    # leading (batch) dims broadcast; with sizes >= 1 that is the larger of each pair, after
    # left-padding the shorter shape with ones (torch.broadcast_shapes would import sympy)
    lead_a, lead_b = tuple(a.shape[:-2]), tuple(b.shape[:-2])
    width = max(len(lead_a), len(lead_b))
    lead_a, lead_b = (1,) * (width - len(lead_a)) + lead_a, (1,) * (width - len(lead_b)) + lead_b
    batch = math.prod(max(i, j) for i, j in zip(lead_a, lead_b))
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    return 2 * batch * m * k * n


class _MatmulCounter(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:  # x [..., in] @ W.T [in, out]
            x, w = args[0], args[1]
            self.flops += _matmul_flops(x.reshape(-1, x.shape[-1]), w.T)
        elif func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.bmm):
            self.flops += _matmul_flops(args[0], args[1])
        elif func in (torch.addmm, torch.Tensor.__rmatmul__):
            raise NotImplementedError(f"count_matmul_flops does not count {func.__name__}")
        return func(*args, **kwargs)


def count_matmul_flops(fn, *args, **kwargs) -> int:
    """FLOPs of all matrix products that fn(*args, **kwargs) runs (under torch.no_grad)."""
    counter = _MatmulCounter()
    with torch.no_grad(), counter:
        fn(*args, **kwargs)
    return counter.flops
