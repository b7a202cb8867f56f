"""lora_edu: LoRA and its family from scratch, small enough to read, tested against HF PEFT.

The subpackages name the parts (each one's __init__ says what it holds):

    methods/      LoRA, rsLoRA, DoRA layers, injection into a model, adapter files
    quant/        NF4 / INT4 / FP4, blockwise and double quantization, QLoRA, kernels
    train/        Adam written out, paged Adam, gradient checkpointing
    memory/       the memory ledger, saved activations, a GPU step's peak, measuring a step
    tiny/         the tiny LLaMA and its synthetic tasks
    experiments/  the chapters' experiments on the tiny model
    teaching/     figures, the appendix's sanity report, the FLOP counter, steady printing
    data/         stored results of the slow experiments

Imports run one way: methods and train use nothing else here; quant uses methods; tiny uses
train; memory, experiments and teaching sit on top. The public names below are imported on
first use (PEP 562), so `import lora_edu` loads no torch, and the ledger runs without it.
Each subpackage lists its names in NAMES; this file re-exports all of them.
"""

from importlib import import_module as _import_module

from ._lazy import attach

SUBPACKAGES = ("methods", "quant", "train", "memory", "tiny", "experiments", "teaching", "data")

_NAMES = {}
for _sub in SUBPACKAGES:
    # each subpackage's __init__ only lists its names (no torch): gather them here
    for _name, _module in getattr(_import_module(f"{__name__}.{_sub}"), "NAMES", {}).items():
        if _name not in SUBPACKAGES:  # tiny.train() stays there: lora_edu.train is the subpackage
            _NAMES[_name] = f"{_sub}.{_module}"
del _sub, _name, _module

__getattr__, __dir__, __all__ = attach(__name__, _NAMES, SUBPACKAGES)

__version__ = "0.1.0"
