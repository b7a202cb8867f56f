"""The chapters' experiments on the tiny model, shared by the notebooks and the scripts in code/
that precompute the stored results: scaling.py for chapter 2 (rank, scale and target sweeps).
"""

from .._lazy import attach

#: public name -> the module (in this package) that defines it; lora_edu re-exports them
NAMES = {
    "finetune": "scaling", "update_std": "scaling", "adapter_grad_norm": "scaling", "loglog_slope": "scaling",
}

__getattr__, __dir__, __all__ = attach(__name__, NAMES)
