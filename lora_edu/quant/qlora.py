"""QLoRA: a frozen 4-bit NF4 base layer with a trainable LoRA bypass.

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv 2305.14314.
Forward of one layer (W0 stored as NF4 codes plus per-block scales):

    h = dequant(W0_nf4) x + s * B (A x)       dequant in the compute dtype (bf16), per call

Gradients flow through the dequantized weight to x (the layers below still need them),
but W0 itself is a buffer of uint8 codes: it has no gradient and no optimizer state, so a
parameter costs about 4.1 bits at rest instead of 16 + 16 + 32 + 64 bits for full
fine-tuning. The catch is merging: W0 + dW is not on the NF4 grid, so a merged weight
must either stay in 16/32 bits (to_merged_linear) or be re-quantized, which adds error.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..methods.dora import DoRALinear, check_nonzero_rows
from ..methods.hparams import check_lora_hparams
from ..methods.inject import _matches, adapter_modules, resolve_targets
from ..methods.lora import LoRALinear, check_bypass_dtype
from .double_quant import DoubleQuantizedAbsmax
from .quantized import QuantizedTensor, quantize_nf4

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_float_dtype(dtype, what: str) -> torch.dtype:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{what} must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}; "
                         "an integer weight cannot hold W0 + dW")
    return dtype


class _NF4Matmul(torch.autograd.Function):
    """y = x @ dequant(W).T + b, with W dequantized again in the backward instead of saved.

    Plain autograd would keep the dequantized 16-bit W alive from forward to backward, one
    full-precision copy per layer, which is what 4-bit storage set out to avoid.
    bitsandbytes' MatMul4Bit (0.50.2) makes the same trade: its backward rebuilds the whole
    weight for dL/dx. Its forward calls the gemm_4bit op, which on a CUDA GPU may run a fused
    kernel that dequantizes inside the matmul when the input has few rows (at most 4 always,
    up to 1536 where a per-GPU heuristic says it pays), and otherwise, as here and on every
    other device, dequantizes the whole weight and calls F.linear.
    """

    @staticmethod
    def forward(ctx, x, weight_q, bias, compute_dtype):
        ctx.weight_q, ctx.compute_dtype = weight_q, compute_dtype
        return F.linear(x, weight_q.dequantize(compute_dtype), bias)  # [..., out]

    @staticmethod
    def backward(ctx, grad_out):
        w = ctx.weight_q.dequantize(ctx.compute_dtype)  # [out, in], rebuilt, not stored
        return grad_out @ w, None, None, None  # dL/dx [..., in]; W and the bias are frozen


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 (like bitsandbytes' Linear4bit)."""

    def __init__(self, weight: QuantizedTensor, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"an NF4Linear weight is [out, in], got shape {tuple(weight.shape)}")
        self.weight_q = weight
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = _check_float_dtype(compute_dtype, "compute_dtype")
        # the codes are a buffer, not a Parameter: nothing here can be trained
        self.register_buffer("codes", weight.codes, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.bfloat16) -> "NF4Linear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"NF4Linear.from_linear takes an nn.Linear, got {type(linear).__name__}")
        weight = quantize_nf4(linear.weight.detach(), block_size=block_size, double_quant=double_quant)
        return cls(weight, linear.bias, compute_dtype)

    def _apply(self, fn, recurse=True):
        """.to(device) / .cuda() move the codes buffer; make the quantized weight follow it.

        Only the device changes: the scales stay float32 and the codes uint8 even under
        .to(torch.bfloat16), which would otherwise turn every float tensor into bf16.
        """
        super()._apply(fn, recurse)
        device = self.codes.device
        absmax = self.weight_q.absmax
        if isinstance(absmax, DoubleQuantizedAbsmax):
            absmax = dataclasses.replace(absmax, codes=absmax.codes.to(device), absmax=absmax.absmax.to(device),
                                         offset=absmax.offset.to(device), code=absmax.code.to(device))
        else:
            absmax = absmax.to(device)
        self.weight_q = dataclasses.replace(self.weight_q, codes=self.codes, absmax=absmax)
        return self

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W0 rebuilt from its codes, [out, in], in dtype (default: the compute dtype)."""
        return self.weight_q.dequantize(self.compute_dtype if dtype is None else dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return _NF4Matmul.apply(x.to(self.compute_dtype), self.weight_q, bias, self.compute_dtype)  # [..., out]

    @property
    def nbytes(self) -> int:
        """Bytes held: codes and scales of the weight, plus the bias."""
        return self.weight_q.nbytes + (0 if self.bias is None else self.bias.nbytes)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block_size={self.weight_q.block_size}, double_quant={self.weight_q.double_quant}, "
                f"compute_dtype={self.compute_dtype}")


class _NF4Base:
    """What LoRA and DoRA layers over an NF4Linear share: reading W0, and no in-place merge.

    Mixed in before LoRALinear / DoRALinear, whose forward and norms call these methods.
    """

    base_type = NF4Linear
    mergeable = False  # merge_lora checks this before it merges anything

    def frozen_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.base.dequantized_weight(dtype)  # rebuilt from the codes on every call

    def base_product(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.base.compute_dtype
        return _NF4Matmul.apply(x.to(dtype), self.base.weight_q, None, dtype)  # [..., out], no bias

    def frozen_tensors(self) -> tuple:
        """The codes and every tensor of the scales: writing any of them changes W0."""
        absmax = self.base.weight_q.absmax
        scales = (absmax.codes, absmax.absmax, absmax.offset) if isinstance(absmax, DoubleQuantizedAbsmax) else (absmax,)
        return (self.base.weight_q.codes, *scales)

    def frozen_version(self) -> tuple:
        return super().frozen_version() + (self.base.compute_dtype,)  # the norms are of the compute-dtype W0

    @classmethod
    def from_linear(cls, base: nn.Linear, r: int = 8, alpha: float = 16, block_size: int = 64,
                    double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16,
                    dropout: float = 0.0, rslora: bool = False, bypass_dtype: torch.dtype | None = None):
        """Quantize base's weight to NF4 and put a fresh adapter beside it."""
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_linear takes an nn.Linear, got {type(base).__name__}")
        # the usual checks first, so a bad r or alpha fails before the (slow) quantization
        LoRALinear(nn.Linear(1, 1, device="meta"), r=r, alpha=alpha, dropout=dropout, rslora=rslora,
                   bypass_dtype=bypass_dtype)
        if cls.method == "dora":  # a zero row is refused before quantizing too
            check_nonzero_rows(base.weight.detach().float().square().sum(dim=1), f"this {cls.__name__}'s base")
        nf4 = NF4Linear.from_linear(base, block_size, double_quant, compute_dtype)
        return cls(nf4, r=r, alpha=alpha, dropout=dropout, rslora=rslora, bypass_dtype=bypass_dtype)

    def merge(self) -> None:
        raise RuntimeError(f"a {type(self).__name__.removesuffix('Linear')} layer cannot merge in place: its merged weight is not on "
                           "the NF4 grid, so it would be re-quantized and lose precision. Call "
                           "to_merged_linear(torch.bfloat16) for a plain nn.Linear holding the merged weight.")

    def unmerge(self) -> None:
        raise RuntimeError(f"a {type(self).__name__.removesuffix('Linear')} layer is never merged in place, so there is nothing to "
                           "unmerge; to_merged_linear(dtype) returns the merged layer as a separate nn.Linear")

    @torch.no_grad()
    def to_merged_linear(self, dtype: torch.dtype = torch.bfloat16) -> nn.Linear:
        """dequantize -> merge -> a plain nn.Linear in dtype, rounded once: dequant(W0) + s * B @ A
        for QLoRA, magnitude * V / ||V|| with V = dequant(W0) + s * B @ A for QDoRA."""
        _check_float_dtype(dtype, "the merged layer's dtype")
        w = self.merged_weight()  # [out, in] float32
        merged = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                           device=w.device, dtype=dtype)
        merged.weight.copy_(w.to(dtype))
        if self.base.bias is not None:
            merged.bias.copy_(self.base.bias.to(dtype))
        return merged.requires_grad_(False)


class QLoRALinear(_NF4Base, LoRALinear):
    """LoRA on top of an NF4Linear. The adapter stays float32; the base computes in bf16.

    float32 adapters are PEFT's convention too; the QLoRA paper's eq. 5 keeps them in bf16.
    """


class QDoRALinear(_NF4Base, DoRALinear):
    """DoRA on top of an NF4Linear (QDoRA): the magnitude and the row norms of dequant(W0).

    The forward runs the base product through the NF4 matmul (W0 rebuilt per call, as for
    QLoRA) and W0 A^T for the norm from one more dequantization, under no_grad; ||W0||^2 is
    computed once from the codes. PEFT's DoRA on a bitsandbytes Linear4bit does the same maths.
    """


def prepare_qlora(model: nn.Module, target_modules, r: int = 8, alpha: float = 16, block_size: int = 64,
                  double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16,
                  dropout: float = 0.0, rslora: bool = False, skip=("lm_head",), dora: bool = False,
                  bypass_dtype: torch.dtype | None = None) -> nn.Module:
    """The QLoRA recipe for a whole model, in place: NF4 base, float32 adapters on the targets.

    Every nn.Linear except those named in `skip` (the output head, as in the QLoRA paper
    and PEFT) is quantized to NF4; the targeted ones also get a LoRA bypass (a QDoRA one with
    dora=True). Everything
    else (embeddings, norms, the head) is cast to compute_dtype and frozen. Target names
    are checked, and r, alpha and the dtype too, before the model is touched.
    """
    check_lora_hparams(r, alpha, dropout)
    check_bypass_dtype(bypass_dtype)
    _check_float_dtype(compute_dtype, "compute_dtype")
    if adapter_modules(model):
        raise ValueError("this model already has LoRA layers; prepare_qlora takes a plain base model")
    chosen = set(resolve_targets(model, target_modules, exclude=skip))
    if dora:  # a zero row would stop the loop below half-way, with the model already changed
        for name in chosen:
            w = model.get_submodule(name).weight.detach()
            check_nonzero_rows(w.to(compute_dtype).float().square().sum(dim=1), repr(name))
    model.requires_grad_(False).to(compute_dtype)  # before quantizing: the codes come from 16-bit weights
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or any(_matches(name, k) for k in skip):
            continue
        parent_name, _, child_name = name.rpartition(".")
        if name in chosen:
            cls = QDoRALinear if dora else QLoRALinear
            layer = cls.from_linear(module, r=r, alpha=alpha, block_size=block_size, double_quant=double_quant,
                                    compute_dtype=compute_dtype, dropout=dropout, rslora=rslora,
                                    bypass_dtype=bypass_dtype)
        else:
            layer = NF4Linear.from_linear(module, block_size, double_quant, compute_dtype)
        setattr(model.get_submodule(parent_name), child_name, layer)
    return model
