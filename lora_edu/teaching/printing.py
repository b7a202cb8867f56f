"""Printing a computed figure with only the digits that another CPU reproduces.

A figure that went through a training loop moves in its third digit on another BLAS path
(other CPUs, thread counts, ATen kernels; scripts/cpu_drift.py measures how far). A stored
notebook output must still match there, so each such figure is printed with a format whose
every digit holds over the figure's measured spread: steady(x, ".2f", rel=1e-3) formats x,
and raises if x * (1 - rel) and x * (1 + rel) would print differently. A format that sits
on a rounding boundary then fails on the machine that writes the notebook, not on the
reader's.
"""

from __future__ import annotations

import math


def steady(value: float, spec: str, rel: float) -> str:
    """format(value, spec), checked to be the same anywhere within a relative spread of rel."""
    if not (isinstance(rel, (int, float)) and 0 <= rel < 1):
        raise ValueError(f"rel must be a relative spread in [0, 1), e.g. 1e-3, got {rel!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"cannot print {value!r} steadily: it is not finite")
    text = format(value, spec)
    for bound in (value * (1 - rel), value * (1 + rel)):
        if format(bound, spec) != text:
            raise ValueError(
                f"{value!r} prints as {text!r} with {spec!r}, but as {format(bound, spec)!r} within its "
                f"spread of {rel:.2g}: another CPU could print either. Use a format with fewer digits, "
                "or state a claim about the figure instead of printing it")
    return text
