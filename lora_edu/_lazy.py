"""Public names that are imported on first use (PEP 562), so `import lora_edu` costs nothing.

Each package's __init__ lists where its names live; attribute access imports that module
then. The memory ledger is plain arithmetic and runs where torch is missing (a browser):
only the modules a name needs are imported, so `lora_edu.estimate_memory` never loads torch.
"""

from __future__ import annotations

import importlib
import sys


def attach(package: str, names: dict[str, str], subpackages: tuple[str, ...] = ()):
    """Return (__getattr__, __dir__, __all__) for `package`.

    names maps each public name to the module that defines it, relative to the package
    ("methods.lora"); subpackages are importable as attributes too.
    """

    def __getattr__(name: str):
        if name in names:
            value = getattr(importlib.import_module(f"{package}.{names[name]}"), name)
        elif name in subpackages:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        vars(sys.modules[package])[name] = value  # cached: the next access is a plain lookup
        return value

    def __dir__():
        return sorted({*vars(sys.modules[package]), *names, *subpackages})

    return __getattr__, __dir__, sorted(names)

