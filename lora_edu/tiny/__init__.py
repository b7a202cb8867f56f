"""The tiny LLaMA (RMSNorm, RoPE, SwiGLU, LLaMA's module names) and the synthetic tasks it is
pretrained and fine-tuned on, small enough to train in seconds on a CPU.
"""

from .._lazy import attach

#: public name -> the module (in this package) that defines it; lora_edu re-exports them
NAMES = {
    "TinyConfig": "model", "TinyLlama": "model", "LLAMA_TARGETS": "model", "pretrained_model": "model",
    "lm_loss": "model", "evaluate": "model", "train": "model",
    "Task": "tasks", "PRETRAIN": "tasks", "FINETUNE": "tasks", "make_batches": "tasks", "entropy_floor": "tasks",
}

__getattr__, __dir__, __all__ = attach(__name__, NAMES)
