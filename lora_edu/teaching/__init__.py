"""The book's helpers: figures and kernel-free frame players (plots.py), the appendix's sanity
report (sanity.py), a matmul FLOP counter that needs no dispatch mode (flops.py), and printing
a figure with only the digits another CPU reproduces (printing.py).
"""

from .._lazy import attach

#: public name -> the module (in this package) that defines it; lora_edu re-exports them
NAMES = {
    "Check": "sanity", "run_sanity_checks": "sanity", "count_matmul_flops": "flops",
    "steady": "printing",
}

__getattr__, __dir__, __all__ = attach(__name__, NAMES)
