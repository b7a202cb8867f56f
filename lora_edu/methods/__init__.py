"""The PEFT methods: layers that wrap a frozen base (LoRA, rsLoRA, DoRA), their hyper-parameters,
putting them into a model by target name, and adapter files on disk (safetensors: lora_edu's own
file, or HF PEFT's adapter folder).

hparams.py is plain arithmetic (no torch); the layers, injection and files need torch.
"""

from .._lazy import attach

#: public name -> the module (in this package) that defines it; lora_edu re-exports them
NAMES = {
    "check_lora_hparams": "hparams", "lora_scaling": "hparams", "lora_param_count": "hparams",
    "LoRALinear": "lora", "DoRALinear": "dora",
    "inject_lora": "inject", "merge_lora": "inject", "unmerge_lora": "inject",
    "mark_only_lora_trainable": "inject", "count_trainable_params": "inject", "adapter_modules": "inject",
    "save_adapter": "adapters", "load_adapter": "adapters", "read_adapter": "adapters",
    "AdapterFileError": "safe_files", "read_peft_folder": "peft_files",
}

__getattr__, __dir__, __all__ = attach(__name__, NAMES)
