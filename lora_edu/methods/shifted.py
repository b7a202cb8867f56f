"""A LoRA whose initial factors are not zero, so its frozen base is shifted to start unchanged.

PiSSA (Meng et al. 2024, arXiv 2404.02948) starts A, B from W0's top singular triplets and
LoRA-GA (Wang et al. 2024, arXiv 2407.05000) from the full fine-tuning gradient's. Both then
freeze the residual, not W0, so that the model computes exactly what it did before (up to
one float rounding of the residual):

    W_res = W0 - s * B0 @ A0                     A0 [r, in], B0 [out, r], kept as buffers
    h     = W_res x + s * B (A x),               A = A0, B = B0 at step 0, so h = W0 x

A0 and B0 are saved in the adapter file beside A and B, so a file loads into the original
model (the residual is rebuilt from them) and converts to a plain LoRA on W0, the way HF PEFT's
save_pretrained(..., path_initial_model_for_weight_conversion=...) does:

    W_res + s B A = W0 + s (B A - B0 A0) = W0 + s' [B, -B0] @ [A; A0]     rank 2r
    s' = s:  alpha' = 2 alpha  (rsLoRA: alpha' = sqrt(2) alpha)
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .inject import adapter_modules, check_no_adapters, wrap_modules
from .lora import LoRALinear

#: base dtypes the residual can be written in (PEFT's PiSSA and LoRA-GA take the same three)
SHIFT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class ShiftedLoRALinear(LoRALinear):
    """A LoRALinear started from data-dependent A0, B0 over the residual W0 - s * B0 @ A0.

    Subclasses compute A0, B0 (PiSSALinear from W0, LoRAGALinear from a gradient) and call
    start_from_(a0, b0). With init=False (for_loading) the buffers stay zero and the base
    stays W0 until an adapter file's tensors arrive in load_adapter_tensors_.
    """

    adapter_buffer_names = ("lora_A0", "lora_B0")

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 rslora: bool = False, bypass_dtype: torch.dtype | None = None):
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{type(self).__name__} wraps a full-precision nn.Linear (it reads W0 and writes "
                            f"the residual W0 - s * B0 @ A0 into it), got {type(base).__name__}. For a 4-bit "
                            "model, initialise on the float model first and quantize the residual afterwards")
        super().__init__(base, r=r, alpha=alpha, dropout=dropout, rslora=rslora, bypass_dtype=bypass_dtype)
        # zero until start_from_ or a file sets them: s * 0 @ 0 = 0, the base is still W0
        self.register_buffer("lora_A0", torch.zeros_like(self.lora_A))  # [r, in]
        self.register_buffer("lora_B0", torch.zeros_like(self.lora_B))  # [out, r]

    # ------------------------------------------------------------------ what the method refuses
    @classmethod
    def max_rank(cls, out_features: int, in_features: int) -> tuple[int, str]:
        """The largest r this method can take on an [out, in] weight, and why."""
        return min(out_features, in_features), "a rank-r factorisation needs r <= min(out, in)"

    @classmethod
    def check_weight(cls, base: nn.Module, r: int, where: str) -> None:
        """Raise unless `base` is an nn.Linear of a supported dtype, finite, with room for rank r."""
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{cls.__name__} cannot adapt {where}: it is a {type(base).__name__}, not an "
                            "nn.Linear (initialise on the full-precision model, quantize the residual after)")
        w = base.weight
        if w.dtype not in SHIFT_DTYPES:
            raise TypeError(f"{cls.__name__} cannot adapt {where}: its weight is {w.dtype}; the residual is "
                            f"computed in float32 and written in float32, bfloat16 or float16. Convert the "
                            "model first, e.g. model.float()")
        limit, why = cls.max_rank(base.out_features, base.in_features)
        if r > limit:
            raise ValueError(f"{cls.__name__} cannot adapt {where} (weight [{base.out_features}, "
                             f"{base.in_features}]) with r={r}: {why}, so r <= {limit} here. Lower r, or "
                             "leave the layer out of target_modules")
        if w.device.type != "meta" and not bool(torch.isfinite(w).all()):
            raise ValueError(f"{cls.__name__} cannot adapt {where}: its weight has inf or NaN entries, "
                             "so no factorisation of it (or residual) is defined")

    @classmethod
    def check_module(cls, name: str, base: nn.Module, config: dict) -> None:
        cls.check_weight(base, config["r"], repr(name))

    def check_base(self) -> None:
        """Run by LoRALinear.__init__ before it freezes anything: a refused layer is left as it was."""
        self.check_weight(self.base, self.r, f"this {type(self.base).__name__}")

    @classmethod
    def for_loading(cls, base: nn.Module, config: dict, name: str | None = None) -> ShiftedLoRALinear:
        """A layer with `config` whose data-dependent init is skipped: a file's tensors will arrive."""
        kwargs = {k: v for k, v in config.items() if k in cls.config_keys and k != "method"}
        return cls(base, **kwargs, init=False)

    # ------------------------------------------------------------------ the shift
    def initial_delta(self) -> torch.Tensor:
        """s * B0 @ A0, [out, in] in float32: what the base gave up at init."""
        return self.scaling * (self.lora_B0 @ self.lora_A0)  # [out, r] @ [r, in]

    def original_weight(self) -> torch.Tensor:
        """W0 = W_res + s * B0 @ A0, [out, in] in float32 (W0 itself while the buffers are zero)."""
        if self.merged:
            raise ValueError("the adapter is merged into the base; call unmerge() first")
        return self.base.weight.float() + self.initial_delta()

    @torch.no_grad()
    def start_from_(self, a0: torch.Tensor, b0: torch.Tensor) -> None:
        """A = A0, B = B0, and the base W0 - s * B0 @ A0: computed in float32, rounded once."""
        w0 = self.original_weight()  # [out, in]; undoes an earlier shift, if any
        for own, value in ((self.lora_A0, a0), (self.lora_B0, b0), (self.lora_A, a0), (self.lora_B, b0)):
            own.copy_(value)
        w = self.base.weight
        w.copy_((w0 - self.initial_delta()).to(w.dtype))

    @torch.no_grad()
    def load_adapter_tensors_(self, tensors: dict) -> None:
        """A file's A, B, A0, B0; the base is rebuilt from W0 if A0 or B0 changed.

        A fresh for_loading layer has A0 = B0 = 0, so W0 is its base and the residual comes out
        bit for bit as at injection. Loading the same A0, B0 again leaves the base untouched.
        """
        old = (self.lora_A0.clone(), self.lora_B0.clone())
        w0 = self.original_weight()
        super().load_adapter_tensors_(tensors)
        if not (torch.equal(old[0], self.lora_A0) and torch.equal(old[1], self.lora_B0)):
            w = self.base.weight
            w.copy_((w0 - self.initial_delta()).to(w.dtype))

    # ------------------------------------------------------------------ back to plain LoRA
    @torch.no_grad()
    def to_lora(self, base: nn.Linear | None = None) -> LoRALinear:
        """A rank-2r LoRALinear on the original W0 that computes what this layer computes.

        `base` is the original nn.Linear (it is frozen and wrapped, not copied); by default a
        copy of this layer's base with W0 = W_res + s * B0 @ A0 written back (one rounding).
        """
        if self.merged:
            raise ValueError("the adapter is merged into the base; call unmerge() before to_lora()")
        if base is None:
            w0 = self.original_weight()
            base = copy.deepcopy(self.base)
            base.weight.copy_(w0.to(base.weight.dtype))
        elif not isinstance(base, nn.Linear) or base.weight.shape != self.base.weight.shape:
            raise ValueError(f"to_lora needs the original nn.Linear of weight shape {tuple(self.base.weight.shape)}, "
                             f"got {type(base).__name__} {tuple(getattr(base, 'weight', torch.empty(0)).shape)}")
        alpha = self.alpha * math.sqrt(2) if self.rslora else 2 * self.alpha  # keeps s' = s at rank 2r
        lora = LoRALinear(base, r=2 * self.r, alpha=alpha, dropout=self.dropout_p, rslora=self.rslora,
                          bypass_dtype=self.bypass_dtype)
        lora.lora_A.copy_(torch.cat([self.lora_A, self.lora_A0], dim=0))  # [2r, in]
        lora.lora_B.copy_(torch.cat([self.lora_B, -self.lora_B0], dim=1))  # [out, 2r]
        return lora


def convert_to_lora(model: nn.Module, original: nn.Module | None = None) -> nn.Module:
    """A copy of the model with every shifted layer (PiSSA, LoRA-GA) turned into a rank-2r LoRA on W0.

    `original` is the model before injection (not changed; it is copied); without it W0 is
    rebuilt from each residual (one rounding to the base dtype). The copy holds plain LoRALinear
    layers, so save_adapter writes an adapter any copy of the original model can load, in
    lora_edu's file or PEFT's folder (format="peft"), next to other LoRA adapters.
    """
    layers = adapter_modules(model)
    if not layers or not all(isinstance(m, ShiftedLoRALinear) for m in layers.values()):
        kinds = sorted({type(m).__name__ for m in layers.values()})
        raise ValueError(f"convert_to_lora takes a model with PiSSA or LoRA-GA layers, this one has {kinds or 'none'}")
    if any(m.merged for m in layers.values()):
        raise ValueError("the adapters are merged; call unmerge_lora(model) before convert_to_lora")
    if original is None:
        return wrap_modules(copy.deepcopy(model), layers, lambda name, layer: layer.to_lora())
    check_no_adapters(original, "convert_to_lora(model, original) with the model as it was before injection")
    for name, layer in layers.items():
        try:
            w = original.get_submodule(name).weight.detach().float()
        except AttributeError:
            raise ValueError(f"the original model has no layer {name!r} with a weight") from None
        # the residual is rounded once to the base dtype, so W_res + s B0 A0 is W0 to a few of its ulps
        with torch.no_grad():
            w0 = layer.original_weight()
        tol = 8 * torch.finfo(layer.base.weight.dtype).eps * w0.norm()
        if w.shape != w0.shape or (w - w0).norm() > tol:
            raise ValueError(f"layer {name!r} of `original` is not the weight this adapter was initialised on "
                             "(W_res + s * B0 @ A0 differs from it); pass the model from before injection")
    return wrap_modules(copy.deepcopy(original), layers, lambda name, base: layers[name].to_lora(base))
