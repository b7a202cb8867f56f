"""The appendix sanity report: six invariants of LoRALinear and DoRALinear, measured.

Each check builds its own small layer (IN = 32, OUT = 48, r = 8, alpha = 16 by default),
measures one invariant and says whether it holds:

  [a] B = 0 at init, so the adapted layer equals the base layer exactly
  [b] one optimizer step makes dW non-zero and changes the output
  [c] merge gives the unmerged output; the merged weight is W0 + dW; unmerge restores W0
  [d] trainable parameters = r * (in + out); the base is frozen
  [e] scaling alpha/r and alpha/sqrt(r)
  [f] DoRA's magnitude is trainable, its base frozen, and the layer starts equal to its base
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..methods.dora import DoRALinear
from ..methods.hparams import lora_scaling
from ..methods.inject import count_trainable_params
from ..methods.lora import LoRALinear


@dataclass
class Check:
    label: str  # "a" to "f"
    passed: bool
    text: str  # the measured figures, one line

    def line(self) -> str:
        return f"[{self.label}] {self.text}  {'OK' if self.passed else 'FAILED'}"


def _layer(cls, in_features, out_features, r, alpha, seed, **kw):
    torch.manual_seed(seed)
    return cls(nn.Linear(in_features, out_features), r=r, alpha=alpha, **kw)


def run_sanity_checks(in_features=32, out_features=48, r=8, alpha=16, seed=0, tol=1e-5) -> list[Check]:
    """Measure the six invariants; each Check says whether it held."""
    torch.manual_seed(seed)
    x = torch.randn(4, in_features)  # [batch, in]
    checks = []

    layer = _layer(LoRALinear, in_features, out_features, r, alpha, seed)
    gap = (layer(x) - layer.base(x)).abs().max().item()
    checks.append(Check("a", gap == 0.0, f"B=0 init: max|out_lora - out_base| = {gap:.2e}"))

    before = layer(x).detach()
    layer(x).pow(2).mean().backward()  # any loss with a non-zero gradient will do
    with torch.no_grad():  # one plain SGD step, lr = 0.1, written out
        for p in (layer.lora_A, layer.lora_B):
            p -= 0.1 * p.grad
    dw_norm = layer.delta_weight().norm().item()
    changed = not torch.equal(layer(x).detach(), before)
    checks.append(Check("b", dw_norm > 0 and changed,
                        f"after 1 step: ||dW|| = {dw_norm:.3e}, output changed = {changed}"))

    with torch.no_grad():
        w0 = layer.base.weight.clone()
        unmerged = layer(x)
        layer.merge()
        merged = layer(x)
        gap = (merged - unmerged).abs().max().item()
        weight_ok = torch.allclose(layer.base.weight, w0 + layer.delta_weight(), atol=tol)
        layer.unmerge()
        restored = torch.allclose(layer.base.weight, w0, atol=tol)
    checks.append(Check("c", gap < tol and weight_ok and restored,
                        f"merge: max|out_merged - out_unmerged| = {gap:.2e}; weight == W0 + dW: {weight_ok}; "
                        f"unmerge restores W0: {restored}"))

    n = count_trainable_params(layer)
    expected = r * (in_features + out_features)
    frozen = not any(p.requires_grad for p in layer.base.parameters())
    checks.append(Check("d", n == expected and frozen,
                        f"trainable params = {n} (r*(in+out) = {expected}); base frozen: {frozen}"))

    plain, rs = lora_scaling(alpha, r), lora_scaling(alpha, r, rslora=True)
    ok = math.isclose(plain, alpha / r) and math.isclose(rs, alpha / math.sqrt(r))
    checks.append(Check("e", ok, f"scaling: alpha/r = {plain:.4f}, rsLoRA alpha/sqrt(r) = {rs:.4f}"))

    dora = _layer(DoRALinear, in_features, out_features, r, alpha, seed)
    gap = (dora(x) - dora.base(x)).abs().max().item()
    trainable = dora.magnitude.requires_grad
    frozen = not any(p.requires_grad for p in dora.base.parameters())
    checks.append(Check("f", trainable and frozen and gap < tol,
                        f"DoRA: magnitude trainable: {trainable}; base frozen: {frozen}; "
                        f"starts as the base: max|out_dora - out_base| = {gap:.2e}"))
    return checks
