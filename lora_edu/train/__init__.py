"""Training machinery written out: Adam (optionally with float32 master weights, parameter
groups and AdamW's decoupled weight decay), LoRA+'s parameter groups, paged Adam whose states
live in pinned CPU memory, and gradient checkpointing.

Checkpointing sits here rather than in memory/ because the tiny model uses it and the memory
measurements use the tiny model: the subpackages import one way only.
"""

from .._lazy import attach

#: public name -> the module (in this package) that defines it; lora_edu re-exports them
NAMES = {
    "Adam": "adam", "PagedAdam": "paged", "checkpoint": "checkpointing",
    "loraplus_param_groups": "loraplus", "loraplus_optimizer": "loraplus",
}

__getattr__, __dir__, __all__ = attach(__name__, NAMES)
