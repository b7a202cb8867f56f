"""Training machinery written out: Adam (optionally with float32 master weights), paged Adam
whose states live in pinned CPU memory, and gradient checkpointing.

Checkpointing sits here rather than in memory/ because the tiny model uses it and the memory
measurements use the tiny model: the subpackages import one way only.
"""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, {
    "Adam": "adam", "PagedAdam": "paged", "checkpoint": "checkpointing",
})
