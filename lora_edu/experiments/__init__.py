"""The chapters' experiments on the tiny model, shared by the notebooks and the scripts in code/
that precompute the stored results: scaling.py for chapter 2 (rank, scale and target sweeps).
"""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, {
    "finetune": "scaling", "update_std": "scaling", "adapter_grad_norm": "scaling", "loglog_slope": "scaling",
})
