"""Quantization for QLoRA: the 4-bit level tables (NF4, INT4, FP4), blockwise absmax quantization
and 4-bit packing, double quantization of the scales, the frozen NF4 layer with LoRA on top,
and the dequantize kernels (C++ source in csrc/, Triton on CUDA).

sizes.py (bytes and bits per weight) is plain arithmetic, with no torch.
"""

from .._lazy import attach

#: public name -> the module (in this package) that defines it; lora_edu re-exports them
NAMES = {
    "nf4_levels": "levels", "int4_levels": "levels", "fp4_levels": "levels", "bnb_fp4_levels": "levels",
    "NF4_OFFSET": "levels",
    "dynamic_map": "double_quant", "double_quantize": "double_quant", "DoubleQuantizedAbsmax": "double_quant",
    "quantize_nf4": "quantized", "quantize_4bit": "quantized", "QuantizedTensor": "quantized",
    "bits_per_param": "sizes", "scale_bytes": "sizes",
    "NF4Linear": "qlora", "QLoRALinear": "qlora", "QDoRALinear": "qlora", "prepare_qlora": "qlora",
}

__getattr__, __dir__, __all__ = attach(__name__, NAMES)
