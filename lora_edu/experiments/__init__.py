"""The chapters' experiments on the tiny model, shared by the notebooks and the scripts in code/
that precompute the stored results: scaling.py for chapter 2 (rank, scale and target sweeps, and
the fine-tunes they run), subspace.py for what an update looks like (its singular spectrum, and
how much two updates share, as in section 7 of the LoRA paper), seeds.py for reading stored runs
seed by seed (mean, spread, paired comparisons).
"""

from .._lazy import attach

#: public name -> the module (in this package) that defines it; lora_edu re-exports them
NAMES = {
    "finetune": "scaling", "update_std": "scaling", "adapter_grad_norm": "scaling", "loglog_slope": "scaling",
    "weight_deltas": "scaling", "energy_share": "subspace", "top_directions": "subspace",
    "subspace_similarity": "subspace", "singular_values": "subspace", "top_k_share": "subspace",
    "rank_for_share": "subspace", "truncate_updates": "scaling",
}

__getattr__, __dir__, __all__ = attach(__name__, NAMES)
