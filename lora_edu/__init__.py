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
"""

from ._lazy import attach

SUBPACKAGES = ("methods", "quant", "train", "memory", "tiny", "experiments", "teaching", "data")

__getattr__, __dir__, __all__ = attach(__name__, {
    # methods
    "LoRALinear": "methods.lora", "DoRALinear": "methods.dora",
    "lora_scaling": "methods.hparams", "check_lora_hparams": "methods.hparams",
    "lora_param_count": "methods.hparams",
    "inject_lora": "methods.inject", "merge_lora": "methods.inject", "unmerge_lora": "methods.inject",
    "mark_only_lora_trainable": "methods.inject", "count_trainable_params": "methods.inject",
    "adapter_modules": "methods.inject",
    "save_adapter": "methods.adapters", "load_adapter": "methods.adapters", "read_adapter": "methods.adapters",
    # quant
    "nf4_levels": "quant.levels", "int4_levels": "quant.levels", "fp4_levels": "quant.levels",
    "NF4_OFFSET": "quant.levels", "dynamic_map": "quant.double_quant",
    "double_quantize": "quant.double_quant", "DoubleQuantizedAbsmax": "quant.double_quant",
    "quantize_nf4": "quant.quantized", "quantize_4bit": "quant.quantized", "QuantizedTensor": "quant.quantized",
    "bits_per_param": "quant.sizes", "scale_bytes": "quant.sizes",
    "NF4Linear": "quant.qlora", "QLoRALinear": "quant.qlora", "prepare_qlora": "quant.qlora",
    # train
    "Adam": "train.adam", "PagedAdam": "train.paged", "checkpoint": "train.checkpointing",
    # memory
    "ModelSpec": "memory.spec", "PRESETS": "memory.spec", "get_preset": "memory.spec",
    "spec_from_tiny_config": "memory.spec", "count_params": "memory.spec", "linear_shapes": "memory.spec",
    "lora_params_for": "memory.spec",
    "Ledger": "memory.ledger", "estimate_memory": "memory.ledger", "activation_bytes": "memory.ledger",
    "saved_activation_terms": "memory.activations", "recompute_bytes": "memory.activations",
    "estimate_peak": "memory.peak",
    "measure_step": "memory.measure", "saved_activations": "memory.measure", "MeasuredStep": "memory.measure",
    # tiny
    "TinyConfig": "tiny.model", "TinyLlama": "tiny.model", "LLAMA_TARGETS": "tiny.model",
    "pretrained_model": "tiny.model",
    "Task": "tiny.tasks", "PRETRAIN": "tiny.tasks", "FINETUNE": "tiny.tasks", "make_batches": "tiny.tasks",
    "entropy_floor": "tiny.tasks",
    # experiments
    "finetune": "experiments.scaling", "update_std": "experiments.scaling",
    "adapter_grad_norm": "experiments.scaling", "loglog_slope": "experiments.scaling",
    # teaching
    "Check": "teaching.sanity", "run_sanity_checks": "teaching.sanity", "count_matmul_flops": "teaching.flops",
    "steady": "teaching.printing",
}, SUBPACKAGES)

__version__ = "0.1.0"
