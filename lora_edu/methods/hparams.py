"""LoRA's hyper-parameters as plain arithmetic: the checks, the scale s and the parameter count.

Hu et al. 2021 (arXiv 2106.09685): s = alpha / r, and LoRA on layers of shape [d_i, k_i] trains
sum_i r * (d_i + k_i) numbers (section 4). Kalajdzievski 2023, rsLoRA (arXiv 2312.03732):
s = alpha / sqrt(r). No torch here: the memory ledger uses these where torch is not installed.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable


def check_lora_hparams(r, alpha, dropout=0.0) -> None:
    """Raise a clear error for a rank, alpha or dropout that cannot work."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral):
        raise TypeError(f"r must be a positive int (the rank of B @ A), got {r!r} of type {type(r).__name__}")
    if r <= 0:
        raise ValueError(f"r must be a positive int (the rank of B @ A), got r={r}; typical values are 4 to 64")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha < math.inf:
        raise ValueError(f"alpha must be a positive, finite number (the update is scaled by alpha/r), got alpha={alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got dropout={dropout!r}; use 0.0 to turn it off")


def lora_scaling(alpha, r, rslora=False) -> float:
    """The factor s in h = W0 x + s * B A x: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    check_lora_hparams(r, alpha)
    return alpha / math.sqrt(r) if rslora else alpha / r


def lora_param_count(shapes: Iterable[tuple[int, int]], r: int) -> int:
    """sum over layers of r * (d + k) for weights of shape (d, k): the size of all A and B.

    For a ModelSpec and a target set, lora_edu.memory.spec.lora_params_for builds the shapes.
    """
    if hasattr(shapes, "hidden_size"):  # a ModelSpec: its shapes depend on the target set
        raise TypeError("lora_param_count takes a list of (d, k) shapes; for a ModelSpec use "
                        "lora_params_for(spec, targets, r)")
    check_lora_hparams(r, alpha=1.0)
    total = 0
    for shape in shapes:
        d, k = shape
        if d <= 0 or k <= 0:
            raise ValueError(f"layer shapes must be positive (d, k) pairs, got {shape!r}")
        total += r * (d + k)
    return total
