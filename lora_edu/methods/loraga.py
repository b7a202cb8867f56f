"""LoRA-GA: LoRA started from the full fine-tuning gradient's singular vectors, base shifted.

Wang, Li, Huang and Li 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation",
arXiv 2407.05000. Defaults and options as in HF PEFT's LoraGAConfig (peft/tuners/lora/loraga.py).

One SGD step of LoRA from (A0, B0) with learning rate lr changes W by

    dW = s (dB A0 + B0 dA) = -lr s^2 (G A0^T A0 + B0 B0^T G),   G = dL/dW0 [out, in]

With G = U diag(S) Vh (randomised SVD, q = min(4r, out, in), 4 iterations), the defaults take
A0 from the top r right singular vectors and B0 from the next r left ones ("ArB2r"):

    A0 = Vh[:r]                       [r, in]     G A0^T A0 = G's best rank-r part
    B0 = U[:, r:2r] diag(S[r:2r]) c   [out, r]    c = out^(1/4) / sqrt(gamma)  ("stable")

so that the first LoRA step points along full fine-tuning's first step -lr G. As in PEFT, B0
carries the singular values S_B. The base becomes W0 - s * B0 @ A0 (shifted.py), so the
model starts unchanged. Other options, PEFT's names:
    direction  "ArB2r" (default), "A2rBr" (A: Vh[r:2r], B: U[:, :r]), "ArBr" (A odd, B even
               indices of the top 2r), "random" (the same r of the top 2r for both, torch.randperm)
    scale      "stable" (default), "weight_svd" (c = top singular value of W0 / S_B[0], from
               torch.svd_lowrank(W0, q=r, niter=4)), "gd_scale" (A0 and B0 divided by s), "unit" (c = 1)
The randomised SVDs and "random" draw from torch's global RNG: seed it for a repeatable init.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from .hparams import check_lora_hparams
from .inject import check_no_adapters, resolve_targets, wrap_modules
from .lora import check_bypass_dtype
from .shifted import ShiftedLoRALinear

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")


def check_loraga_options(direction, scale, stable_gamma) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS} (PEFT's LoraGAConfig), got {direction!r}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES} (PEFT's LoraGAConfig), got {scale!r}")
    if isinstance(stable_gamma, bool) or not isinstance(stable_gamma, numbers.Real) or not 0 < stable_gamma < float("inf"):
        raise ValueError(f"stable_gamma must be a positive number (B0 is scaled by out^(1/4) / sqrt(gamma)), "
                         f"got {stable_gamma!r}")


def estimate_full_gradients(model: nn.Module, target_modules, batches, loss_fn) -> dict[str, torch.Tensor]:
    """{layer name: G [out, in] float32}, dL/dW of each target averaged over `batches`.

    loss_fn(model, batch) returns a scalar loss (lora_edu.tiny's lm_loss has this form). As in
    PEFT's preprocess_loraga, the model runs in train mode and only the target weights require
    grad; unlike it, the gradients come from torch.autograd.grad, so every .grad, requires_grad
    flag and the train/eval mode are left exactly as they were.
    """
    check_no_adapters(model, "estimate_full_gradients (on the model before injection)")
    names = resolve_targets(model, target_modules)
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty; give at least one batch to estimate the gradient on")
    weights = [model.get_submodule(name).weight for name in names]
    flags, was_training = [(p, p.requires_grad) for p in model.parameters()], model.training
    sums = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in weights]  # [out, in] each
    try:
        model.requires_grad_(False)  # no gradient for what is not a target (memory)
        for w in weights:
            w.requires_grad_(True)
        model.train()
        with torch.enable_grad():
            for batch in batches:
                grads = torch.autograd.grad(loss_fn(model, batch), weights, allow_unused=True)
                for name, total, g in zip(names, sums, grads):
                    if g is None:
                        raise ValueError(f"the loss does not depend on {name!r}, so it has no gradient for "
                                         "LoRA-GA to start from; leave it out of target_modules")
                    total += g.float()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return {name: total / len(batches) for name, total in zip(names, sums)}


@torch.no_grad()
def loraga_factors(gradient: torch.Tensor, weight: torch.Tensor, r: int, scaling: float,
                   direction: str = "ArB2r", scale: str = "stable", stable_gamma: float = 16):
    """(A0 [r, in], B0 [out, r]) in float32 from the gradient G [out, in] (see the module docstring)."""
    g = gradient.float()
    u, s_vals, v = torch.svd_lowrank(g, q=min(4 * r, *g.shape), niter=4)  # [out, q], [q], [in, q]
    if direction == "ArB2r":
        a_idx, b_idx = torch.arange(r), torch.arange(r, 2 * r)
    elif direction == "A2rBr":
        a_idx, b_idx = torch.arange(r, 2 * r), torch.arange(r)
    elif direction == "ArBr":
        a_idx, b_idx = torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)
    else:  # "random"
        a_idx = b_idx = torch.randperm(2 * r)[:r]
    s_b = s_vals[b_idx]  # [r]
    a0 = v[:, a_idx].T  # [r, in]: right singular vectors, orthonormal rows
    b0 = u[:, b_idx] * s_b  # [out, r]: left singular vectors times their singular values
    if scale == "stable":
        b0 = b0 * (g.shape[0] ** 0.25 / stable_gamma ** 0.5)
    elif scale == "weight_svd":
        w_top = torch.svd_lowrank(weight.float(), q=r, niter=4)[1][0]
        if s_b[0] > 0:
            b0 = b0 * (w_top / s_b[0])
    elif scale == "gd_scale":
        a0, b0 = a0 / scaling, b0 / scaling
    return a0, b0


class LoRAGALinear(ShiftedLoRALinear):
    """A LoRALinear whose A, B start from the SVD of dL/dW0, over the residual W0 - s * B0 @ A0."""

    method = "loraga"
    config_keys = ("method", "r", "alpha", "rslora", "dropout", "direction", "scale", "stable_gamma")
    # these shape the initialisation only: a file need not match them
    training_only_keys = ("dropout", "direction", "scale", "stable_gamma")

    def __init__(self, base: nn.Linear, gradient: torch.Tensor | None = None, r: int = 8, alpha: float = 16,
                 direction: str = "ArB2r", scale: str = "stable", stable_gamma: float = 16,
                 dropout: float = 0.0, rslora: bool = False, bypass_dtype: torch.dtype | None = None,
                 init: bool = True):
        """gradient: dL/dW0 [out, in], e.g. from estimate_full_gradients. init=False skips the
        SVD and the shift (no gradient needed), for a layer an adapter file fills (for_loading)."""
        check_loraga_options(direction, scale, stable_gamma)
        if init and isinstance(base, nn.Linear):  # any other base is refused by the class itself
            check_gradient(gradient, base, "this nn.Linear")
        super().__init__(base, r=r, alpha=alpha, dropout=dropout, rslora=rslora, bypass_dtype=bypass_dtype)
        self.direction, self.scale, self.stable_gamma = direction, scale, stable_gamma
        if init:
            self.start_from_(*loraga_factors(gradient, self.base.weight, self.r, self.scaling,
                                             direction, scale, stable_gamma))

    @classmethod
    def max_rank(cls, out_features: int, in_features: int) -> tuple[int, str]:
        return min(out_features, in_features) // 2, "A0 and B0 take 2r different singular vectors of G, which needs 2r <= min(out, in)"

    @classmethod
    def check_config(cls, config: dict) -> None:
        super().check_config(config)
        check_loraga_options(config["direction"], config["scale"], config["stable_gamma"])

    def adapter_config(self) -> dict:
        return {**super().adapter_config(), "direction": self.direction, "scale": self.scale,
                "stable_gamma": self.stable_gamma}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, direction={self.direction}, scale={self.scale}"


def check_gradient(gradient, base: nn.Module, where: str) -> None:
    """Raise unless `gradient` is a finite float tensor of the base weight's shape [out, in]."""
    shape = tuple(getattr(base, "weight", torch.empty(0)).shape)
    if not isinstance(gradient, torch.Tensor) or not gradient.is_floating_point() or tuple(gradient.shape) != shape:
        got = tuple(gradient.shape) if isinstance(gradient, torch.Tensor) else type(gradient).__name__
        raise ValueError(f"LoRA-GA needs dL/dW for {where} as a float tensor of shape {shape}, got {got}; "
                         "estimate it with estimate_full_gradients(model, target_modules, batches, loss_fn)")
    if not bool(torch.isfinite(gradient).all()):
        raise ValueError(f"the gradient for {where} has inf or NaN entries; estimate it on batches whose loss is finite")


def inject_loraga(model: nn.Module, target_modules, gradients: dict, r: int = 8, alpha: float = 16,
                  direction: str = "ArB2r", scale: str = "stable", stable_gamma: float = 16,
                  dropout: float = 0.0, rslora: bool = False, bypass_dtype=None) -> nn.Module:
    """Wrap every nn.Linear matching a target in a LoRAGALinear, from gradients[name]; in place.

    `gradients` maps full layer names to dL/dW (estimate_full_gradients' result; extra entries
    are ignored). Every check runs before the model is touched.
    """
    check_lora_hparams(r, alpha, dropout)
    check_loraga_options(direction, scale, stable_gamma)
    check_bypass_dtype(bypass_dtype)
    check_no_adapters(model, "inject_loraga")
    chosen = resolve_targets(model, target_modules)
    missing = [name for name in chosen if name not in gradients]
    if missing:
        raise ValueError(f"no gradient for {missing}; estimate them with estimate_full_gradients(model, "
                         f"{target_modules!r}, batches, loss_fn) on this model before injecting")

    def check(name, base):
        LoRAGALinear.check_module(name, base, {"r": r})
        check_gradient(gradients[name], base, repr(name))

    return wrap_modules(model, chosen, lambda name, base: LoRAGALinear(
        base, gradients[name], r=r, alpha=alpha, direction=direction, scale=scale, stable_gamma=stable_gamma,
        dropout=dropout, rslora=rslora, bypass_dtype=bypass_dtype), check=check)
