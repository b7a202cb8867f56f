"""The memory ledger: model shapes and presets (spec.py), the bytes of a fine-tuning run term by
term (ledger.py), the activations autograd keeps, op by op (activations.py), a GPU step's peak
(peak.py), and measuring a real step to check them (measure.py).

spec, ledger, activations and peak are plain arithmetic and import without torch (the book
runs them in a browser); only measure.py needs torch.
"""

from .._lazy import attach

#: public name -> the module (in this package) that defines it; lora_edu re-exports them
NAMES = {
    "ModelSpec": "spec", "PRESETS": "spec", "get_preset": "spec", "spec_from_tiny_config": "spec",
    "count_params": "spec", "linear_shapes": "spec", "lora_params_for": "spec", "peft_params_for": "spec",
    "Ledger": "ledger", "estimate_memory": "ledger", "activation_bytes": "ledger", "POLICIES": "ledger",
    "saved_activation_terms": "activations", "recompute_bytes": "activations",
    "Peak": "peak", "estimate_peak": "peak",
    "measure_step": "measure", "saved_activations": "measure", "MeasuredStep": "measure",
}

__getattr__, __dir__, __all__ = attach(__name__, NAMES)
