"""Comparing a fresh re-run of a sweep script with its committed JSON file.

A figure that went through a training loop moves a little on another CPU code path; settings
and counts must not move at all. Each test file states its own tolerances, with the drift it
measured under ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE (scripts/test.sh's second pass).
"""

from __future__ import annotations

import math


def close(a, b, rel: float) -> bool:
    """a and b equal, except that floats (also inside lists and dicts) may differ by rel of their size."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=rel)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], rel) for k in a)
    return a == b and type(a) is type(b)


def same_run(stored: dict, fresh: dict, tolerance: dict) -> bool:
    """Settings and counts equal exactly; measured figures (the keys of `tolerance`) within their tolerance."""
    return stored.keys() == fresh.keys() and all(close(stored[k], fresh[k], tolerance.get(k, 0.0)) for k in stored)
