"""The PEFT methods: layers that wrap a frozen base (LoRA, rsLoRA, DoRA, PiSSA, LoRA-GA, AdaLoRA,
(IA)^3; base.py says what they share), their hyper-parameters,
putting them into a model by target name, and adapter files on disk (safetensors: lora_edu's own
file, or HF PEFT's adapter folder).

hparams.py is plain arithmetic (no torch); the layers, injection and files need torch.
"""

from .._lazy import attach

#: public name -> the module (in this package) that defines it; lora_edu re-exports them
NAMES = {
    "check_lora_hparams": "hparams", "lora_scaling": "hparams", "lora_param_count": "hparams",
    "LoRALinear": "lora", "DoRALinear": "dora", "AdapterLayer": "base",
    "IA3Linear": "ia3", "inject_ia3": "ia3", "ia3_param_count": "ia3",
    "PiSSALinear": "pissa", "inject_pissa": "pissa", "convert_to_lora": "shifted",
    "LoRAGALinear": "loraga", "inject_loraga": "loraga", "estimate_full_gradients": "loraga",
    "AdaLoRALinear": "adalora", "inject_adalora": "adalora", "orthogonal_penalty": "adalora",
    "RankAllocator": "adalora_budget", "rank_pattern": "adalora_budget", "budget_schedule": "adalora_budget",
    "inject_lora": "inject", "merge_lora": "inject", "unmerge_lora": "inject",
    "mark_only_lora_trainable": "inject", "count_trainable_params": "inject", "adapter_modules": "inject",
    "save_adapter": "adapters", "load_adapter": "adapters", "read_adapter": "adapters",
    "AdapterFileError": "safe_files", "read_peft_folder": "peft_files",
}

__getattr__, __dir__, __all__ = attach(__name__, NAMES)
