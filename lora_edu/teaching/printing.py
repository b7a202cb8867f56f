"""Printing a computed figure with only the digits that another CPU reproduces.

A figure that went through a training loop moves in its third digit on another BLAS path
(other CPUs, thread counts, ATen kernels; scripts/cpu_drift.py measures how far). A stored
notebook output must still match there, so each such figure is printed with a format whose
digits hold over the figure's measured spread: steady(x, ".2f", rel=1e-3) formats x and
raises if some value within x * (1 +- rel) would print differently.

When the outputs are written to be stored (scripts/execute_notebooks.py sets
LORA_EDU_WRITING_OUTPUTS=1), the margin is three spreads instead of one. The stored figure
then sits at least three spreads from a rounding boundary, so on a reader's CPU, where it
moved by at most one spread, it is still two spreads away, the check passes, and the printed
text is the stored one. A format too close to a boundary fails where the notebook is
written, not where it is read.
"""

from __future__ import annotations

import math
import os

#: the margin, in spreads, required while writing the outputs that get stored
WRITING_MARGIN = 3


def writing_outputs() -> bool:
    """True while scripts/execute_notebooks.py executes notebooks to store their outputs."""
    return os.environ.get("LORA_EDU_WRITING_OUTPUTS", "") not in ("", "0")


def steady(value: float, spec: str, rel: float) -> str:
    """format(value, spec), checked to read the same for any value within a relative spread of rel.

    rel is how far the figure moves between CPUs (measured with scripts/cpu_drift.py); while
    writing stored outputs the check spans WRITING_MARGIN times that.
    """
    if not (isinstance(rel, (int, float)) and 0 <= rel < 1):
        raise ValueError(f"rel must be a relative spread in [0, 1), e.g. 1e-3, got {rel!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"cannot print {value!r} steadily: it is not finite")
    margin = rel * (WRITING_MARGIN if writing_outputs() else 1)
    text = format(value, spec)
    for bound in (value * (1 - margin), value * (1 + margin)):
        if format(bound, spec) != text:
            raise ValueError(
                f"{value!r} prints as {text!r} with {spec!r}, but as {format(bound, spec)!r} within "
                f"{margin:.2g} of it (a spread of {rel:.2g}"
                f"{f', times {WRITING_MARGIN} while writing outputs' if writing_outputs() else ''}): "
                "another CPU could print either. Use a format with fewer digits, "
                "or state a claim about the figure instead of printing it")
    return text
