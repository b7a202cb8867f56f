"""DoRA: LoRA on the direction of each output row, plus a trainable magnitude per row.

Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353, built on
weight normalisation (Salimans and Kingma 2016, arXiv 1602.07868).

Key equation (nn.Linear orientation, W0 [out, in]; norms are per output row, over dim 1):

    V  = W0 + s * B @ A                     [out, in]
    W' = magnitude[:, None] * V / ||V||_row  magnitude [out], initialised to ||W0||_row

At init B = 0, so V = W0 and W' = W0: the layer starts as the identity on the base model.
As in DoRA section 4.3 and HF PEFT, ||V|| is treated as a constant in the backward pass
(detached), which saves memory and changes the forward value not at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LoRALinear


class DoRALinear(LoRALinear):
    """A LoRALinear whose merged weight is renormalised per row and rescaled by `magnitude`."""

    adapter_parameter_names = ("lora_A", "lora_B", "magnitude")
    method = "dora"

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, rslora: bool = False):
        super().__init__(base, r=r, alpha=alpha, dropout=0.0, rslora=rslora)
        with torch.no_grad():
            row_norm = base.weight.float().norm(dim=1)  # [out]
        self.magnitude = nn.Parameter(row_norm)  # one trainable length per output row
        self._merged_norm = None  # ||V||_row at merge time, needed to unmerge

    def directed_weight(self) -> torch.Tensor:
        """V = W0 + s * B @ A and its detached row norm, both float32: ([out, in], [out])."""
        v = self.base.weight.float() + self.delta_weight()  # [out, in]
        return v, v.norm(dim=1).detach()  # [out]

    def effective_weight(self) -> torch.Tensor:
        """W' = magnitude * V / ||V||_row, [out, in] in float32."""
        v, norm = self.directed_weight()
        return (self.magnitude / norm)[:, None] * v  # [out, 1] * [out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        bias = None if self.base.bias is None else self.base.bias.float()
        out = F.linear(x.float(), self.effective_weight(), bias)  # [..., out]
        return out.to(x.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W'. The row norm is kept so that unmerge() can divide it back out."""
        if not self.merged:
            v, norm = self.directed_weight()
            w = self.base.weight
            w.copy_(((self.magnitude / norm)[:, None] * v).to(w.dtype))
            self._merged_norm = norm
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W' * ||V|| / magnitude - s * B @ A (exact up to rounding)."""
        if self.merged:
            w = self.base.weight
            v = w.float() * (self._merged_norm / self.magnitude)[:, None]  # back to V
            w.copy_((v - self.delta_weight()).to(w.dtype))
            self._merged_norm = None
            self.merged = False
