"""lora_edu: LoRA and its family from scratch, small enough to read, tested against HF PEFT.

Each module holds one concept; this file only gathers the public names.
"""

from .adapters import load_adapter, read_adapter, save_adapter
from .dora import DoRALinear
from .flops import count_matmul_flops
from .inject import (adapter_modules, count_trainable_params, inject_lora, lora_param_count,
                     mark_only_lora_trainable, merge_lora, unmerge_lora)
from .lora import LoRALinear, check_lora_hparams, lora_scaling
from .optim import Adam
from .nf4 import NF4_OFFSET, fp4_levels, int4_levels, nf4_levels
from .double_quant import DoubleQuantizedAbsmax, double_quantize, dynamic_map
from .quantized import QuantizedTensor, bits_per_param, quantize_4bit, quantize_nf4, scale_bytes
from .paged import PagedAdam
from .qlora import NF4Linear, QLoRALinear, prepare_qlora
from .ledger import (Ledger, ModelSpec, PRESETS, activation_bytes, count_params, estimate_memory, get_preset,
                     linear_shapes, lora_params_for, spec_from_tiny_config)
from .activations import recompute_bytes, saved_activation_terms
from .memory import MeasuredStep, measure_step, saved_activations
from .checkpointing import checkpoint
from .tasks import FINETUNE, PRETRAIN, Task, entropy_floor, make_batches
from .tiny_transformer import LLAMA_TARGETS, TinyConfig, TinyLlama, pretrained_model
from .scaling import adapter_grad_norm, finetune, loglog_slope, update_std
from .sanity import Check, run_sanity_checks

__version__ = "0.1.0"

__all__ = [
    "LoRALinear", "DoRALinear", "lora_scaling", "check_lora_hparams",
    "inject_lora", "merge_lora", "unmerge_lora", "mark_only_lora_trainable",
    "count_trainable_params", "lora_param_count", "adapter_modules",
    "save_adapter", "load_adapter", "read_adapter",
    "run_sanity_checks", "Check", "count_matmul_flops", "Adam", "PagedAdam",
    "nf4_levels", "int4_levels", "fp4_levels", "NF4_OFFSET", "dynamic_map",
    "quantize_nf4", "quantize_4bit", "QuantizedTensor", "bits_per_param",
    "double_quantize", "DoubleQuantizedAbsmax", "NF4Linear", "QLoRALinear",
    "TinyConfig", "TinyLlama", "LLAMA_TARGETS", "pretrained_model",
    "Task", "PRETRAIN", "FINETUNE", "make_batches", "entropy_floor",
    "ModelSpec", "PRESETS", "get_preset", "spec_from_tiny_config", "count_params", "linear_shapes",
    "lora_params_for", "activation_bytes", "estimate_memory", "Ledger",
    "saved_activation_terms", "recompute_bytes", "measure_step", "saved_activations", "MeasuredStep",
    "checkpoint", "prepare_qlora", "scale_bytes",
]
