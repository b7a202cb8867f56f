"""LoRA: a frozen linear layer plus a trainable low-rank bypass.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685.
Rank-stabilised scaling: Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for
Fine-Tuning with LoRA" (rsLoRA), arXiv 2312.03732.

Key equation (nn.Linear orientation, W0 [out, in]):

    h = W0 x + s * B (A x),    A [r, in], B [out, r],    s = alpha / r  (rsLoRA: alpha / sqrt(r))

A starts Kaiming-uniform and B starts at zero, so the update dW = s * B @ A is zero at
step 0 while the gradient of B is not. After training, merge() folds dW into W0 so that
inference costs exactly one matmul again.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .hparams import check_lora_hparams, lora_scaling


class LoRALinear(nn.Module):
    """Wraps a frozen nn.Linear `base` and adds s * B @ A to its weight, lazily or merged.

    The adapter tensors are kept in float32 whatever the base dtype: an fp16 or bf16 Adam
    step on a small parameter rounds away (HF PEFT upcasts adapters the same way). The
    forward casts the input to float32 for the bypass and the result back to the base's
    output dtype.
    """

    #: parameter names that belong to the adapter (trained, saved, loaded)
    adapter_parameter_names = ("lora_A", "lora_B")
    method = "lora"
    base_type = nn.Linear  # QLoRALinear wraps a frozen 4-bit layer instead
    mergeable = True  # False where merge() can only raise (QLoRALinear)

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 rslora: bool = False):
        super().__init__()
        if not isinstance(base, self.base_type):
            wanted = "nn.Linear" if self.base_type is nn.Linear else self.base_type.__name__
            raise TypeError(f"{type(self).__name__} wraps an {wanted}, got {type(base).__name__}; "
                            "for a whole model use inject_lora(model, target_modules=[...])")
        check_lora_hparams(r, alpha, dropout)
        self.base = base
        base.requires_grad_(False)  # W0 (and its bias) stay frozen
        self.r, self.alpha, self.rslora, self.dropout_p = int(r), alpha, bool(rslora), float(dropout)
        self.scaling = lora_scaling(alpha, r, rslora)
        device = next(iter([*base.parameters(), *base.buffers()])).device  # adapters live beside W0
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device))  # [r, in]
        self.lora_B = nn.Parameter(torch.empty(base.out_features, r, device=device))  # [out, r]
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters_()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @torch.no_grad()
    def reset_lora_parameters_(self) -> None:
        """A ~ Kaiming-uniform with a = sqrt(5) (nn.Linear's own default), B = 0, so dW = 0."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """dW = s * B @ A, shape [out, in], in float32."""
        return self.scaling * (self.lora_B @ self.lora_A)  # [out, r] @ [r, in] -> [out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # W0 x + b, [..., out]
        if self.merged:  # dW already lives inside base.weight
            return out
        x = self.lora_dropout(x.to(self.lora_A.dtype))  # dropout on the bypass input only
        h = x @ self.lora_A.T  # [..., r]
        return out + (self.scaling * (h @ self.lora_B.T)).to(out.dtype)  # [..., out]

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + dW; afterwards the forward is a single base matmul. A no-op if merged."""
        if not self.merged:
            w = self.base.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W0 - dW, undoing merge() (exactly only up to the base dtype's rounding)."""
        if self.merged:
            w = self.base.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False

    def adapter_config(self) -> dict:
        """The hyper-parameters an adapter file records (see lora_edu.methods.adapters)."""
        return {"method": self.method, "r": self.r, "alpha": float(self.alpha), "rslora": self.rslora,
                "dropout": self.dropout_p}

    def extra_repr(self) -> str:
        kind = "alpha/sqrt(r)" if self.rslora else "alpha/r"
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g} ({kind}), merged={self.merged}"
