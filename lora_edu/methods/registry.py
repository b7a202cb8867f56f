"""The adapter methods by the name an adapter file records: method -> layer class.

Imported on first use, so that reading a file's config does not load every method's module.
"""

from __future__ import annotations

from importlib import import_module

#: method -> (module in this package, class name)
METHODS = {
    "lora": ("lora", "LoRALinear"),
    "dora": ("dora", "DoRALinear"),
    "pissa": ("pissa", "PiSSALinear"),
    "loraga": ("loraga", "LoRAGALinear"),
    "adalora": ("adalora", "AdaLoRALinear"),
    "ia3": ("ia3", "IA3Linear"),
}


def adapter_class(method: str) -> type:
    """The layer class for `method`; a ValueError naming the known methods otherwise."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown adapter method {method!r}; lora_edu knows {sorted(METHODS)}")
    module, name = METHODS[method]
    return getattr(import_module(f"{__package__}.{module}"), name)
