"""Training machinery written out: Adam (optionally with float32 master weights), paged Adam
whose states live in pinned CPU memory, and gradient checkpointing.

Checkpointing sits here rather than in memory/ because the tiny model uses it and the memory
measurements use the tiny model: the subpackages import one way only.
"""

from .._lazy import attach

#: public name -> the module (in this package) that defines it; lora_edu re-exports them
NAMES = {
    "Adam": "adam", "PagedAdam": "paged", "checkpoint": "checkpointing",
}

__getattr__, __dir__, __all__ = attach(__name__, NAMES)
