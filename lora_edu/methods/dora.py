"""DoRA: LoRA on the direction of each output row, plus a trainable magnitude per row.

Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353, built on
weight normalisation (Salimans and Kingma 2016, arXiv 1602.07868).

Key equation (nn.Linear orientation, W0 [out, in]; norms are per output row, over dim 1):

    V  = W0 + s * B @ A                     [out, in]
    W' = magnitude[:, None] * V / ||V||_row  magnitude [out], initialised to ||W0||_row

At init B = 0, so V = W0 and W' = W0: the layer starts as the identity on the base model.
As in DoRA section 4.3 and HF PEFT, ||V|| is treated as a constant in the backward pass
(detached), which saves memory and changes the forward value not at all.

The forward never builds W' (or V) as an [out, in] tensor. With c = magnitude / ||V||:

    y = W' x + b = c * (W0 x + s * B A x) + b          W0 x in the base's own dtype

and the row norms come from small products only, never from a float32 copy of W0:

    ||V||^2_row = ||W0||^2_row + 2 s * rowsum(B * (W0 A^T)) + s^2 * rowsum((B A A^T) * B)

||W0||^2 is cached (W0 is frozen), W0 A^T is [out, r] and A A^T is [r, r]. The cost that is
left is one extra read of W0 per forward (for W0 A^T) and the rescale of the output.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .lora import LoRALinear


def check_nonzero_rows(row_sq_norms: torch.Tensor, where: str) -> None:
    """Raise if a row of W0 is zero: its direction W0 / ||W0|| is 0 / 0 (PEFT computes NaN there)."""
    if row_sq_norms.device.type == "meta":
        return  # a stand-in with no values; the real weight is checked when it is wrapped
    zero = torch.nonzero(row_sq_norms == 0).flatten().tolist()
    if zero:
        shown = zero[:8] + (["..."] if len(zero) > 8 else [])
        raise ValueError(f"DoRA cannot adapt {where}: {len(zero)} row(s) of its weight are all zeros "
                         f"(rows {shown}), so their direction W0 / ||W0|| is undefined (0 / 0). Use plain "
                         "LoRA there (dora=False), or leave the layer out of target_modules.")


class DoRALinear(LoRALinear):
    """A LoRALinear whose merged weight is renormalised per row and rescaled by `magnitude`."""

    adapter_parameter_names = ("lora_A", "lora_B", "magnitude")
    method = "dora"

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 rslora: bool = False, bypass_dtype: torch.dtype | None = None):
        super().__init__(base, r=r, alpha=alpha, dropout=dropout, rslora=rslora, bypass_dtype=bypass_dtype)
        # B = 0 here, so weight_norm() is ||W0||, computed the very way the forward computes it:
        # magnitude / weight_norm() is exactly 1 at init, and the layer is exactly the base
        self.magnitude = nn.Parameter(self.weight_norm())  # [out], one trainable length per row
        self._merged_norm = None  # ||V||_row at merge time, needed to unmerge

    @classmethod
    def check_module(cls, name: str, base: nn.Module, config: dict) -> None:
        """The zero-row check on a plain nn.Linear, before injection or loading wraps anything."""
        if isinstance(base, nn.Linear):
            check_nonzero_rows(base.weight.detach().float().square().sum(dim=1), repr(name))

    def check_base(self) -> None:
        """A zero row has no direction: refused (LoRALinear calls this before it freezes the base)."""
        self._w0_cache = None  # (weak refs, frozen_version(), ||W0||^2 per row): recomputed when W0 changes
        check_nonzero_rows(self.frozen_row_sq_norms(), f"this {type(self.base).__name__}")

    @torch.no_grad()
    def frozen_row_sq_norms(self) -> torch.Tensor:
        """||W0||^2 per output row, [out] float32, cached until W0 changes (merge, load, .to, a new weight).

        The cache holds weak references to the tensors W0 is made of, so that it neither keeps
        a replaced weight alive nor mistakes a new tensor at a freed one's address for it.
        """
        tensors, key = self.frozen_tensors(), self.frozen_version()
        cache = self._w0_cache
        if cache is None or cache[1] != key or any(ref() is not t for ref, t in zip(cache[0], tensors)):
            w0 = self.frozen_weight()  # its own dtype: the float32 accumulation needs no float32 copy
            norms = torch.linalg.vector_norm(w0, dim=1, dtype=torch.float32).square()
            self._w0_cache = (tuple(weakref.ref(t) for t in tensors), key, norms)
        return self._w0_cache[2]

    def __getstate__(self):
        """Copies and pickles leave the cache behind (weak references do not pickle); it is rebuilt on use."""
        state = self.__dict__.copy()
        state["_w0_cache"] = None
        return state

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """||V||_row = ||W0 + s B A||_row, [out] float32, detached, without forming V.

        With b_i the i-th row of B:  ||V_i||^2 = ||W0_i||^2 + b_i . (2s (W0 A^T)_i + s^2 (B A A^T)_i),
        one addmm over [out, r] tensors. Only W0 A^T reads W0, in W0's own dtype (A is cast to
        it; the rounding of A moves the norm by about 2^-9 of the cross term, far below a bf16
        output's rounding). Float cancellation: if V's row were much shorter than W0's, the
        relative error would grow like ||W0||^2 / ||V||^2; an adapter that cancels its row is
        not what training makes.
        """
        s = self.scaling
        a, b = self.lora_A.float(), self.lora_B.float()  # [r, in], [out, r]
        w0 = self.frozen_weight()  # [out, in], in the dtype the base computes in
        w0_a = (w0 @ a.to(w0.dtype).T).float()  # [out, r]: the one pass over W0
        terms = torch.addmm(w0_a, b, a @ a.T, beta=2 * s, alpha=s * s)  # 2s W0 A^T + s^2 B (A A^T)
        return (self.frozen_row_sq_norms() + (b * terms).sum(dim=1)).clamp_min(0).sqrt()

    def directed_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """V = W0 + s * B @ A and its detached row norm, both float32: ([out, in], [out]).

        Built in full only for merging and for teaching; the forward uses weight_norm(). W0 is
        the one the base computes with (an NF4 base's, dequantized to its compute dtype).
        """
        v = self.frozen_weight().float() + self.delta_weight()  # [out, in]
        return v, v.norm(dim=1).detach()  # [out]

    def effective_weight(self) -> torch.Tensor:
        """W' = magnitude * V / ||V||_row, [out, in] in float32."""
        v, norm = self.directed_weight()
        return (self.magnitude / norm)[:, None] * v  # [out, 1] * [out, in]

    def merged_weight(self) -> torch.Tensor:
        return self.effective_weight().detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        c = self.magnitude / self.weight_norm()  # m / ||V||, [out]; the norm is a constant for autograd
        bias = self.base.bias
        if self.training and self.dropout_p > 0:
            # PEFT's DoRA: the base output keeps the whole x, the rescale and the bypass see the
            # dropped-out x~, so W0 runs twice: y = base(x) + (c - 1) * W0 x~ + c * s * B A x~
            out = self.base(x)
            xd = self.bypass_input(x)
            wx = self.base_product(xd.to(out.dtype))
            dtype = torch.promote_types(wx.dtype, self.compute_dtype)
            c = c.to(dtype)
            return out + ((c - 1) * wx.to(dtype) + c * self.lora_product(xd)).to(out.dtype)  # PEFT's form
        wx = self.base_product(x)  # W0 x in the base's dtype, [..., out]
        # the rescale runs in the wider of the base's and the bypass's dtypes: a bf16 bypass
        # never rounds a float32 base product, and a bf16 one with a bf16 bypass stays bf16
        dtype = torch.promote_types(wx.dtype, self.compute_dtype)
        z = self.add_lora_product(wx.to(dtype), self.bypass_input(x))  # V x, kept for the magnitude's gradient
        c = c.to(dtype)
        y = c * z if bias is None else torch.addcmul(bias.to(dtype), c, z)  # c * V x + b
        return y.to(wx.dtype)

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
